"""Detection transforms (torchvision.transforms.v2): the image, its boxes and its instance masks move together."""

from __future__ import annotations

import torch
from torchvision.transforms import v2


def detection_transform(
    img_size: int,
    max_size: int | None = None,
    is_training: bool = False,
    scale_range: tuple[int, int] | None = None,
    hflip: float = 0.5,
    color_jitter: float = 0.0,
) -> v2.Transform:
    """A v2 transform of ``(image, target)``: a ``tv_tensors.Image`` (3, H, W) uint8 and a dict of
    ``tv_tensors.BoundingBoxes`` ``boxes`` (N, 4) xyxy, ``labels`` (N,) and optionally ``tv_tensors.Mask`` ``masks``
    (N, H, W), to a float image (3, H', W') in [0, 1] and the target with its boxes and masks resized and flipped alike.

    Evaluation: the shorter side resized to ``img_size`` (the longer one at most ``max_size``). Training: the shorter
    side drawn from ``scale_range`` (``(lo, hi)``, every integer between; None: ``img_size``), a horizontal flip with
    probability ``hflip``, and brightness / contrast / saturation jitter of strength ``color_jitter`` (none at 0).
    """
    if not is_training:
        resize: v2.Transform = v2.Resize(img_size, max_size=max_size, antialias=True)
        return v2.Compose([resize, v2.ToDtype(torch.float32, scale=True)])
    low, high = scale_range if scale_range is not None else (img_size, img_size)
    steps: list[v2.Transform] = [v2.RandomShortestSize(list(range(low, high + 1)), max_size=max_size, antialias=True)]
    if hflip > 0:
        steps.append(v2.RandomHorizontalFlip(hflip))
    if color_jitter > 0:
        steps.append(v2.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter))
    return v2.Compose([*steps, v2.ToDtype(torch.float32, scale=True)])
