"""Video classification on the shared :class:`~vim.training.classifier.Classifier` recipe.

``vimkit fit --config configs/videomamba_tiny_k400_f8.yaml`` trains a VideoMamba on Kinetics-400 with the same
optimizer, schedule, EMA, Mixup / CutMix (on whole clips), metrics, checkpoints and export as the image
models. Test batches from :class:`~vim.data.video.VideoClipDataModule` carry several views per video
(B, V, 3, T, H, W) (clips x crops); their softmax scores are averaged into one prediction per video, as
VideoMamba's multi-view testing does.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vim.training.classifier import Classifier, check_image_fits_patch


def average_view_logits(model: nn.Module, clips: torch.Tensor) -> torch.Tensor:
    """Logits (B, K) of clips (B, 3, T, H, W), or log of the mean softmax over the views of (B, V, 3, T, H, W).

    The log of the averaged probabilities is a valid logit vector: its softmax is the averaged probabilities,
    so the loss, accuracy and top-5 predictions all see the multi-view average.
    """
    if clips.dim() != 6:
        return model(clips)
    batch, views = clips.shape[:2]
    probs = model(clips.flatten(0, 1)).float().softmax(dim=-1).unflatten(0, (batch, views)).mean(dim=1)
    return probs.clamp_min(torch.finfo(probs.dtype).tiny).log()


class VideoClassifier(Classifier):
    """Classifier of (B, 3, T, H, W) clips, e.g. Kinetics-400 or Something-Something v2 with a VideoMamba backbone.

    Args:
        model: timm model name, e.g. ``videomamba_tiny`` (``videomamba_tiny.in1k`` with ``pretrained``: VideoMamba's
            ImageNet image model, inflated to ``num_frames``).
        num_classes: number of classes (the ``vimkit`` command sets it from the data's classes).
        num_frames: clip length passed to the model (the ``vimkit`` command sets it from ``data.num_frames``).
        img_size: frame side passed to the model (the ``vimkit`` command sets it from ``data.img_size``); None keeps the
            model's default.
        **kwargs: the training recipe, see :class:`~vim.training.classifier.Classifier` (``pretrained_file`` may be an
            image checkpoint: VideoMamba inflates it).
    """

    def __init__(
        self, model: str, num_classes: int | None = None, num_frames: int = 8, img_size: int | None = None, **kwargs: Any
    ) -> None:
        if num_frames < 1:
            raise ValueError(f"num_frames must be at least 1, got {num_frames}")
        super().__init__(model, num_classes, **kwargs)
        check_image_fits_patch(self.model, img_size)

    def model_kwargs(self) -> dict[str, Any]:
        kwargs = {"num_frames": self.hparams.num_frames}
        img_size = self.hparams.img_size
        return kwargs if img_size is None else {**kwargs, "img_size": img_size}

    def classify(self, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        return average_view_logits(model, inputs)
