"""Images and their class masks as a dataset: each pair read, checked and transformed together; a pair that cannot be
read or fails its checks comes back as :class:`~vim.data.samples.Unreadable` (skipped and counted), never an exception
mid-epoch.

A mask is a one-channel PNG (mode ``L`` or ``P``, or 16-bit) holding a class index per pixel, the size of its image.
Its values must be class indices (``0 .. num_classes - 1``) or :data:`~vim.data.segmentation.transforms.IGNORE_INDEX`
(after ``reduce_zero_label``, which turns ADE20K's 0 = "other" into the ignore index and 1..150 into 0..149).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms.v2.functional import pil_to_tensor

from vim.data.images.dataset import IMAGE_EXTENSIONS, list_images, read_rgb
from vim.data.samples import UNLABELLED, SampleFiles, Unreadable
from vim.data.segmentation.transforms import IGNORE_INDEX

MASK_EXTENSION = ".png"


class LoadedPair(NamedTuple):
    """One transformed pair: ``image`` (3, h, w), ``mask`` (H, W) int64 (empty for ``predict``), the image file, and the
    image's original size (H, W)."""

    image: torch.Tensor
    mask: torch.Tensor
    path: str
    size: tuple[int, int]


class SegmentationBatch(NamedTuple):
    """A collated batch: ``images`` (B, 3, h, w) zero-padded to the largest of the batch, ``masks`` (B, H, W) padded
    with the ignore index, the B image files, their transformed sizes (h_i, w_i) and original sizes (H_i, W_i), and
    the pairs left out."""

    images: torch.Tensor
    masks: torch.Tensor
    paths: list[str]
    image_sizes: list[tuple[int, int]]
    sizes: list[tuple[int, int]]
    skipped: list[Unreadable]


def read_mask(path: str, image_size: tuple[int, int], num_classes: int, reduce_zero_label: bool) -> np.ndarray:
    """The (H, W) uint8 class indices of the mask file ``path`` for an image of ``image_size`` (W, H), as PIL gives it.

    Raises:
        ValueError naming the file: an RGB(A) mask, a size other than the image's, values that are neither class
            indices nor the ignore index.
    """
    with Image.open(path) as mask_file:
        mask_file.load()
        if mask_file.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L", "1"):
            raise ValueError(f"mask '{path}' is a {mask_file.mode} image; a mask holds one class index per pixel (mode L or P)")
        if mask_file.size != image_size:
            width, height = mask_file.size
            raise ValueError(f"mask '{path}' is {width}x{height} but its image is {image_size[0]}x{image_size[1]}")
        values = np.asarray(mask_file, dtype=np.int64)
    if reduce_zero_label:
        unlabelled = (values == 0) | (values == IGNORE_INDEX)
        values = np.where(unlabelled, IGNORE_INDEX + 1, values) - 1  # 0 ("other") and 255 -> ignored, k -> k - 1
    bad = np.unique(values[(values >= num_classes) & (values != IGNORE_INDEX) | (values < 0)])
    if len(bad):
        shown = ", ".join(str(v + int(reduce_zero_label)) for v in bad[:5]) + (", ..." if len(bad) > 5 else "")
        classes = f"classes 1..{num_classes} (reduce_zero_label)" if reduce_zero_label else f"class indices 0..{num_classes - 1}"
        raise ValueError(f"mask '{path}' has values {shown} that are neither {classes} nor the ignore index {IGNORE_INDEX}")
    return values.astype(np.uint8)


