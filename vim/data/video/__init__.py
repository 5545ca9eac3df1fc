"""Video clip classification data, by concern: :mod:`~vim.data.video.decoding` (PyAV files, frame folders),
:mod:`~vim.data.video.sampling` (which frames make a clip), :mod:`~vim.data.video.annotations` (class folders,
Kinetics / Something-Something lists), :mod:`~vim.data.video.transforms` (clip transforms for every caller),
:mod:`~vim.data.video.dataset` (clips, batches) and :mod:`~vim.data.video.datamodule` (:class:`VideoClipDataModule`)."""

from vim.data.video.annotations import classes_from_file, list_videos, read_annotations
from vim.data.video.datamodule import VideoClipDataModule
from vim.data.video.dataset import ClipBatch, LoadedClip, VideoClips, collate_clips
from vim.data.video.decoding import (
    VIDEO_EXTENSIONS,
    FrameFolder,
    VideoFile,
    VideoReadError,
    is_variable_frame_rate,
    open_frames,
    truncation_note,
)
from vim.data.video.sampling import segment_indices
from vim.data.video.transforms import (
    MultiViewTransform,
    ToClip,
    create_video_test_transform,
    create_video_transform,
    rand_augment,
    spatial_crops,
)

__all__ = [
    "VIDEO_EXTENSIONS",
    "ClipBatch",
    "FrameFolder",
    "LoadedClip",
    "MultiViewTransform",
    "ToClip",
    "VideoClipDataModule",
    "VideoClips",
    "VideoFile",
    "VideoReadError",
    "classes_from_file",
    "collate_clips",
    "create_video_test_transform",
    "create_video_transform",
    "is_variable_frame_rate",
    "list_videos",
    "open_frames",
    "rand_augment",
    "read_annotations",
    "segment_indices",
    "spatial_crops",
    "truncation_note",
]
