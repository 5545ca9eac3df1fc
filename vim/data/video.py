"""Video clip classification data: folders of videos, Kinetics / Something-Something annotation lists, frame folders.

:class:`VideoClipDataModule` yields clips (B, 3, T, H, W) for training and validation and, for ``test``,
``test_num_clips x test_num_crops`` views per video (B, V, 3, T, H, W) whose predictions the classifier
averages (VideoMamba's 4 clips x 3 crops on Kinetics). Where the samples come from:

- a folder-per-class tree ``root/<class>/<video file>`` (``train_root``, ``val_root``, ``test_root``), where
  a sample may also be a folder of extracted frames ``root/<class>/<video>/<frame>.jpg``;
- an annotation list (``train_list``, ...; relative paths are taken under ``data_root``): lines
  ``path label`` (space, tab or comma separated; label an index or a class name; VideoMAE / VideoMamba's
  lists), the official Kinetics CSV (``label,youtube_id,time_start,time_end,split``; files
  ``<youtube_id>_<start:06d>_<end:06d>.mp4``), or the official Something-Something v2 JSON
  (``[{"id", "template", ...}]``, files ``<id>.webm``, class indices from ``labels.json`` given as ``classes_file``).

Videos are decoded with PyAV (only the frames a clip needs: :class:`VideoFile`), frame folders read with PIL
(only the frames a clip needs as well). Training draws ``num_frames`` frames by
segment-based sampling (the video is cut into ``num_frames`` equal segments, one frame at a random
offset in each: TSN / VideoMamba's "sparse" sampling); evaluation takes the frame at a fixed offset of
each segment, clip ``k`` of ``n`` at ``(k + 1) / (n + 1)`` of the segment. Transforms are torchvision
transforms v2 applied to the whole clip at once (every frame gets the same crop, flip and RandAugment op).

Bad input never stops an epoch: an empty, truncated-before-the-first-frame or corrupt file, or a stream
without frames, is skipped with a warning and a running count. Other problems are warned about and
handled: a clip shorter than ``num_frames`` is stretched by repeating frames (segment sampling picks
frames more than once, never past the end), a file holding less than its header states (truncated) is used up
to its last frame, a frame past the point where a stream breaks off is replaced by the last decoded one,
frames smaller than ``min_image_size`` are upsampled by the resize, odd frame sizes are resized like any
other, and variable-frame-rate videos are sampled by frame index, not by time.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import os
import random
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

from vim.data.images import IMAGE_EXTENSIONS, UNLABELLED, ImageDataModule, find_classes, read_rgb
from vim.data.sampling import SampleKey, seed_everything_from

if TYPE_CHECKING:
    import av  # imported on first use (see _pyav): only video files need it

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".3gp", ".ogv", ".ts")
VARIABLE_RATE_TOLERANCE = 0.5
"""A stream whose frame durations differ by more than this fraction of the median counts as variable-frame-rate."""


class VideoReadError(ValueError):
    """A video (or frame folder) that cannot give a single frame."""


class UnreadableClip(NamedTuple):
    """A sample that could not be decoded, and why."""

    path: str
    reason: str


class LoadedClip(NamedTuple):
    """One transformed sample: ``clip`` (3, T, H, W), or (V, 3, T, H, W) for several test views or ``repeats``
    training views; its class and notes."""

    clip: torch.Tensor
    target: int
    path: str
    notes: tuple[str, ...]
    repeats: int = 1
    """Training views of the same frames stacked on the clip's first axis (repeated augmentation); 1: none."""


class ClipBatch(NamedTuple):
    """A collated batch: ``clips`` (B, 3, T, H, W) or (B, V, 3, T, H, W), ``targets`` (B,), paths, skipped samples, notes."""

    clips: torch.Tensor
    targets: torch.Tensor
    paths: list[str]
    skipped: list[UnreadableClip]
    notes: list[tuple[str, str]]


