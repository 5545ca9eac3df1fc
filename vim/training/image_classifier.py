"""Image classification on the shared :class:`~vim.training.classifier.Classifier` recipe."""

from __future__ import annotations

from typing import Any

from vim.training.classifier import Classifier, check_image_fits_patch


class ImageClassifier(Classifier):
    """Classifier of (B, 3, H, W) images, e.g. ImageNet with a Vim backbone.

    Args:
        model: timm model name.
        num_classes: number of classes (the ``vimkit`` command sets it from the data's classes).
        img_size: input side passed to the model (the ``vimkit`` command sets it from ``data.img_size``); None keeps the
            model's default.
        **kwargs: the training recipe, see :class:`~vim.training.classifier.Classifier`.
    """

    def __init__(self, model: str, num_classes: int | None = None, img_size: int | None = None, **kwargs: Any) -> None:
        super().__init__(model, num_classes, **kwargs)
        check_image_fits_patch(self.model, img_size)

    def model_kwargs(self) -> dict[str, Any]:
        img_size = self.hparams.img_size
        return {"img_size": img_size} if img_size is not None else {}
