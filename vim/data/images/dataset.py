"""Image files as a dataset: every image read as RGB (grayscale, palette, CMYK, RGBA, 16-bit alike) and transformed;
an unreadable or corrupt file comes back as :class:`~vim.data.samples.Unreadable`, never an exception mid-epoch."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
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
    """Decode an image file fully and convert it to RGB (grayscale, palette, CMYK and RGBA images alike; 16-bit,
    32-bit integer and float grayscale scaled to 8 bits by :func:`to_8_bit`)."""
    with Image.open(path) as image:
        image.load()
        if image.mode == "F" or image.mode.startswith("I"):
            image = to_8_bit(image, path)
        return image.convert("RGB")


def to_8_bit(image: Image.Image, path: str) -> Image.Image:
    """A one-channel image of more than 8 bits as 8-bit grayscale (mode ``L``), scaled by its type's range rather than
    clipped at 255 as ``convert`` does (a 16-bit gradient would come out as 0 and 255 only).

    - ``I;16``, ``I;16B``, ``I;16L`` (16-bit PNG, TIFF): divided by 65535.
    - ``I`` (32-bit integer; also how PIL reads 16-bit PGM, scaled to 65535 whatever its maxval): divided by 65535 when
      its values fit in 16 bits, else by the image's own maximum, as a 32-bit image has no range to go by.
    - ``F`` (32-bit float TIFF): read as [0, 1], the usual range of float images. Values outside are refused, not
      clipped: a float image in [0, 255] would saturate almost entirely, as 16-bit ones did.

    16-bit RGB(A) and gray-with-alpha PNGs need none of this: PIL reads them as 8-bit ``RGB(A)`` (their high bytes).

    Raises:
        ValueError naming ``path``: a negative integer value, a float one outside [0, 1], NaN or infinity, which
        no fixed scale turns into pixels (the data module skips the file with a warning).
    """
    values = np.asarray(image, dtype=np.float32)  # (H, W); exact for 16-bit values, ample for an 8-bit result
    if not np.isfinite(values).all():
        raise ValueError(f"image '{path}' (mode {image.mode}) holds NaN or infinite values")
    low, high = float(values.min()), float(values.max())
    if image.mode == "F":
        if low < 0 or high > 1:
            raise ValueError(f"float image '{path}' has values in [{low:g}, {high:g}]; float images are read as [0, 1]")
        scale = 1.0
    elif low < 0:
        raise ValueError(f"image '{path}' (mode {image.mode}) has negative values (down to {low:g})")
    else:
        scale = max(high, 65535.0)
    return Image.fromarray(np.rint(values * (255 / scale)).astype(np.uint8))


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
