"""Image transforms for training, evaluation, prediction and feature extraction: one function, as timm's
``create_transform``, that every caller asks (no data module needed)."""

from __future__ import annotations

from collections.abc import Callable

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform


def create_image_transform(
    img_size: int | tuple[int, int],
    is_training: bool = False,
    interpolation: str = "bicubic",
    crop_pct: float = 0.875,
    mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN,
    std: tuple[float, ...] = IMAGENET_DEFAULT_STD,
    auto_augment: str | None = None,
    color_jitter: float = 0.0,
    re_prob: float = 0.0,
    hflip: float = 0.5,
    scale: tuple[float, float] = (0.08, 1.0),
) -> Callable:
    """PIL image -> normalised (3, S, S) tensor through timm's ``create_transform``.

    Training: random resized crop (``scale``), flip (``hflip``), ``auto_augment`` (e.g. ``rand-m9-mstd0.5-inc1``),
    colour jitter, normalisation, random erasing (``re_prob``, per pixel). Evaluation: resize to
    ``img_size / crop_pct``, centre crop, normalisation; the augmentation arguments are ignored.
    """
    if not is_training:
        return create_transform(img_size, is_training=False, interpolation=interpolation, crop_pct=crop_pct, mean=mean, std=std)
    return create_transform(
        img_size,
        is_training=True,
        interpolation=interpolation,
        mean=mean,
        std=std,
        auto_augment=auto_augment,
        color_jitter=color_jitter,
        re_prob=re_prob,
        re_mode="pixel",
        hflip=hflip,
        scale=(scale[0], scale[1]),
    )