# --------------------------------------------------------------------------------------------- decoding
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
    if stream.duration is not None:
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
    if declared is None or count < 2:
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
            frames, position = None, None  # the decoder's frames, and the timestamp of the last one taken from them
            for index in wanted:
                target = self.timestamps[index]
                keyframe = max((k for k in self.keyframes if k <= target), default=self.timestamps[0])
                seeking = frames is None or position is None or position < keyframe
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

    names = [f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
    return [os.path.join(folder, f) for f in sorted(names, key=natural)]


def open_frames(path: str) -> FrameFolder | VideoFile:
    """The frames of a video file or of a folder of extracted frames; VideoReadError when there are none."""
    if os.path.isdir(path):
        files = list_frame_files(path)
        if not files:
            raise VideoReadError(f"frame folder has no image files ({', '.join(IMAGE_EXTENSIONS)})")
        return FrameFolder(files)
    if not os.path.isfile(path):
        raise VideoReadError("no such file")
    if os.path.getsize(path) == 0:
        raise VideoReadError("empty file (0 bytes)")
    return VideoFile(path)


# --------------------------------------------------------------------------------------------- sampling
def segment_indices(
    num_available: int, num_frames: int, rng: random.Random | None = None, clip: int = 0, num_clips: int = 1
) -> list[int]:
    """Frame indices of one clip by segment-based sampling.

    The frames ``0 .. num_available - 1`` are cut into ``num_frames`` segments of ``s = (num_available - 1) / num_frames``
    frames. With ``rng`` (training) segment ``i`` gives a random frame in ``[round(s * i), round(s * (i + 1))]``;
    without, it gives ``round(s * i) + int(s * (clip + 1) / (num_clips + 1))``, so the ``num_clips`` test clips
    sit at evenly spaced offsets. Indices never pass the last frame; when ``num_available < num_frames`` frames repeat.
    """
    if num_available < 1 or num_frames < 1:
        raise ValueError(f"segment_indices needs num_available >= 1 and num_frames >= 1, got {num_available}, {num_frames}")
    segment = (num_available - 1) / num_frames
    last = num_available - 1
    if rng is not None:
        return [min(rng.randint(round(segment * i), round(segment * (i + 1))), last) for i in range(num_frames)]
    offset = int(segment * (clip + 1) / (num_clips + 1))
    return [min(round(segment * i) + offset, last) for i in range(num_frames)]


# --------------------------------------------------------------------------------------------- transforms
def rand_augment(policy: str | None) -> v2.RandAugment | None:
    """torchvision's RandAugment from a timm-style policy ``rand-m{magnitude}-n{ops}...`` (magnitude out of 10)."""
    if not policy:
        return None
    if not policy.startswith("rand"):
        raise ValueError(f"auto_augment: only RandAugment policies ('rand-m9-n2-...') apply to video, got {policy!r}")
    settings = dict(re.findall(r"-([mn])(\d+)", policy))
    return v2.RandAugment(num_ops=int(settings.get("n", 2)), magnitude=int(settings.get("m", 9)), num_magnitude_bins=11)


class ToClip(torch.nn.Module):
    """(T, 3, H, W) video -> (3, T, H, W) tensor, the model's layout."""

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return video.permute(1, 0, 2, 3).as_subclass(torch.Tensor)


def spatial_crops(video: torch.Tensor, size: int, num_crops: int) -> list[torch.Tensor]:
    """``num_crops`` square crops of ``video`` (..., H, W) spaced evenly along its longer side, centred on the shorter.

    With one crop it is the centre crop; with three, VideoMamba's left / centre / right (or top / centre / bottom).
    """
    height, width = video.shape[-2:]
    if min(height, width) < size:
        raise ValueError(f"cannot take {size} px crops from frames of {height}x{width}")
    long_is_width = width >= height
    span = (width if long_is_width else height) - size
    starts = [span // 2] if num_crops == 1 else [round(k * span / (num_crops - 1)) for k in range(num_crops)]
    across = ((height if long_is_width else width) - size) // 2
    return [
        TF.crop(video, across, start, size, size) if long_is_width else TF.crop(video, start, across, size, size)
        for start in starts
    ]


# --------------------------------------------------------------------------------------------- annotations
def _classes_from_file(path: str | os.PathLike) -> list[str]:
    """Class names by index: JSON ``{name: index}`` (SSv2's labels.json) or ``[names]``, or a text file, one name per line."""
    text = Path(path).read_text()
    if str(path).endswith(".json"):
        data = json.loads(text)
        if isinstance(data, dict):
            return [name for name, _ in sorted(data.items(), key=lambda item: int(item[1]))]
        return [str(name) for name in data]
    return [line.strip() for line in text.splitlines() if line.strip()]


def _resolve(data_root: str | None, path: str) -> str:
    return path if data_root is None or os.path.isabs(path) else os.path.join(data_root, path)


def _ssv2_samples(entries: list[dict], data_root: str | None, classes: list[str], argument: str) -> list[tuple[str, int]]:
    index = {name: i for i, name in enumerate(classes)}
    samples = []
    for entry in entries:
        label = entry["template"].replace("[", "").replace("]", "")
        if label not in index:
            raise ValueError(f"{argument}: label {label!r} of video {entry['id']} is not in classes_file")
        samples.append((_resolve(data_root, f"{entry['id']}.webm"), index[label]))
    return samples


def _kinetics_csv_samples(rows: list[dict], data_root: str | None) -> list[tuple[str, str]]:
    return [
        (_resolve(data_root, f"{row['youtube_id']}_{int(row['time_start']):06d}_{int(row['time_end']):06d}.mp4"), row["label"])
        for row in rows
    ]


def _list_samples(lines: list[str]) -> list[tuple[str, str]]:
    samples = []
    for line in lines:
        separator = "," if "," in line else None
        parts = line.rsplit(separator, 1)
        if len(parts) != 2:
            raise ValueError(f"annotation line {line!r} is not 'path label'")
        samples.append((parts[0].strip(), parts[1].strip()))
    return samples


def read_annotations(
    path: str | os.PathLike, data_root: str | None = None, classes: list[str] | None = None, argument: str = "train_list"
) -> tuple[list[tuple[str, int]], list[str]]:
    """``(video path, class index)`` samples of an annotation file, and the class names.

    Args:
        path: a ``path label`` list, the official Kinetics CSV or the official Something-Something v2 JSON.
        data_root: prefix of relative video paths.
        classes: class names by index (required for SSv2; else taken from integer labels or sorted label names).
        argument: the setting's name, for error messages.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{argument}: annotation file '{path}' does not exist")
    if path.suffix == ".json":
        if classes is None:
            raise ValueError(f"{argument}: a Something-Something JSON list needs classes_file (labels.json)")
        return _ssv2_samples(json.loads(path.read_text()), data_root, classes, argument), classes
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{argument}: annotation file '{path}' is empty")
    if "youtube_id" in lines[0]:
        named = _kinetics_csv_samples(list(csv.DictReader(lines)), data_root)
    else:
        named = [(_resolve(data_root, p), label) for p, label in _list_samples(lines)]
    if all(label.lstrip("-").isdigit() for _, label in named):
        targets = [int(label) for _, label in named]
        classes = classes or [str(i) for i in range(max(targets) + 1)]
        if min(targets) < 0 or max(targets) >= len(classes):
            raise ValueError(f"{argument}: labels span [{min(targets)}, {max(targets)}] but there are {len(classes)} classes")
        return [(p, t) for (p, _), t in zip(named, targets)], classes
    classes = classes or sorted({label for _, label in named})
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted({label for _, label in named} - set(index))
    if unknown:
        raise ValueError(f"{argument}: labels {unknown[:5]} are not among the {len(classes)} classes")
    return [(p, index[label]) for p, label in named], classes


def list_videos(root: str | os.PathLike) -> list[str]:
    """Samples under ``root``: video files (by extension) and folders holding frame images, recursively, sorted."""
    found = []
    for folder, subfolders, files in os.walk(root, followlinks=True):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        if folder != str(root) and any(f.lower().endswith(IMAGE_EXTENSIONS) for f in files):
            found.append(folder)  # a frame folder is one sample
            subfolders[:] = []
            continue
        found += [os.path.join(folder, f) for f in sorted(files) if f.lower().endswith(VIDEO_EXTENSIONS)]
    return found


# --------------------------------------------------------------------------------------------- dataset
class VideoClips(Dataset):
    """Videos with class indices, sampled into clips and transformed.

    Args:
        samples: ``(path, class index)`` pairs (a path may be a video file or a frame folder).
        num_frames: frames per clip.
        transform: v2 transform of a (T, 3, H, W) ``tv_tensors.Video`` to a (3, T, H, W) clip (after
            :class:`ToClip`), or a callable returning a list of such views (test).
        train: random segment offsets (else fixed, ``num_clips`` clips).
        num_clips: temporal clips per video at evaluation.
        min_image_size: frames with a shorter side below this are reported.
        repeats: training only: augment the frames of one segment sample this many times (VideoMamba's
            ``num_sample``, repeated augmentation): the video is decoded once and gives ``repeats`` clips.

    Indexed by an int or a :class:`~vim.data.sampling.SampleKey` (whose seed fixes the sample's randomness).
    Returns :class:`LoadedClip`, or :class:`UnreadableClip` for a file that gives no frame.
    """

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        num_frames: int,
        transform: Callable,
        train: bool = False,
        num_clips: int = 1,
        min_image_size: int = 0,
        repeats: int = 1,
    ) -> None:
        if repeats < 1 or (repeats > 1 and not train):
            raise ValueError(f"repeats={repeats}: repeated augmentation needs repeats >= 1, and train=True when above 1")
        self.samples = list(samples)
        self.num_frames, self.transform, self.train, self.num_clips = num_frames, transform, train, num_clips
        self.min_image_size, self.repeats = min_image_size, repeats

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | SampleKey) -> LoadedClip | UnreadableClip:
        index = key.index if isinstance(key, SampleKey) else key
        path, target = self.samples[index]
        try:
            frames = open_frames(path)
            if isinstance(key, SampleKey):
                seed_everything_from(key.seed)
            if self.train:  # one segment sample, augmented `repeats` times
                video = frames.take(segment_indices(len(frames), self.num_frames, random))
                views = [self._transformed(video) for _ in range(self.repeats)]
                clip = views[0] if self.repeats == 1 else torch.stack(views)  # repeats: (R, 3, T, S, S)
            else:  # every clip's frames decoded in one pass over the file
                indices = [
                    i
                    for c in range(self.num_clips)
                    for i in segment_indices(len(frames), self.num_frames, None, c, self.num_clips)
                ]
                views = [self._transformed(video) for video in frames.take(indices).split(self.num_frames)]
                clip = views[0] if len(views) == 1 else torch.cat(views)  # test: (clips x crops, 3, T, S, S)
        except read_errors() as error:
            return UnreadableClip(path, f"{type(error).__name__}: {error}")
        return LoadedClip(clip, target, path, tuple(frames.notes) + self._size_notes(frames), self.repeats)

    def _transformed(self, video: torch.Tensor) -> torch.Tensor:
        """(T, 3, H, W) uint8 frames through the transform: (3, T, S, S), or (V, 3, T, S, S) for test crops."""
        out = self.transform(tv_tensors.Video(video))
        return torch.cat(out) if isinstance(out, list) else out

    def _size_notes(self, frames: FrameFolder | VideoFile) -> tuple[str, ...]:
        notes = []
        if len(frames) < self.num_frames:
            notes.append(f"only {len(frames)} frames for num_frames={self.num_frames}: frames are repeated to fill the clip")
        height, width = frames.frame_size
        if min(height, width) < self.min_image_size:
            notes.append(f"frames of {height}x{width} are smaller than min_image_size={self.min_image_size}: upsampled")
        return tuple(notes)


def collate_clips(samples: Sequence[LoadedClip | UnreadableClip]) -> ClipBatch:
    """Stack the readable samples into a :class:`ClipBatch`; unreadable ones are listed in ``skipped``.

    A sample with ``repeats`` training views gives that many rows (its target and path repeated).
    """
    loaded = [s for s in samples if isinstance(s, LoadedClip)]
    rows = [(clip, s) for s in loaded for clip in (s.clip.unbind(0) if s.repeats > 1 else (s.clip,))]
    clips = torch.stack([clip for clip, _ in rows]) if rows else torch.empty(0, 3, 0, 0, 0)
    return ClipBatch(
        clips,
        torch.tensor([s.target for _, s in rows], dtype=torch.long),
        [s.path for _, s in rows],
        [s for s in samples if isinstance(s, UnreadableClip)],
        [(s.path, note) for s in loaded for note in s.notes],
    )


class MultiViewTransform:
    """Test views of one clip: resize the short side, take ``num_crops`` crops, normalise each: a list of (3, T, S, S)."""

    def __init__(self, resize: v2.Transform, size: int, num_crops: int, finish: v2.Transform) -> None:
        self.resize, self.size, self.num_crops, self.finish = resize, size, num_crops, finish

    def __call__(self, video: tv_tensors.Video) -> list[torch.Tensor]:
        video = self.resize(video)
        return [self.finish(crop).unsqueeze(0) for crop in spatial_crops(video, self.size, self.num_crops)]


# --------------------------------------------------------------------------------------------- datamodule
class VideoClipDataModule(ImageDataModule):
    """Video classification data (see the module docstring) on :class:`~vim.data.images.ImageDataModule`'s loaders.

    The folder roots, batch size, workers, seed, resumable shuffling and the augmentation settings are the
    image datamodule's; augmentation runs on whole clips with torchvision v2 (``auto_augment`` takes timm's
    ``rand-m{M}-n{N}`` RandAugment syntax).

    Args:
        num_frames: frames per clip.
        train_list, val_list, test_list: annotation files, used instead of the corresponding ``*_root`` tree.
        data_root: prefix of relative paths in the annotation files.
        classes_file: class names by index (JSON ``{name: index}`` / list, or one per line); required for SSv2.
        test_num_clips: temporal clips per video for ``test``.
        test_num_crops: spatial crops per clip for ``test`` (1 centre, 3 left / centre / right).
        repeated_aug: training clips per video and step (VideoMamba's ``num_sample``): each video is decoded
            once and augmented this many times, so a batch of ``batch_size`` videos holds
            ``batch_size * repeated_aug`` clips. 1: off.
        **kwargs: :class:`~vim.data.images.ImageDataModule` arguments (roots, ``img_size``, ``batch_size``,
            ``num_workers``, ``seed``, ``auto_augment``, ``color_jitter``, ``re_prob``, ``hflip`` (0 for
            Something-Something, where left and right differ), ``scale``, ``crop_pct``, ``mean``, ``std``, ...).
    """

    collate_fn = staticmethod(collate_clips)

    def __init__(
        self,
        num_frames: int = 8,
        train_root: str | None = None,
        val_root: str | None = None,
        test_root: str | None = None,
        train_list: str | None = None,
        val_list: str | None = None,
        test_list: str | None = None,
        data_root: str | None = None,
        classes_file: str | None = None,
        test_num_clips: int = 4,
        test_num_crops: int = 3,
        repeated_aug: int = 1,
        img_size: int = 224,
        batch_size: int = 32,
        auto_augment: str | None = "rand-m7-n4-mstd0.5-inc1",
        color_jitter: float = 0.0,
        crop_pct: float = 1.0,
        **kwargs,
    ) -> None:
        super().__init__(
            train_root=train_root,
            val_root=val_root,
            test_root=test_root,
            img_size=img_size,
            batch_size=batch_size,
            auto_augment=auto_augment,
            color_jitter=color_jitter,
            crop_pct=crop_pct,
            **kwargs,
        )
        counts = dict(
            num_frames=num_frames, test_num_clips=test_num_clips, test_num_crops=test_num_crops, repeated_aug=repeated_aug
        )
        for name, value in counts.items():
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        self.num_frames, self.test_num_clips, self.test_num_crops = num_frames, test_num_clips, test_num_crops
        self.repeated_aug = repeated_aug
        self.lists = {"train_root": train_list, "val_root": val_list, "test_root": test_list}
        self.data_root, self.classes_file = data_root, classes_file
        rand_augment(auto_augment)  # reject a bad policy now, not in a worker
        self._warned: set[tuple[str, str]] = set()

    # ---------------------------------------------------------------------------------------- samples
    @functools.cached_property
    def classes(self) -> list[str]:
        """Class names: from ``classes_file``, the train annotations or the train tree (else val / test).

        Read once: every split's samples and the classifier's setup ask for them, and a Kinetics list is long.
        """
        if self.classes_file is not None:
            return _classes_from_file(self.classes_file)
        for argument in ("train_root", "val_root", "test_root"):
            if self.lists[argument] is not None:
                return read_annotations(self.lists[argument], self.data_root, None, _list_name(argument))[1]
            if self.roots[argument] is not None:
                return find_classes(self.roots[argument], argument)
        raise ValueError("no labelled data: set data.train_root / train_list, val_root / val_list or test_root / test_list")

    def labelled_samples(self, argument: str) -> list[tuple[str, int]]:
        """``(path, class index)`` of the split that ``argument`` ("train_root", "val_root", "test_root") names."""
        if self.lists[argument] is not None:
            return read_annotations(self.lists[argument], self.data_root, self.classes, _list_name(argument))[0]
        root, classes = self.roots[argument], self.classes
        folders = find_classes(root, argument)
        unknown = sorted(set(folders) - set(classes))
        if unknown:
            raise ValueError(f"{argument}: class folders {unknown[:10]} of '{root}' are not among the {len(classes)} classes")
        samples = [(path, classes.index(name)) for name in folders for path in list_videos(Path(root, name))]
        if not samples:
            raise ValueError(f"{argument}: no video files ({', '.join(VIDEO_EXTENSIONS)}) or frame folders under '{root}'")
        return samples

    def _has(self, argument: str) -> bool:
        return self.roots[argument] is not None or self.lists[argument] is not None

    def _clips(self, argument: str, transform: Callable, train: bool = False, num_clips: int = 1) -> VideoClips:
        samples, repeats = self.labelled_samples(argument), self.repeated_aug if train else 1
        return VideoClips(samples, self.num_frames, transform, train, num_clips, self.min_image_size, repeats)

    def setup(self, stage: str) -> None:
        if stage == "fit":
            if not self._has("train_root"):
                raise ValueError("fit needs data.train_root (a class-folder tree) or data.train_list (an annotation file)")
            self.datasets["train"] = self._clips("train_root", self.train_transform(), train=True)
        if stage in ("fit", "validate") and self._has("val_root"):
            self.datasets["val"] = self._clips("val_root", self.eval_transform())
        if stage == "validate" and not self._has("val_root"):
            raise ValueError("validate needs data.val_root or data.val_list")
        if stage == "test":
            argument = "test_root" if self._has("test_root") else "val_root"
            if not self._has(argument):
                raise ValueError("test needs data.test_root / test_list or data.val_root / val_list")
            self.datasets["test"] = self._clips(argument, self.test_transform(), num_clips=self.test_num_clips)
        if stage == "predict":
            self.datasets["predict"] = self.unlabelled_split()

    def unlabelled_split(self) -> VideoClips:
        root = self.roots["predict_root"]
        if root is None or not Path(root).is_dir():
            raise ValueError(f"predict needs data.predict_root, a folder of videos; got '{root}'")
        files = list_videos(root)
        if not files:
            raise ValueError(f"predict_root: no video files ({', '.join(VIDEO_EXTENSIONS)}) or frame folders under '{root}'")
        return VideoClips(
            [(f, UNLABELLED) for f in files], self.num_frames, self.eval_transform(), min_image_size=self.min_image_size
        )

    # ---------------------------------------------------------------------------------------- transforms
    def _interpolation(self) -> InterpolationMode:
        return InterpolationMode(self.interpolation)

    def _normalize(self) -> v2.Transform:
        return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.mean, self.std), ToClip()])

    def train_transform(self) -> v2.Transform:
        """Random resized crop, flip, RandAugment, color jitter, normalisation, random erasing: (T, 3, H, W) -> (3, T, S, S)."""
        augment = self.augmentation
        steps = [
            v2.RandomResizedCrop(self.img_size, scale=augment["scale"], interpolation=self._interpolation(), antialias=True),
            v2.RandomHorizontalFlip(augment["hflip"]),
            rand_augment(augment["auto_augment"]),
            v2.ColorJitter(*(augment["color_jitter"],) * 3) if augment["color_jitter"] else None,
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(self.mean, self.std),
            v2.RandomErasing(augment["re_prob"], value="random") if augment["re_prob"] else None,
            ToClip(),
        ]
        return v2.Compose([step for step in steps if step is not None])

    def _resize(self) -> v2.Transform:
        return v2.Resize(math.floor(self.img_size / self.crop_pct), interpolation=self._interpolation(), antialias=True)

    def eval_transform(self) -> v2.Transform:
        """Resize the short side to ``img_size / crop_pct``, centre crop, normalise: (T, 3, H, W) -> (3, T, S, S)."""
        return v2.Compose([self._resize(), v2.CenterCrop(self.img_size), self._normalize()])

    def test_transform(self) -> MultiViewTransform:
        """``test_num_crops`` crops along the long side after the evaluation resize: a list of (1, 3, T, S, S)."""
        return MultiViewTransform(self._resize(), self.img_size, self.test_num_crops, self._normalize())

    # ---------------------------------------------------------------------------------------- reporting
    def on_before_batch_transfer(self, batch: ClipBatch, dataloader_idx: int) -> ClipBatch:
        """Report skipped (unreadable) videos with a running count, and each other problem once per video."""
        self.report_skipped(batch.skipped, "unreadable video")
        for path, note in batch.notes:
            if (path, note) not in self._warned:
                self._warned.add((path, note))
                warnings.warn(f"video '{path}': {note}", stacklevel=2)
        return batch


def _list_name(argument: str) -> str:
    return argument.replace("_root", "_list")


__all__ = [
    "ClipBatch",
    "FrameFolder",
    "LoadedClip",
    "UnreadableClip",
    "VideoClipDataModule",
    "VideoClips",
    "VideoReadError",
    "VideoFile",
    "collate_clips",
    "is_variable_frame_rate",
    "list_videos",
    "open_frames",
    "read_annotations",
    "segment_indices",
    "spatial_crops",
    "truncation_note",
]
