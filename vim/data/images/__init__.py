"""Image classification data: ImageFolder trees (:class:`ImageDataModule`), the image dataset, and the image
transform every caller asks for (:func:`create_image_transform`)."""

from vim.data.folders import find_classes
from vim.data.images.datamodule import ImageDataModule
from vim.data.images.dataset import (
    IMAGE_EXTENSIONS,
    ImageBatch,
    ImageFiles,
    LoadedImage,
    collate_images,
    list_images,
    read_rgb,
)
from vim.data.images.transforms import create_image_transform
from vim.data.samples import UNLABELLED

__all__ = [
    "IMAGE_EXTENSIONS",
    "UNLABELLED",
    "ImageBatch",
    "ImageDataModule",
    "ImageFiles",
    "LoadedImage",
    "collate_images",
    "create_image_transform",
    "find_classes",
    "list_images",
    "read_rgb",
]