def paired_masks(images_root: str, masks_root: str, argument: str) -> list[tuple[str, str]]:
    """``(image, mask)`` for every image under ``images_root``: its mask is the file of the same relative path under
    ``masks_root`` with a ``.png`` suffix. ValueError naming ``argument`` for a missing folder, no images, or images
    without masks (up to five named, and their count)."""
    for root, name in ((images_root, f"{argument}_images"), (masks_root, f"{argument}_masks")):
        if not Path(root).is_dir():
            raise ValueError(f"data.{name}: '{root}' does not exist or is not a directory")
    images = list_images(images_root)
    if not images:
        raise ValueError(f"data.{argument}_images: no image files ({', '.join(IMAGE_EXTENSIONS)}) under '{images_root}'")
    pairs = [(str(image), str(Path(masks_root, image.relative_to(images_root)).with_suffix(MASK_EXTENSION))) for image in images]
    missing = [image for image, mask in pairs if not Path(mask).is_file()]
    if missing:
        raise ValueError(
            f"data.{argument}_masks: {len(missing)} of the {len(pairs)} images under '{images_root}' have no mask "
            f"(<same relative path>{MASK_EXTENSION} under '{masks_root}'), e.g. {', '.join(missing[:5])}"
        )
    return pairs


class SegmentationFiles(SampleFiles):
    """Images with their masks (``mask_files[i]`` for target ``i``; :data:`~vim.data.samples.UNLABELLED`: no mask, for
    ``predict``), read, checked (:func:`read_mask`) and transformed together by ``transform(image, mask)``."""

    def __init__(
        self,
        pairs: Sequence[tuple[str, str | None]],
        transform: Callable,
        num_classes: int,
        reduce_zero_label: bool = False,
    ) -> None:
        super().__init__([(image, i if mask is not None else UNLABELLED) for i, (image, mask) in enumerate(pairs)])
        self.mask_files = [mask for _, mask in pairs]
        self.transform, self.num_classes, self.reduce_zero_label = transform, num_classes, reduce_zero_label

    def load(self, path: str, target: int) -> LoadedPair:
        rgb = read_rgb(path)
        if target == UNLABELLED:
            values = np.full((rgb.height, rgb.width), IGNORE_INDEX, dtype=np.uint8)
        else:
            mask_file = self.mask_files[target]
            assert mask_file is not None  # a labelled target has its mask
            values = read_mask(mask_file, rgb.size, self.num_classes, self.reduce_zero_label)
        image, mask = self.transform(tv_tensors.Image(pil_to_tensor(rgb)), tv_tensors.Mask(torch.from_numpy(values)))
        if target == UNLABELLED:
            mask = mask[:0, :0]
        return LoadedPair(image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor), path, (rgb.height, rgb.width))

    def read_errors(self) -> tuple[type[Exception], ...]:
        return (OSError, ValueError, SyntaxError, Image.DecompressionBombError)  # PIL raises all of these


def pad_to(tensor: torch.Tensor, height: int, width: int, value: float) -> torch.Tensor:
    """``tensor`` (..., h, w) padded at the bottom and right to (..., height, width) with ``value``."""
    return F.pad(tensor, (0, width - tensor.shape[-1], 0, height - tensor.shape[-2]), value=value)


def collate_pairs(samples: Sequence[LoadedPair | Unreadable]) -> SegmentationBatch:
    """Pad and stack the readable pairs into a :class:`SegmentationBatch`; unreadable ones are listed in ``skipped``."""
    loaded = [s for s in samples if isinstance(s, LoadedPair)]
    skipped = [s for s in samples if isinstance(s, Unreadable)]
    if not loaded:
        return SegmentationBatch(torch.empty(0, 3, 0, 0), torch.empty(0, 0, 0, dtype=torch.long), [], [], [], skipped)
    height, width = (max(s.image.shape[axis] for s in loaded) for axis in (-2, -1))
    mask_height, mask_width = (max(s.mask.shape[axis] for s in loaded) for axis in (-2, -1))
    images = torch.stack([pad_to(s.image, height, width, 0.0) for s in loaded])
    masks = torch.stack([pad_to(s.mask, mask_height, mask_width, IGNORE_INDEX) for s in loaded])
    image_sizes = [(s.image.shape[-2], s.image.shape[-1]) for s in loaded]
    return SegmentationBatch(images, masks, [s.path for s in loaded], image_sizes, [s.size for s in loaded], skipped)
