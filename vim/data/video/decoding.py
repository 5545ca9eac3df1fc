"""Reading the frames of a video file (PyAV) or of a folder of extracted frames (PIL), only those a clip needs.

:func:`open_frames` opens either; ``take(indices)`` returns the frames at those indices. A video file is opened by
reading its packets (frame count, timestamps, keyframes; nothing decoded); each needed frame is then reached by
seeking to the keyframe before it, and decoding stops after the clip's last frame, so memory holds the clip, not
the file. A file that holds less than its header states (truncated) is used up to its last frame, with a note; a
frame past the point where a stream breaks off is replaced by the last decoded one, with a note; a file that gives
no frame raises :class:`VideoReadError`. Variable-frame-rate videos are sampled by frame index, with a note.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from vim.data.images.dataset import IMAGE_EXTENSIONS, read_rgb

if TYPE_CHECKING:
    import av  # imported on first use (see _pyav): only video files need it

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".3gp", ".ogv", ".ts")
VARIABLE_RATE_TOLERANCE = 0.5
"""A stream whose frame durations differ by more than this fraction of the median counts as variable-frame-rate."""


class VideoReadError(ValueError):
    """A video (or frame folder) that cannot give a single frame."""


class FrameFolder:
    """The frames of a folder of extracted frame images (display order); :meth:`take` reads only the frames asked for."""

    def __init__(self, files: Sequence[str]) -> None:
        self.files = list(files)
        self.notes: list[str] = []

    def __len__(self) -> int:
        return len(self.files)

    @property
    def frame_size(self) -> tuple[int, int]:
        """(H, W) of the first frame."""
        with Image.open(self.files[0]) as image:
            return image.height, image.width

    def take(self, indices: Sequence[int]) -> torch.Tensor:
        """(T, 3, H, W) uint8 RGB frames at ``indices`` (each distinct frame read once)."""
        read = {i: np.asarray(read_rgb(self.files[i])) for i in sorted(set(indices))}
        return torch.from_numpy(np.stack([read[i] for i in indices])).permute(0, 3, 1, 2)


def is_variable_frame_rate(timestamps: Sequence[int | None]) -> bool:
    """Whether consecutive presentation timestamps are spaced unevenly (beyond :data:`VARIABLE_RATE_TOLERANCE`)."""
    known = [t for t in timestamps if t is not None]
    durations = np.diff(np.sort(np.asarray(known, dtype=np.float64)))
    durations = durations[durations > 0]
    if len(durations) < 2:
        return False
    median = float(np.median(durations))
    return bool(np.abs(durations - median).max() > VARIABLE_RATE_TOLERANCE * median)


def _pyav():
    """PyAV, imported on first use: video files need it, frame folders (and images, points) do not."""
    try:
        import av
    except ImportError as error:
        raise ImportError("reading video files needs PyAV: pip install av, or the toolkit's 'data' extra") from error
    return av


@functools.cache
def read_errors() -> tuple[type[Exception], ...]:
    """The errors that mean a clip cannot be read (VideoReadError is a ValueError): PyAV's own among them where
    PyAV is installed. Looked up once."""
    try:
        import av
    except ImportError:
        return (OSError, ValueError)
    return (OSError, ValueError, av.FFmpegError)


def _open_video(path: str) -> av.container.InputContainer:
    av = _pyav()
    try:
        container = av.open(path)
    except read_errors() as error:
        raise VideoReadError(f"cannot open: {type(error).__name__}: {error}") from error
    if not container.streams.video:
        container.close()
        raise VideoReadError("the file has no video stream")
    return container


def _header_seconds(container: av.container.InputContainer, stream: av.VideoStream) -> float | None:
    """The video stream's length as the file's header states it (seconds), or None when it does not."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    tag = stream.metadata.get("DURATION")  # Matroska / WebM track statistics, "HH:MM:SS.nnnnnnnnn"
    if tag:
        hours, minutes, seconds = tag.split(":")
        return int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    if container.duration is not None and len(container.streams) == 1:  # the container's length is the video's
        return container.duration / 1e6
    return None


TRANSPORT_PACKET = 188
"""Bytes per MPEG transport-stream packet: a .ts file cut in the middle of one was truncated."""


def truncation_note(container: av.container.InputContainer, stream: av.VideoStream, timestamps: Sequence[int]) -> str | None:
    """A note when the file holds fewer frames, or a shorter video stream, than its header states (a truncated
    download or copy), or ends inside a transport-stream packet; None otherwise."""
    count = len(timestamps)
    if stream.frames > 0:  # MP4 / MOV / AVI headers count the frames
        short = count < stream.frames
        return (
            f"the file holds {count} of the {stream.frames} frames its header states (truncated?); using those" if short else None
        )
    if container.format.name == "mpegts" and container.size % TRANSPORT_PACKET:
        return f"the file ends inside a transport-stream packet (truncated?); using the {count} frames before it"
    declared = _header_seconds(container, stream)
    if declared is None or count < 2 or stream.time_base is None:
        return None
    ordered = np.sort(np.asarray(timestamps, dtype=np.float64))
    period = float(np.median(np.diff(ordered)) * stream.time_base)
    held = float((ordered[-1] - ordered[0]) * stream.time_base) + period
    if held < declared - 2 * period:  # more than rounding: whole frames are missing at the end
        return f"the file holds {held:.2f} s of video where its header states {declared:.2f} s (truncated?); using those"
    return None


