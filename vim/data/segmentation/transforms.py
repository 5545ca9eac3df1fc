"""Joint transforms of an image and its mask (torchvision's ``transforms.v2``: geometry applied to both, the mask
resampled by nearest neighbour, colour only to the image), as mmsegmentation's ADE20K pipeline applies them."""

from __future__ import annotations

from collections.abc import Callable

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import tv_tensors
from torchvision.transforms import v2

IGNORE_INDEX = 255
"""The mask value of pixels that no class stands for (unlabelled, padding): left out of the loss and the metrics."""


def _to_float_normalised(mean: tuple[float, ...], std: tuple[float, ...]) -> list[Callable]:
    """uint8 image -> float normalised by ``mean`` / ``std``; a mask -> int64 class indices."""
    dtypes = {tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64, "others": None}
    return [v2.ToDtype(dtypes, scale=True), v2.Normalize(mean, std)]


def segmentation_train_transform(
    img_size: int,
    scale: tuple[float, float] = (0.5, 2.0),
    hflip: float = 0.5,
    color_jitter: float = 0.2,
    mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN,
    std: tuple[float, ...] = IMAGENET_DEFAULT_STD,
) -> Callable:
    """``(image, mask)`` as tv_tensors ((3, H, W) uint8, (H, W) uint8) -> ((3, S, S) float, (S, S) int64), S = ``img_size``.

    The shorter side is resized to ``img_size`` times a random factor in ``scale``, a random S x S crop is taken
    (padding with 0 and :data:`IGNORE_INDEX` where the image is smaller), flipped with probability ``hflip``, the
    image's brightness, contrast and saturation jittered by up to ``color_jitter`` (hue by half of it), then normalised.
    """
    low, high = (max(1, round(img_size * factor)) for factor in scale)
    steps: list[Callable] = [
        v2.RandomResize(low, high + 1),
        v2.RandomCrop(img_size, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}),
        v2.RandomHorizontalFlip(hflip),
    ]
    if color_jitter > 0:
        steps.append(v2.ColorJitter(color_jitter, color_jitter, color_jitter, min(color_jitter / 2, 0.5)))
    return v2.Compose(steps + _to_float_normalised(mean, std))


def segmentation_eval_transform(
    img_size: int, mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN, std: tuple[float, ...] = IMAGENET_DEFAULT_STD
) -> Callable:
    """``(image, mask)`` -> (the image with its shorter side resized to ``img_size``, normalised; the mask as it is, at
    the image's original size, int64): predictions are scored at the resolution of the annotation, as mmseg does."""
    resize = v2.Compose([v2.Resize(img_size, antialias=True), *_to_float_normalised(mean, std)])

    def transform(image: tv_tensors.Image, mask: tv_tensors.Mask) -> tuple[torch.Tensor, torch.Tensor]:
        return resize(image), mask.to(torch.int64)

    return transform
