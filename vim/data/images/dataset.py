"""Image files as a dataset: every image read as RGB (grayscale, palette, CMYK, RGBA alike) and transformed;
an unreadable or corrupt file comes back as :class:`~vim.data.samples.Unreadable`, never an exception mid-epoch."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from PIL import Image

from vim.data.folders import walk_files
from vim.data.samples import SampleFiles, Unreadable

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")


class LoadedImage(NamedTuple):
    """One transformed image: ``image`` (3, H, W), its class index (``UNLABELLED`` for predict) and file."""

    image: torch.Tensor
    target: int
    path: str
    was_small: bool


class ImageBatch(NamedTuple):
    """A collated batch: ``images`` (B, 3, H, W), ``targets`` (B,), the B file paths, and what was left out or upsampled."""

    images: torch.Tensor
    targets: torch.Tensor
    paths: list[str]
    skipped: list[Unreadable]
    small: list[str]


def list_images(root: str | os.PathLike) -> list[Path]:
    """All image files (by extension) under ``root``, recursively, in sorted order."""
    return walk_files(root, lambda name: name.lower().endswith(IMAGE_EXTENSIONS))


def read_rgb(path: str) -> Image.Image:
    """Decode an image file fully and convert it to RGB (grayscale, palette, CMYK and RGBA images alike)."""
    with Image.open(path) as image:
        image.load()
        return image.convert("RGB")


class ImageFiles(SampleFiles):
    """Image files with class indices, read as RGB and transformed.

    Indexed by an int or a :class:`~vim.data.sampling.SampleKey` (whose seed fixes the sample's augmentation).
    Unreadable files come back as :class:`~vim.data.samples.Unreadable` (left out by :func:`collate_images`); images
    with a shorter side below ``min_image_size`` are marked ``was_small``.
    """

    def __init__(self, samples: Sequence[tuple[str, int]], transform: Callable, min_image_size: int = 0) -> None:
        super().__init__(samples)
        self.transform = transform
        self.min_image_size = min_image_size

    def load(self, path: str, target: int) -> LoadedImage:
        image = read_rgb(path)
        return LoadedImage(self.transform(image), target, path, min(image.size) < self.min_image_size)

    def read_errors(self) -> tuple[type[Exception], ...]:
        return (OSError, ValueError, SyntaxError, Image.DecompressionBombError)  # PIL raises all of these


def collate_images(samples: Sequence[LoadedImage | Unreadable]) -> ImageBatch:
    """Stack the readable samples into an :class:`ImageBatch`; unreadable ones are listed in ``skipped``."""
    loaded = [s for s in samples if isinstance(s, LoadedImage)]
    skipped = [s for s in samples if isinstance(s, Unreadable)]
    images = torch.stack([s.image for s in loaded]) if loaded else torch.empty(0, 3, 0, 0)
    targets = torch.tensor([s.target for s in loaded], dtype=torch.long)
    return ImageBatch(images, targets, [s.path for s in loaded], skipped, [s.path for s in loaded if s.was_small])
