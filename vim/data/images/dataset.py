"""Image files as a dataset: every image read as RGB (grayscale, palette, CMYK, RGBA alike) and transformed;
an unreadable or corrupt file comes back as :class:`~vim.data.samples.Unreadable`, never an exception mid-epoch."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from PIL import Image
from torch.utils.data import Dataset

from vim.data.folders import walk_files
from vim.data.samples import Unreadable
from vim.data.sampling import SampleKey, seed_everything_from

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


class ImageFiles(Dataset):
    """Image files with class indices, read as RGB and transformed.

    Indexed by an int or a :class:`~vim.data.sampling.SampleKey`; with a key, the global random generators are seeded
    from ``key.seed`` first, so the random augmentation of a sample does not depend on worker scheduling. Unreadable
    files come back as :class:`~vim.data.samples.Unreadable` (left out by :func:`collate_images`); images with a
    shorter side below ``min_image_size`` are marked ``was_small``.
    """

    def __init__(self, samples: Sequence[tuple[str, int]], transform: Callable, min_image_size: int = 0) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.min_image_size = min_image_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | SampleKey) -> LoadedImage | Unreadable:
        index = key.index if isinstance(key, SampleKey) else key
        path, target = self.samples[index]
        try:
            image = read_rgb(path)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:  # PIL raises all of these
            return Unreadable(path, f"{type(err).__name__}: {err}")
        if isinstance(key, SampleKey):
            seed_everything_from(key.seed)
        return LoadedImage(self.transform(image), target, path, min(image.size) < self.min_image_size)


def collate_images(samples: Sequence[LoadedImage | Unreadable]) -> ImageBatch:
    """Stack the readable samples into an :class:`ImageBatch`; unreadable ones are listed in ``skipped``."""
    loaded = [s for s in samples if isinstance(s, LoadedImage)]
    skipped = [s for s in samples if isinstance(s, Unreadable)]
    images = torch.stack([s.image for s in loaded]) if loaded else torch.empty(0, 3, 0, 0)
    targets = torch.tensor([s.target for s in loaded], dtype=torch.long)
    return ImageBatch(images, targets, [s.path for s in loaded], skipped, [s.path for s in loaded if s.was_small])
