"""Detection and instance-segmentation data in the COCO layout: per split a folder of images and an instances JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torchvision.transforms import v2

from vim.data.detection.coco import CocoFile, read_coco
from vim.data.detection.dataset import DetectionFiles, collate_detections
from vim.data.detection.transforms import detection_transform
from vim.data.images import IMAGE_EXTENSIONS, list_images
from vim.data.labelled import SPLITS, LabelledDataModule, paired_splits


class DetectionDataModule(LabelledDataModule):
    """COCO-format detection data (boxes, and instance masks for Mask R-CNN) with aligned v2 augmentation.

    Classes are the categories of the annotations (the train file's, else val's or test's), sorted by id: category
    ``category_ids[k]`` is class name ``classes[k]`` and label ``k + 1`` (label 0 is torchvision's background). Every
    labelled split must define the same categories. The annotation checks (what raises at setup, what is clipped) are
    :mod:`vim.data.detection.coco`'s; an image that cannot be read, or whose size differs from its annotation's, is
    skipped with a warning and a running count. Images without objects are kept (empty targets).

    Args:
        train_images: folder of the training images (the JSON's ``file_name`` are relative to it).
        train_annotations: COCO instances JSON of the training images.
        val_images: folder of the validation images (and ``test``'s unless ``test_*`` are given).
        val_annotations: their COCO instances JSON.
        test_images: folder of the test images.
        test_annotations: their COCO instances JSON.
        predict_root: folder of images (any nesting) to detect objects in with ``predict``.
        masks: give each object's instance mask (decoded from its COCO polygons or RLE through pycocotools): on for
            Mask R-CNN, off for Faster R-CNN (no decoding).
        img_size: the evaluation images' shorter side (the longer one at most ``max_size``).
        max_size: the longest side an image is resized to; None: no limit.
        scale_range: the training images' shorter side, drawn per image from ``(lo, hi)``; None: ``img_size``.
        hflip: horizontal flip probability in training.
        color_jitter: brightness / contrast / saturation jitter strength in training (0: none).
        batch_size: images per device and step (global batch = batch_size x devices x nodes).
        num_workers: loader processes per device; None: one per free core (at most 8).
        pin_memory: page-locked host memory for faster copies to the GPU.
        seed: seed of the shuffling and of each image's augmentation (the same on every rank).
    """

    skipped_sample = "unreadable image"
    split_settings = "data.{split}_images and data.{split}_annotations (COCO)"
    collate_fn = staticmethod(collate_detections)

    def __init__(
        self,
        train_images: str | None = None,
        train_annotations: str | None = None,
        val_images: str | None = None,
        val_annotations: str | None = None,
        test_images: str | None = None,
        test_annotations: str | None = None,
        predict_root: str | None = None,
        masks: bool = True,
        img_size: int = 800,
        max_size: int | None = 1333,
        scale_range: tuple[int, int] | None = None,
        hflip: float = 0.5,
        color_jitter: float = 0.0,
        batch_size: int = 2,
        num_workers: int | None = None,
        pin_memory: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, pin_memory, seed)
        self.save_hyperparameters()
        self.splits = paired_splits(
            "annotations",
            train=(train_images, train_annotations),
            val=(val_images, val_annotations),
            test=(test_images, test_annotations),
        )
        self.predict_root, self.masks = predict_root, masks
        self.img_size, self.max_size = img_size, max_size
        self.augmentation: dict[str, Any] = dict(scale_range=scale_range, hflip=hflip, color_jitter=color_jitter)
        self._files: dict[str, CocoFile] = {}

    def coco(self, split: str) -> CocoFile:
        """The split's annotations, read and checked once."""
        if split not in self._files:
            folder, json_file = self.splits[split]
            if folder is None or json_file is None:
                raise ValueError(f"data.{split}_annotations is not set")
            self._files[split] = read_coco(json_file, folder, need_segmentations=self.masks)
        return self._files[split]

    def categories(self) -> list[tuple[int, str]] | None:
        """(category id, name) of the classes, sorted by id: the first labelled split's; None without one."""
        split = next((split for split in SPLITS if self.has_split(split)), None)
        return None if split is None else self.coco(split).categories

    def read_classes(self) -> list[str] | None:
        categories = self.categories()
        return None if categories is None else [name for _, name in categories]

    @property
    def category_ids(self) -> list[int]:
        """The COCO category id of each class (of label ``k + 1``)."""
        categories = self.categories()
        if categories is None:
            raise ValueError("no labelled data: the category ids come from data.{train,val,test}_annotations")
        return [category_id for category_id, _ in categories]

    def has_split(self, split: str) -> bool:
        return self.splits[split][1] is not None

    def train_transform(self) -> v2.Transform:
        return detection_transform(self.img_size, self.max_size, is_training=True, **self.augmentation)

    def eval_transform(self) -> v2.Transform:
        return detection_transform(self.img_size, self.max_size)

    def labelled_dataset(self, split: str, source: str) -> DetectionFiles:
        coco = self.coco(source)
        if coco.categories != self.categories():
            raise ValueError(
                f"data.{source}_annotations '{self.splits[source][1]}' defines other categories than the classes' "
                f"({coco.categories} against {self.categories()})"
            )
        labels = {category_id: k + 1 for k, category_id in enumerate(self.category_ids)}
        transform = self.train_transform() if split == "train" else self.eval_transform()
        return DetectionFiles(coco.images, transform, labels, with_masks=self.masks)

    def unlabelled_dataset(self) -> DetectionFiles:
        root = self.predict_root
        if root is None or not Path(root).is_dir():
            raise ValueError(f"predict needs data.predict_root, a folder of images; got '{root}'")
        files = list_images(root)
        if not files:
            raise ValueError(f"predict_root: no image files ({', '.join(IMAGE_EXTENSIONS)}) under '{root}'")
        return DetectionFiles([str(f) for f in files], self.eval_transform())
