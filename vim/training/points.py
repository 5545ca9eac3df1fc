"""Point-cloud classification on the shared :class:`~vim.training.classifier.Classifier` recipe."""

from __future__ import annotations

from typing import Any

from vim.training.classifier import Classifier


class PointCloudClassifier(Classifier):
    """Classifier of (B, N, 3) point clouds, e.g. ModelNet40 or ScanObjectNN with a PointMamba backbone.

    Batches come from :class:`~vim.data.points.PointCloudDataModule`. Mixup and CutMix mix image
    boxes, so they are refused here; use the datamodule's scale / translate / rotate augmentation.

    Args:
        model: timm model name, e.g. ``pointmamba_small``.
        num_classes: number of classes (the ``vimkit`` command sets it from the data's classes).
        num_groups: patches per cloud (None keeps the model's default).
        group_size: points per patch (None keeps the model's default).
        **kwargs: the training recipe, see :class:`~vim.training.classifier.Classifier`.
    """

    def __init__(
        self,
        model: str,
        num_classes: int | None = None,
        num_groups: int | None = None,
        group_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        for name in ("mixup_alpha", "cutmix_alpha"):
            if kwargs.get(name, 0.0) > 0:
                raise ValueError(f"{name}={kwargs[name]}: Mixup / CutMix work on images and clips, not point clouds; set it to 0")
        super().__init__(model, num_classes, **kwargs)

    def model_kwargs(self) -> dict[str, Any]:
        return {key: self.hparams[key] for key in ("num_groups", "group_size") if self.hparams[key] is not None}
