"""Image classification data in the ImageFolder (ImageNet) layout: ``root/<class>/<image>``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from vim.data.folders import check_same_classes, find_classes, labelled_files
from vim.data.images.dataset import IMAGE_EXTENSIONS, ImageBatch, ImageFiles, collate_images, list_images
from vim.data.images.transforms import create_image_transform
from vim.data.labelled import LabelledDataModule
from vim.data.samples import UNLABELLED


class ImageDataModule(LabelledDataModule):
    """ImageFolder-layout image classification data with timm's training and evaluation transforms.

    Robust to real-world folders: every image is converted to RGB, unreadable or corrupt files are skipped with a
    warning and a running count (never a crash mid-epoch), an empty class folder is reported, and images smaller
    than ``min_image_size`` (one patch) are upsampled by the transform with a warning.

    Args:
        train_root: ``<class>/<image>`` tree for ``fit``; its folders are the classes.
        val_root: same classes, for validation (and ``test`` unless ``test_root`` is given).
        test_root: tree for ``test``.
        predict_root: folder of images (any nesting) to classify with ``predict``.
        img_size: side of the square model input (the ``vimkit`` command gives it to the model too).
        batch_size: images per device and step (global batch = batch_size x devices x nodes).
        num_workers: loader processes per device; None: one per free core (at most 8).
        pin_memory: page-locked host memory for faster copies to the GPU.
        seed: seed of the shuffling and of each sample's augmentation (same on every rank).
        auto_augment: timm auto-augment policy, e.g. ``rand-m9-mstd0.5-inc1`` (RandAugment), or None.
        color_jitter: color jitter strength.
        re_prob: random erasing probability.
        interpolation: resize interpolation (``bicubic``, ``bilinear``, ...).
        hflip: horizontal flip probability.
        scale: random-resized-crop area range.
        crop_pct: evaluation center-crop fraction (resize to img_size / crop_pct, then crop).
        mean: per-channel normalization mean.
        std: per-channel normalization std.
        min_image_size: images with a shorter side below this (use the model's patch size) are reported as upsampled.
    """

    skipped_sample = "unreadable image"
    split_settings = "data.{split}_root (an ImageFolder tree)"
    collate_fn = staticmethod(collate_images)

    def __init__(
        self,
        train_root: str | None = None,
        val_root: str | None = None,
        test_root: str | None = None,
        predict_root: str | None = None,
        img_size: int = 224,
        batch_size: int = 128,
        num_workers: int | None = None,
        pin_memory: bool = True,
        seed: int = 0,
        auto_augment: str | None = "rand-m9-mstd0.5-inc1",
        color_jitter: float = 0.3,
        re_prob: float = 0.25,
        interpolation: str = "bicubic",
        hflip: float = 0.5,
        scale: tuple[float, float] = (0.08, 1.0),
        crop_pct: float = 0.875,
        mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN,
        std: tuple[float, float, float] = IMAGENET_DEFAULT_STD,
        min_image_size: int = 16,
    ) -> None:
        super().__init__(batch_size, num_workers, pin_memory, seed)
        self.save_hyperparameters()
        self.roots = {"train": train_root, "val": val_root, "test": test_root, "predict": predict_root}
        self.img_size, self.min_image_size = img_size, min_image_size
        self.transform_settings: dict[str, Any] = dict(
            interpolation=interpolation, crop_pct=crop_pct, mean=tuple(mean), std=tuple(std)
        )
        self.augmentation: dict[str, Any] = dict(
            auto_augment=auto_augment, color_jitter=color_jitter, re_prob=re_prob, hflip=hflip, scale=tuple(scale)
        )

    def read_classes(self) -> list[str] | None:
        """The class folders of the train root (or of the val / test root when there is none)."""
        for split in ("train", "val", "test"):
            if (root := self.roots[split]) is not None:
                return find_classes(root, f"{split}_root")
        return None

    def has_split(self, split: str) -> bool:
        return self.roots[split] is not None

    def train_transform(self) -> Callable:
        return create_image_transform(self.img_size, is_training=True, **self.transform_settings, **self.augmentation)

    def eval_transform(self) -> Callable:
        return create_image_transform(self.img_size, **self.transform_settings)

    def labelled_dataset(self, split: str, source: str) -> ImageFiles:
        argument = f"{source}_root"
        root = self.roots[source]
        if root is None:
            raise ValueError(f"data.{argument} is not set")
        folders = find_classes(root, argument)
        if source != "train" and self.has_split("train"):
            check_same_classes(self.classes, folders, argument)
        samples = labelled_files(
            root, folders, argument, list_images, "image files", IMAGE_EXTENSIONS, empty_is_error=source == "train"
        )
        transform = self.train_transform() if split == "train" else self.eval_transform()
        return ImageFiles(samples, transform, self.min_image_size)

    def unlabelled_dataset(self) -> ImageFiles:
        root = self.roots["predict"]
        if root is None or not Path(root).is_dir():
            raise ValueError(f"predict needs data.predict_root, a folder of images; got '{root}'")
        files = list_images(root)
        if not files:
            raise ValueError(f"predict_root: no image files ({', '.join(IMAGE_EXTENSIONS)}) under '{root}'")
        return ImageFiles([(str(f), UNLABELLED) for f in files], self.eval_transform(), self.min_image_size)

    def notes(self, batch: ImageBatch) -> list[str]:
        return [
            f"image '{path}' is smaller than min_image_size={self.min_image_size} px (one patch); "
            f"it is upsampled to img_size={self.img_size}"
            for path in batch.small
        ]