class VideoFile:
    """The frames of one video file's first video stream, decoded only where a clip needs them.

    Opening reads the packets (no decoding) for the frame count, presentation timestamps and keyframes. :meth:`take`
    then seeks to the keyframe before each needed frame that lies ahead, decodes forward to it, converts only the
    frames asked for and stops after the last one: memory holds the clip, not the file. Where timestamps are missing
    or repeated it decodes from the start instead, counting frames (still stopping after the last one needed).

    Raises:
        VideoReadError: the file cannot be opened, has no video stream, or holds no frame.
        ImportError: PyAV is not installed.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.notes: list[str] = []
        with _open_video(path) as container:
            stream = container.streams.video[0]
            timestamps, keyframes = [], []
            try:
                for packet in container.demux(stream):
                    if packet.size == 0:  # the demuxer's end-of-stream packet
                        continue
                    timestamps.append(packet.pts)
                    if packet.is_keyframe:
                        keyframes.append(packet.pts)
            except read_errors() as error:
                if not timestamps:
                    raise VideoReadError(f"no frame could be read: {type(error).__name__}: {error}") from error
                self.notes.append(f"the stream breaks off after {len(timestamps)} frames ({type(error).__name__}); using those")
            if not timestamps:
                raise VideoReadError("the video stream has no frames (zero-length or truncated file)")
            self.frame_size = (stream.codec_context.height, stream.codec_context.width)
            """(H, W) of the frames, from the stream's header."""
            known = [t for t in timestamps if t is not None]
            self.seekable = len(known) == len(timestamps) and len(set(known)) == len(known)
            if self.seekable and (note := truncation_note(container, stream, known)):
                self.notes.append(note)
        self.timestamps = sorted(known) if self.seekable else []
        """Presentation timestamp of each frame, in display order (empty when not seekable)."""
        self.keyframes = sorted(t for t in keyframes if t is not None) or self.timestamps[:1]
        self.num_frames = len(timestamps)
        if is_variable_frame_rate(known):
            self.notes.append("variable frame rate: frames are sampled by index, not by time")

    def __len__(self) -> int:
        return self.num_frames

    def take(self, indices: Sequence[int]) -> torch.Tensor:
        """(T, 3, H, W) uint8 RGB frames at ``indices`` (display order; each distinct frame decoded and converted once).

        A frame that cannot be decoded (a stream that breaks off early) is replaced by the last one before it, with a
        note; VideoReadError when not a single one decodes.
        """
        wanted = sorted(set(indices))
        decoded: dict[int, np.ndarray] = {}
        try:
            if not (self.seekable and self._decode_seeking(wanted, decoded)):
                decoded.clear()  # timestamps unusable after all: count frames from the start
                self._decode_in_order(wanted, decoded)
        except read_errors() as error:
            if not decoded:
                raise VideoReadError(f"no frame could be decoded: {type(error).__name__}: {error}") from error
        missing = [i for i in wanted if i not in decoded]
        if len(missing) == len(wanted):
            raise VideoReadError("no frame could be decoded")
        if missing:
            self.notes.append(f"the stream breaks off before frame {missing[0]}; the last decoded frame stands in")
            for i in missing:
                decoded[i] = decoded[max((k for k in decoded if k < i), default=min(decoded))]
        return torch.from_numpy(np.stack([decoded[i] for i in indices])).permute(0, 3, 1, 2)

    def _decode_in_order(self, wanted: list[int], out: dict[int, np.ndarray]) -> None:
        """Decode from the first frame, keeping the ``wanted`` (sorted) frame indices, up to the last of them."""
        with _open_video(self.path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for index, frame in enumerate(container.decode(stream)):
                if index in wanted:
                    out[index] = frame.to_ndarray(format="rgb24")
                if index >= wanted[-1]:
                    return

    def _decode_seeking(self, wanted: list[int], out: dict[int, np.ndarray]) -> bool:
        """Decode the ``wanted`` (sorted) frames by timestamp, seeking to the keyframe before each one that lies past
        the next keyframe. False when the decoded frames carry no timestamps or a seek lands after its target."""
        with _open_video(self.path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            frames: Iterator[av.VideoFrame] = iter(())  # the decoder's frames (none before the first seek)
            position = None  # the timestamp of the last frame taken from them
            for index in wanted:
                target = self.timestamps[index]
                keyframe = max((k for k in self.keyframes if k <= target), default=self.timestamps[0])
                seeking = position is None or position < keyframe
                if seeking:
                    container.seek(keyframe, stream=stream, backward=True, any_frame=False)
                    frames = container.decode(stream)
                for frame in frames:
                    if frame.pts is None or (seeking and frame.pts > target):
                        return False
                    seeking, position = False, frame.pts
                    if position >= target:  # the target, or the next frame where the decoder dropped it
                        out[index] = frame.to_ndarray(format="rgb24")
                        break
                else:
                    return True  # the stream ends before the target
        return True


def list_frame_files(folder: str | os.PathLike) -> list[str]:
    """Image files directly inside ``folder``, in natural order (``img_2`` before ``img_10``)."""

    def natural(name: str) -> list:
        return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]

    files = [f for f in Path(folder).iterdir() if f.name.lower().endswith(IMAGE_EXTENSIONS) and not f.name.startswith(".")]
    return [str(f) for f in sorted(files, key=lambda f: natural(f.name))]


def open_frames(path: str) -> FrameFolder | VideoFile:
    """The frames of a video file or of a folder of extracted frames; VideoReadError when there are none."""
    if Path(path).is_dir():
        files = list_frame_files(path)
        if not files:
            raise VideoReadError(f"frame folder has no image files ({', '.join(IMAGE_EXTENSIONS)})")
        return FrameFolder(files)
    if not Path(path).is_file():
        raise VideoReadError("no such file")
    if Path(path).stat().st_size == 0:
        raise VideoReadError("empty file (0 bytes)")
    return VideoFile(path)
