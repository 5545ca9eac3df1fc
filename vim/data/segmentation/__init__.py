"""Semantic segmentation data: images with class masks (:class:`SegmentationDataModule`, :class:`ADE20KDataModule`),
read, checked and augmented together."""

from vim.data.segmentation.datamodule import ADE20KDataModule, SegmentationDataModule, ade20k_class_names
from vim.data.segmentation.dataset import SegmentationBatch, SegmentationFiles, collate_pairs, read_mask
from vim.data.segmentation.transforms import IGNORE_INDEX, segmentation_eval_transform, segmentation_train_transform

__all__ = [
    "IGNORE_INDEX",
    "ADE20KDataModule",
    "SegmentationBatch",
    "SegmentationDataModule",
    "SegmentationFiles",
    "ade20k_class_names",
    "collate_pairs",
    "read_mask",
    "segmentation_eval_transform",
    "segmentation_train_transform",
]
