"""Clip transforms for training, evaluation, testing, prediction and feature extraction: functions, as timm's
``create_transform``, that every caller asks (no data module needed).

torchvision transforms v2 on the whole clip at once: every frame gets the same crop, flip and RandAugment op. Input:
(T, 3, H, W) uint8 frames as a ``tv_tensors.Video``; output: (3, T, S, S) float clips, the model's layout.
"""

from __future__ import annotations

import math
import re

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF


def rand_augment(policy: str | None) -> v2.RandAugment | None:
    """torchvision's RandAugment from a timm-style policy ``rand-m{magnitude}-n{ops}...`` (magnitude out of 10)."""
    if not policy:
        return None
    if not policy.startswith("rand"):
        raise ValueError(f"auto_augment: only RandAugment policies ('rand-m9-n2-...') apply to video, got {policy!r}")
    settings = dict(re.findall(r"-([mn])(\d+)", policy))
    return v2.RandAugment(num_ops=int(settings.get("n", 2)), magnitude=int(settings.get("m", 9)), num_magnitude_bins=11)


class ToClip(torch.nn.Module):
    """(T, 3, H, W) video -> (3, T, H, W) tensor, the model's layout."""

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return video.permute(1, 0, 2, 3).as_subclass(torch.Tensor)


def spatial_crops(video: torch.Tensor, size: int, num_crops: int) -> list[torch.Tensor]:
    """``num_crops`` square crops of ``video`` (..., H, W) spaced evenly along its longer side, centred on the shorter.

    With one crop it is the centre crop; with three, VideoMamba's left / centre / right (or top / centre / bottom).
    """
    height, width = video.shape[-2:]
    if min(height, width) < size:
        raise ValueError(f"cannot take {size} px crops from frames of {height}x{width}")
    long_is_width = width >= height
    span = (width if long_is_width else height) - size
    starts = [span // 2] if num_crops == 1 else [round(k * span / (num_crops - 1)) for k in range(num_crops)]
    across = ((height if long_is_width else width) - size) // 2
    return [
        TF.crop(video, across, start, size, size) if long_is_width else TF.crop(video, start, across, size, size)
        for start in starts
    ]


class MultiViewTransform:
    """Test views of one clip: resize the short side, take ``num_crops`` crops, normalise each: a list of (3, T, S, S)."""

    def __init__(self, resize: v2.Transform, size: int, num_crops: int, finish: v2.Transform) -> None:
        self.resize, self.size, self.num_crops, self.finish = resize, size, num_crops, finish

    def __call__(self, video: tv_tensors.Video) -> list[torch.Tensor]:
        video = self.resize(video)
        return [self.finish(crop).unsqueeze(0) for crop in spatial_crops(video, self.size, self.num_crops)]


def _normalize(mean: tuple[float, ...], std: tuple[float, ...]) -> v2.Transform:
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std)), ToClip()])


def _resize(img_size: int, crop_pct: float, interpolation: str) -> v2.Transform:
    """Resize the short side to ``img_size / crop_pct``."""
    return v2.Resize(math.floor(img_size / crop_pct), interpolation=InterpolationMode(interpolation), antialias=True)


def create_video_transform(
    img_size: int,
    is_training: bool = False,
    interpolation: str = "bicubic",
    crop_pct: float = 1.0,
    mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN,
    std: tuple[float, ...] = IMAGENET_DEFAULT_STD,
    auto_augment: str | None = None,
    color_jitter: float = 0.0,
    re_prob: float = 0.0,
    hflip: float = 0.5,
    scale: tuple[float, float] = (0.08, 1.0),
) -> v2.Transform:
    """(T, 3, H, W) uint8 video -> normalised (3, T, S, S) clip, with the arguments of
    :func:`~vim.data.images.create_image_transform`.

    Training: random resized crop (``scale``), flip (``hflip``), RandAugment (``auto_augment`` in timm's
    ``rand-m{M}-n{N}`` syntax), colour jitter, normalisation, random erasing (``re_prob``). Evaluation: resize the short
    side to ``img_size / crop_pct``, centre crop, normalise; the augmentation arguments are ignored.
    """
    if not is_training:
        return v2.Compose([_resize(img_size, crop_pct, interpolation), v2.CenterCrop(img_size), _normalize(mean, std)])
    steps = [
        v2.RandomResizedCrop(img_size, scale=tuple(scale), interpolation=InterpolationMode(interpolation), antialias=True),
        v2.RandomHorizontalFlip(hflip),
        rand_augment(auto_augment),
        v2.ColorJitter(color_jitter, color_jitter, color_jitter) if color_jitter else None,
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(mean), list(std)),
        v2.RandomErasing(re_prob, value="random") if re_prob else None,
        ToClip(),
    ]
    return v2.Compose([step for step in steps if step is not None])


def create_video_test_transform(
    img_size: int,
    num_crops: int,
    interpolation: str = "bicubic",
    crop_pct: float = 1.0,
    mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN,
    std: tuple[float, ...] = IMAGENET_DEFAULT_STD,
) -> MultiViewTransform:
    """The evaluation resize, then ``num_crops`` crops along the long side (1: centre; 3: VideoMamba's left / centre /
    right), each normalised: a list of (1, 3, T, S, S)."""
    return MultiViewTransform(_resize(img_size, crop_pct, interpolation), img_size, num_crops, _normalize(mean, std))
