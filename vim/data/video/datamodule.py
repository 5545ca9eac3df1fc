"""Video clip classification data: folders of videos or of extracted frames, Kinetics / Something-Something lists."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from vim.data.folders import find_classes, labelled_class_folders
from vim.data.labelled import LabelledDataModule
from vim.data.samples import UNLABELLED
from vim.data.video.annotations import classes_from_file, list_videos, read_annotations
from vim.data.video.dataset import ClipBatch, VideoClips, collate_clips
from vim.data.video.decoding import VIDEO_EXTENSIONS
from vim.data.video.transforms import create_video_test_transform, create_video_transform, rand_augment


class VideoClipDataModule(LabelledDataModule):
    """Video classification data: clips (B, 3, T, H, W) for training and validation and, for ``test``,
    ``test_num_clips x test_num_crops`` views per video (B, V, 3, T, H, W) whose predictions the classifier averages
    (VideoMamba's 4 clips x 3 crops on Kinetics).

    Samples come from a folder-per-class tree ``root/<class>/<video file>`` (a sample may also be a folder of
    extracted frames ``root/<class>/<video>/<frame>.jpg``), or from an annotation list (see
    :mod:`vim.data.video.annotations`). Training draws ``num_frames`` frames by segment sampling
    (:mod:`vim.data.video.sampling`); augmentation runs on whole clips (:func:`~vim.data.video.create_video_transform`).
    Bad input never stops an epoch: a video that gives no frame is skipped with a warning and a running count; other
    problems (a truncated file, too few frames, small frames, variable frame rate) are warned about once per video.

    Args:
        num_frames: frames per clip (the ``vimkit`` command gives it to the model too).
        train_root, val_root, test_root: class-folder trees of video files or frame folders.
        train_list, val_list, test_list: annotation files, used instead of the corresponding ``*_root`` tree.
        predict_root: folder of videos (any nesting) to classify with ``predict``.
        data_root: prefix of relative paths in the annotation files.
        classes_file: class names by index (JSON ``{name: index}`` / list, or one per line); required for SSv2.
        test_num_clips: temporal clips per video for ``test``.
        test_num_crops: spatial crops per clip for ``test`` (1 centre, 3 left / centre / right).
        repeated_aug: training clips per video and step (VideoMamba's ``num_sample``): each video is decoded
            once and augmented this many times, so a batch of ``batch_size`` videos holds
            ``batch_size * repeated_aug`` clips. 1: off.
        img_size: side of the square frames fed to the model (the ``vimkit`` command gives it to the model too).
        batch_size: videos per device and step.
        num_workers: loader processes per device; None: one per free core (at most 8).
        pin_memory: page-locked host memory for faster copies to the GPU.
        seed: seed of the shuffling and of each sample's frame choice and augmentation.
        auto_augment: RandAugment in timm's syntax (``rand-m7-n4-...``), or None.
        color_jitter: color jitter strength.
        re_prob: random erasing probability.
        interpolation: resize interpolation.
        hflip: horizontal flip probability (0 for Something-Something, where left and right differ).
        scale: random-resized-crop area range.
        crop_pct: evaluation resize of the short side to ``img_size / crop_pct`` before the crop.
        mean: per-channel normalization mean.
        std: per-channel normalization std.
        min_image_size: frames with a shorter side below this are reported as upsampled.
    """

    skipped_sample = "unreadable video"
    split_settings = "data.{split}_root (a class-folder tree) or data.{split}_list (an annotation file)"
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
        predict_root: str | None = None,
        data_root: str | None = None,
        classes_file: str | None = None,
        test_num_clips: int = 4,
        test_num_crops: int = 3,
        repeated_aug: int = 1,
        img_size: int = 224,
        batch_size: int = 32,
        num_workers: int | None = None,
        pin_memory: bool = True,
        seed: int = 0,
        auto_augment: str | None = "rand-m7-n4-mstd0.5-inc1",
        color_jitter: float = 0.0,
        re_prob: float = 0.25,
        interpolation: str = "bicubic",
        hflip: float = 0.5,
        scale: tuple[float, float] = (0.08, 1.0),
        crop_pct: float = 1.0,
        mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN,
        std: tuple[float, float, float] = IMAGENET_DEFAULT_STD,
        min_image_size: int = 16,
    ) -> None:
        super().__init__(batch_size, num_workers, pin_memory, seed)
        self.save_hyperparameters()
        counts = dict(
            num_frames=num_frames, test_num_clips=test_num_clips, test_num_crops=test_num_crops, repeated_aug=repeated_aug
        )
        for name, value in counts.items():
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        rand_augment(auto_augment)  # reject a bad policy now, not in a worker
        self.num_frames, self.test_num_clips, self.test_num_crops = num_frames, test_num_clips, test_num_crops
        self.repeated_aug, self.img_size, self.min_image_size = repeated_aug, img_size, min_image_size
        self.roots = {"train": train_root, "val": val_root, "test": test_root, "predict": predict_root}
        self.lists = {"train": train_list, "val": val_list, "test": test_list}
        self.data_root, self.classes_file = data_root, classes_file
        self.transform_settings: dict[str, Any] = dict(
            interpolation=interpolation, crop_pct=crop_pct, mean=tuple(mean), std=tuple(std)
        )
        self.augmentation: dict[str, Any] = dict(
            auto_augment=auto_augment, color_jitter=color_jitter, re_prob=re_prob, hflip=hflip, scale=tuple(scale)
        )

    # ---------------------------------------------------------------------------------------- samples
    def read_classes(self) -> list[str] | None:
        """Class names: from ``classes_file``, the train annotations or the train tree (else val / test)."""
        if self.classes_file is not None:
            return classes_from_file(self.classes_file)
        for split in ("train", "val", "test"):
            if (annotations := self.lists[split]) is not None:
                return read_annotations(annotations, self.data_root, None, f"{split}_list")[1]
            if (root := self.roots[split]) is not None:
                return find_classes(root, f"{split}_root")
        return None

    def has_split(self, split: str) -> bool:
        return self.roots[split] is not None or self.lists[split] is not None

    def labelled_samples(self, split: str) -> list[tuple[str, int]]:
        """``(path, class index)`` of ``split`` ("train", "val" or "test")."""
        if (annotations := self.lists[split]) is not None:
            return read_annotations(annotations, self.data_root, self.classes, f"{split}_list")[0]
        root, classes, argument = self.roots[split], self.classes, f"{split}_root"
        if root is None:
            raise ValueError(f"data.{argument} or data.{split}_list is not set")
        return labelled_class_folders(
            root, classes, argument, list_videos, "video files or frame folders", VIDEO_EXTENSIONS, split == "train"
        )

    # ---------------------------------------------------------------------------------------- transforms
    def train_transform(self) -> Callable:
        return create_video_transform(self.img_size, is_training=True, **self.transform_settings, **self.augmentation)

    def eval_transform(self) -> Callable:
        return create_video_transform(self.img_size, **self.transform_settings)

    def test_transform(self) -> Callable:
        return create_video_test_transform(self.img_size, self.test_num_crops, **self.transform_settings)

    # ---------------------------------------------------------------------------------------- datasets
    def labelled_dataset(self, split: str, source: str) -> VideoClips:
        samples = self.labelled_samples(source)
        if split == "train":
            transform = self.train_transform()
            return VideoClips(samples, self.num_frames, transform, True, 1, self.min_image_size, self.repeated_aug)
        transform, num_clips = (self.test_transform(), self.test_num_clips) if split == "test" else (self.eval_transform(), 1)
        return VideoClips(samples, self.num_frames, transform, num_clips=num_clips, min_image_size=self.min_image_size)

    def unlabelled_dataset(self) -> VideoClips:
        root = self.roots["predict"]
        if root is None or not Path(root).is_dir():
            raise ValueError(f"predict needs data.predict_root, a folder of videos; got '{root}'")
        files = list_videos(root)
        if not files:
            raise ValueError(f"predict_root: no video files ({', '.join(VIDEO_EXTENSIONS)}) or frame folders under '{root}'")
        samples = [(f, UNLABELLED) for f in files]
        return VideoClips(samples, self.num_frames, self.eval_transform(), min_image_size=self.min_image_size)

    def notes(self, batch: ClipBatch) -> list[str]:
        return [f"video '{path}': {note}" for path, note in batch.notes]
