"""Segmentation inference over images of any size: the whole image at once, or overlapping windows (mmseg's
``slide`` mode), the logits of each input mapped back to its own size.

API::

    logits = window_logits(model, images, num_classes, crop=512, stride=341)   # (B, 3, H, W) -> (B, K, H, W)
    logits = whole_logits(model, images, divisor=32)                            # padded to a multiple of 32, cropped back
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["whole_logits", "window_logits", "window_starts"]


def whole_logits(model: nn.Module, images: torch.Tensor, divisor: int = 32) -> torch.Tensor:
    """Logits (B, K, H, W) of (B, 3, H, W) images, run once, zero-padded at the bottom and right to multiples of
    ``divisor`` (what the decoders' strides need) and cropped back."""
    height, width = images.shape[-2:]
    padded = F.pad(images, (0, -width % divisor, 0, -height % divisor))
    return model(padded)[..., :height, :width]


def window_starts(length: int, crop: int, stride: int) -> list[int]:
    """The first pixels of the windows of ``crop`` covering ``length`` (at least ``crop``) in steps of ``stride``,
    the last flush with the end."""
    count = max(math.ceil((length - crop) / stride), 0) + 1
    return [min(i * stride, length - crop) for i in range(count)]


def window_logits(model: nn.Module, images: torch.Tensor, num_classes: int, crop: int, stride: int) -> torch.Tensor:
    """Logits (B, K, H, W) of (B, 3, H, W) images as the mean over overlapping ``crop`` x ``crop`` windows, ``stride``
    apart (a side shorter than ``crop`` is zero-padded for the model and cropped back)."""
    height, width = images.shape[-2:]
    padded = F.pad(images, (0, max(crop - width, 0), 0, max(crop - height, 0)))
    full_height, full_width = padded.shape[-2:]
    total = images.new_zeros(images.shape[0], num_classes, full_height, full_width)
    counts = images.new_zeros(1, 1, full_height, full_width)
    for top in window_starts(full_height, crop, stride):
        for left in window_starts(full_width, crop, stride):
            window = padded[..., top : top + crop, left : left + crop]
            total[..., top : top + crop, left : left + crop] += model(window)
            counts[..., top : top + crop, left : left + crop] += 1
    return (total / counts)[..., :height, :width]
