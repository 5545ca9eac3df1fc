"""Detection and instance-segmentation data in the COCO layout (:class:`DetectionDataModule`): annotations read and
checked once (:mod:`~vim.data.detection.coco`), images with torchvision detectors' targets, aligned v2 transforms."""

from vim.data.detection.coco import BOX_SLACK, CocoFile, CocoImage, decode_masks, read_coco, xywh_to_xyxy
from vim.data.detection.datamodule import DetectionDataModule
from vim.data.detection.dataset import DetectionBatch, DetectionFiles, LoadedDetection, collate_detections
from vim.data.detection.transforms import detection_transform

__all__ = [
    "BOX_SLACK",
    "CocoFile",
    "CocoImage",
    "DetectionBatch",
    "DetectionDataModule",
    "DetectionFiles",
    "LoadedDetection",
    "collate_detections",
    "decode_masks",
    "detection_transform",
    "read_coco",
    "xywh_to_xyxy",
]
