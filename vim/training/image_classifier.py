"""Image classification on the shared :class:`~vim.training.classifier.Classifier` recipe."""

from __future__ import annotations

from typing import Any

from torch import nn

from vim.training.classifier import Classifier


def check_image_fits_patch(model: nn.Module, img_size: int | tuple[int, int] | None) -> None:
    """ValueError when an image side is smaller than one patch of the model's ``patch_embed`` (if it has one)."""
    patch_embed = getattr(model, "patch_embed", None)
    patch_size = getattr(patch_embed, "patch_size", None)
    img_size = img_size if img_size is not None else getattr(patch_embed, "img_size", None)
    if patch_size is None or img_size is None:
        return
    patch_size = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
    img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if any(i < p for i, p in zip(img_size, patch_size)):
        raise ValueError(f"img_size={img_size} is smaller than one patch (patch_size={patch_size}); use a larger img_size")


class ImageClassifier(Classifier):
    """Classifier of (B, 3, H, W) images, e.g. ImageNet with a Vim backbone.

    Args:
        model: timm model name.
        num_classes: number of classes.
        img_size: input side passed to the model (set it equal to ``data.img_size``); None keeps the model's default.
        **kwargs: the training recipe, see :class:`~vim.training.classifier.Classifier`.
    """

    def __init__(self, model: str, num_classes: int, img_size: int | None = None, **kwargs: Any) -> None:
        self.img_size = img_size
        super().__init__(model, num_classes, **kwargs)
        check_image_fits_patch(self.model, img_size)

    def model_kwargs(self) -> dict[str, Any]:
        return {"img_size": self.img_size} if self.img_size is not None else {}
