"""Videos as a dataset of clips: frames sampled, decoded and transformed; bad input returned, never raised.

A sample that gives no frame (an empty, corrupt or unopenable file, a stream without frames) comes back as
:class:`~vim.data.samples.Unreadable`; other problems are notes on the loaded clip (a clip shorter than
``num_frames`` is stretched by repeating frames, frames smaller than ``min_image_size`` are upsampled, and the
notes of :mod:`vim.data.video.decoding`).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torchvision import tv_tensors

from vim.data.samples import SampleFiles, Unreadable
from vim.data.video.decoding import FrameFolder, VideoFile, open_frames, read_errors
from vim.data.video.sampling import segment_indices


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
    skipped: list[Unreadable]
    notes: list[tuple[str, str]]


class VideoClips(SampleFiles):
    """Videos with class indices, sampled into clips and transformed.

    Args:
        samples: ``(path, class index)`` pairs (a path may be a video file or a frame folder).
        num_frames: frames per clip.
        transform: v2 transform of a (T, 3, H, W) ``tv_tensors.Video`` to a (3, T, H, W) clip (after
            :class:`~vim.data.video.transforms.ToClip`), or a callable returning a list of such views (test).
        train: random segment offsets (else fixed, ``num_clips`` clips).
        num_clips: temporal clips per video at evaluation.
        min_image_size: frames with a shorter side below this are reported.
        repeats: training only: augment the frames of one segment sample this many times (VideoMamba's
            ``num_sample``, repeated augmentation): the video is decoded once and gives ``repeats`` clips.

    Indexed by an int or a :class:`~vim.data.sampling.SampleKey` (whose seed fixes the sample's randomness).
    Returns :class:`LoadedClip`, or :class:`~vim.data.samples.Unreadable` for a file that gives no frame.
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
        super().__init__(samples)
        self.num_frames, self.transform, self.train, self.num_clips = num_frames, transform, train, num_clips
        self.min_image_size, self.repeats = min_image_size, repeats

    def load(self, path: str, target: int) -> LoadedClip:
        frames = open_frames(path)
        if self.train:  # one segment sample, augmented `repeats` times
            video = frames.take(segment_indices(len(frames), self.num_frames, random))
            views = [self._transformed(video) for _ in range(self.repeats)]
            clip = views[0] if self.repeats == 1 else torch.stack(views)  # repeats: (R, 3, T, S, S)
        else:  # every clip's frames decoded in one pass over the file
            indices = [
                i for c in range(self.num_clips) for i in segment_indices(len(frames), self.num_frames, None, c, self.num_clips)
            ]
            views = [self._transformed(video) for video in frames.take(indices).split(self.num_frames)]
            clip = views[0] if len(views) == 1 else torch.cat(views)  # test: (clips x crops, 3, T, S, S)
        return LoadedClip(clip, target, path, tuple(frames.notes) + self._size_notes(frames), self.repeats)

    def read_errors(self) -> tuple[type[Exception], ...]:
        return read_errors()

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


def collate_clips(samples: Sequence[LoadedClip | Unreadable]) -> ClipBatch:
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
        [s for s in samples if isinstance(s, Unreadable)],
        [(s.path, note) for s in loaded for note in s.notes],
    )
