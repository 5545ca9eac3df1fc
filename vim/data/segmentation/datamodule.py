"""Semantic segmentation data: folders of images with their class masks, and the ADE20K layout."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from vim.data.images.dataset import IMAGE_EXTENSIONS, list_images
from vim.data.labelled import SPLITS, LabelledDataModule, paired_splits
from vim.data.segmentation.dataset import SegmentationFiles, collate_pairs, paired_masks
from vim.data.segmentation.transforms import segmentation_eval_transform, segmentation_train_transform


class SegmentationDataModule(LabelledDataModule):
    """Images and class masks in parallel folders: the mask of ``<split>_images/<path>.<ext>`` is
    ``<split>_masks/<path>.png`` (one class index per pixel; see :mod:`vim.data.segmentation.dataset`).

    A pair that cannot be read, or whose mask has another size than its image or values that are not class indices,
    is skipped with a warning naming the file and a running count; an image without a mask is an error at setup.

    Args:
        train_images, train_masks: the training pairs (``fit``).
        val_images, val_masks: validation pairs (and ``test``'s unless the test ones are given).
        test_images, test_masks: pairs for ``test``.
        predict_root: folder of images (any nesting) to segment with ``predict``.
        class_names: the classes in mask-value order (after ``reduce_zero_label``), or their count (named 0..K-1).
        reduce_zero_label: masks use 0 for "unlabelled" and 1..K for the classes (ADE20K): 0 becomes the ignore
            index 255 and k becomes k - 1.
        img_size: the training crop's side and the evaluation images' shorter side (the ``vimkit`` command gives it to
            the model too).
        scale: range of the random factor on ``img_size`` that the training images' shorter side is resized to.
        hflip: horizontal flip probability.
        color_jitter: brightness, contrast and saturation jitter (hue half of it); 0 disables.
        mean, std: per-channel normalisation.
        batch_size, num_workers, pin_memory, seed: as every data module (:class:`~vim.data.labelled.LabelledDataModule`).
    """

    skipped_sample = "unreadable image or mask"
    split_settings = "data.{split}_images and data.{split}_masks"
    collate_fn = staticmethod(collate_pairs)

    def __init__(
        self,
        train_images: str | None = None,
        train_masks: str | None = None,
        val_images: str | None = None,
        val_masks: str | None = None,
        test_images: str | None = None,
        test_masks: str | None = None,
        predict_root: str | None = None,
        class_names: list[str] | int | None = None,
        reduce_zero_label: bool = False,
        img_size: int = 512,
        scale: tuple[float, float] = (0.5, 2.0),
        hflip: float = 0.5,
        color_jitter: float = 0.2,
        mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN,
        std: tuple[float, float, float] = IMAGENET_DEFAULT_STD,
        batch_size: int = 16,
        num_workers: int | None = None,
        pin_memory: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, pin_memory, seed)
        self.save_hyperparameters()
        self.folders = paired_splits(
            "masks", train=(train_images, train_masks), val=(val_images, val_masks), test=(test_images, test_masks)
        )
        self.predict_root, self.class_names, self.reduce_zero_label = predict_root, class_names, reduce_zero_label
        self.img_size = img_size
        self.augmentation: dict[str, Any] = dict(scale=tuple(scale), hflip=hflip, color_jitter=color_jitter)
        self.normalisation: dict[str, Any] = dict(mean=tuple(mean), std=tuple(std))

    def read_classes(self) -> list[str] | None:
        """``class_names`` (a count becomes 0..K-1); None without labelled data. ValueError for labelled data without
        them."""
        if not any(self.has_split(split) for split in SPLITS):
            return None
        if self.class_names is None:
            raise ValueError("data.class_names is not set: give the classes in mask-value order, or their count")
        names = [str(i) for i in range(self.class_names)] if isinstance(self.class_names, int) else list(self.class_names)
        if not 1 <= len(names) <= 255:
            raise ValueError(f"data.class_names: {len(names)} classes; masks hold 1 to 255 classes (255 is the ignore index)")
        return names

    def has_split(self, split: str) -> bool:
        return self.folders[split][0] is not None

    def train_transform(self) -> Callable:
        return segmentation_train_transform(self.img_size, **self.augmentation, **self.normalisation)

    def eval_transform(self) -> Callable:
        return segmentation_eval_transform(self.img_size, **self.normalisation)

    def labelled_dataset(self, split: str, source: str) -> SegmentationFiles:
        images, masks = self.folders[source]
        assert images is not None and masks is not None  # has_split(source) was checked
        transform = self.train_transform() if split == "train" else self.eval_transform()
        return SegmentationFiles(paired_masks(images, masks, source), transform, len(self.classes), self.reduce_zero_label)

    def unlabelled_dataset(self) -> SegmentationFiles:
        root = self.predict_root
        if root is None or not Path(root).is_dir():
            raise ValueError(f"predict needs data.predict_root, a folder of images; got '{root}'")
        files = list_images(root)
        if not files:
            raise ValueError(f"predict_root: no image files ({', '.join(IMAGE_EXTENSIONS)}) under '{root}'")
        num_classes = len(self.classes) if self.num_classes is not None else 255
        return SegmentationFiles([(str(f), None) for f in files], self.eval_transform(), num_classes)


def ade20k_class_names(root: Path) -> list[str] | int:
    """The 150 class names of ADEChallengeData2016's ``objectInfo150.txt`` (the first name of each line's synonyms, in
    index order), or the count 150 where the file is absent."""
    info = root / "objectInfo150.txt"
    if not info.is_file():
        return 150
    rows = [line.split("\t") for line in info.read_text().splitlines()[1:] if line.strip()]
    names = [row[-1].split(",")[0].strip() for row in rows]
    if len(names) != 150:
        raise ValueError(f"'{info}' lists {len(names)} classes; ADE20K's scene parsing has 150")
    return names


class ADE20KDataModule(SegmentationDataModule):
    """ADE20K scene parsing (ADEChallengeData2016) as mmsegmentation reads it: ``root/images/{training,validation}``
    (JPEG) with ``root/annotations/{training,validation}`` (PNG), 150 classes, 0 ignored (``reduce_zero_label``).

    Args:
        root: the ADEChallengeData2016 folder.
        predict_root: folder of images to segment with ``predict``.
        **kwargs: any :class:`SegmentationDataModule` setting but the folders and classes (``img_size`` 512, ...).
    """

    def __init__(self, root: str, predict_root: str | None = None, **kwargs: Any) -> None:
        folder = Path(root)
        super().__init__(
            train_images=str(folder / "images" / "training"),
            train_masks=str(folder / "annotations" / "training"),
            val_images=str(folder / "images" / "validation"),
            val_masks=str(folder / "annotations" / "validation"),
            predict_root=predict_root,
            class_names=ade20k_class_names(folder),
            reduce_zero_label=True,
            **kwargs,
        )
