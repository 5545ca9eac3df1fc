"""Modality-independent classifier training: the part every classification task (images, video, point clouds) shares.

:class:`Classifier` is the :class:`~vim.training.task.TaskModule` (the shared recipe: optimizer, schedule, EMA,
reseeding, checkpoints) of any ``timm.create_model`` name (the Vim backbones that ``vim.models`` registers, or any timm
model). It adds what classification needs: label smoothing, Mixup / CutMix with a soft-target loss, torchmetrics
top-1 / top-5, and the top-5 classes per input as predictions (a CSV).

How a new modality builds on it (e.g. ``VideoClassifier``)::

    class VideoClassifier(Classifier):
        def __init__(self, model: str, num_classes: int | None = None, num_frames: int = 8, **kwargs) -> None:
            super().__init__(model, num_classes, **kwargs)  # recipe arguments go through **kwargs

        def model_kwargs(self) -> dict:                 # extra timm kwargs, e.g. the clip length
            return {"num_frames": self.hparams.num_frames}

Its datamodule yields batches whose first two items are ``inputs`` (B, ...) and ``targets`` (B,) (an
optional ``paths`` field names the samples for ``predict``; see :class:`vim.data.images.ImageBatch`).
Mixup / CutMix (timm's ``Mixup``) mix along the batch and cut boxes in the last two axes, so they work
for (B, C, H, W) images and (B, C, T, H, W) clips; leave them at 0 for point clouds.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import ImageNetInfo, Mixup, infer_imagenet_subset
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from vim.models.loading import load_model
from vim.models.weights import released_weights
from vim.training.task import TaskModule


def check_image_fits_patch(model: nn.Module, img_size: int | tuple[int, int] | None) -> None:
    """ValueError when an image (or frame) side is smaller than one patch of the model's ``patch_embed`` (if it has
    one): the image and video classifiers' check of ``img_size``."""
    patch_embed = getattr(model, "patch_embed", None)
    patch_size = getattr(patch_embed, "patch_size", None)
    img_size = img_size if img_size is not None else getattr(patch_embed, "img_size", None)
    if patch_size is None or img_size is None:
        return
    patch_size = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
    img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if any(i < p for i, p in zip(img_size, patch_size)):
        raise ValueError(f"img_size={img_size} is smaller than one patch (patch_size={patch_size}); use a larger img_size")


def accuracy_metrics(num_classes: int, prefix: str) -> MetricCollection:
    """Top-1 and top-5 (top-k capped at the class count) accuracy, logged as ``<prefix>acc1`` / ``<prefix>acc5``."""
    return MetricCollection(
        {
            "acc1": MulticlassAccuracy(num_classes, top_k=1, average="micro"),
            "acc5": MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro"),
        },
        prefix=prefix,
    )


def final_accuracy_line(metrics: dict[str, Any], has_ema: bool) -> str | None:
    """The accuracy of the weights ``vimkit export`` and ``vimkit predict`` use (EMA when the run keeps it), from logged
    validation metrics, e.g. ``of the EMA weights (what vimkit export and vimkit predict use): top-1 94.2% top-5 99.7%
    (trained weights: top-1 95.0% top-5 99.7%)``; None without validation accuracy."""

    def accuracy(prefix: str) -> str | None:
        if f"{prefix}acc1" not in metrics:
            return None
        return f"top-1 {100 * float(metrics[f'{prefix}acc1']):.1f}% top-5 {100 * float(metrics[f'{prefix}acc5']):.1f}%"

    trained, ema = accuracy("val/"), accuracy("val_ema/")
    used = "(what vimkit export and vimkit predict use)"
    if has_ema and ema is not None:
        return f"of the EMA weights {used}: {ema}" + (f" (trained weights: {trained})" if trained else "")
    return None if trained is None else f"of the trained weights {used}: {trained}"


def classification_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Cross-entropy of (B, K) logits against class indices (B,), smoothed, or soft targets (B, K) from Mixup.

    Soft targets already carry Mixup's label smoothing, so it is applied to class indices only.
    """
    return F.cross_entropy(logits, targets, label_smoothing=0.0 if targets.is_floating_point() else label_smoothing)


class Classifier(TaskModule):
    """Train, evaluate and predict with a timm classifier; subclasses add their modality's model arguments.

    Args:
        model: timm model name, e.g. ``vim_tiny_patch16_224`` (any ``timm.list_models()`` name works); a tag
            (``vim_small_patch16_224.in1k``) selects the released weights that ``pretrained`` loads.
        num_classes: number of classes. The ``vimkit`` command sets it from the data's classes; None (data without
            labelled splits, e.g. ``predict`` on a folder of files) keeps the released head of a ``pretrained`` model.
        pretrained: start from the released weights of the model name's tag (``vim.models.weights``: downloaded once
            into timm's cache); a head of another size than the released one is re-initialized for ``num_classes``.
        pretrained_file: start from a weights file instead (``.safetensors``/``.pth``, e.g. from ``vimkit export``)
            through timm's pretrained loading (a classifier head of another size is re-initialized).
        label_smoothing: label smoothing (also of Mixup's soft targets).
        mixup_alpha: Mixup beta-distribution alpha (0 disables).
        cutmix_alpha: CutMix alpha (0 disables).
        **kwargs: the rest of the recipe (``lr``, ``layer_decay``, ``ema_decay``, ``optimizer``, ...), see
            :class:`~vim.training.task.TaskModule`.
    """

    predictions_file = "predictions.csv"

    def __init__(
        self,
        model: str,
        num_classes: int | None = None,
        model_kwargs: dict[str, Any] | None = None,
        pretrained: bool = False,
        pretrained_file: str | None = None,
        label_smoothing: float = 0.1,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, num_classes, model_kwargs, pretrained, pretrained_file, **kwargs)
        num_classes = self.num_classes
        self.mixup = (
            Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, label_smoothing=label_smoothing, num_classes=num_classes)
            if mixup_alpha > 0 or cutmix_alpha > 0
            else None
        )
        self.val_metrics = accuracy_metrics(num_classes, "val/")
        self.val_ema_metrics = accuracy_metrics(num_classes, "val_ema/")
        self.test_metrics = accuracy_metrics(num_classes, "test/")
        self.test_ema_metrics = accuracy_metrics(num_classes, "test_ema/")

    # ----------------------------------------------------------------------------------------- model
    def build_model(self, initial_weights: bool = True) -> nn.Module:
        """The timm model (:func:`vim.models.loading.load_model`) with released weights (``pretrained``), a weights file
        (``pretrained_file``) or, without either or without ``initial_weights``, a random initialisation."""
        hp = self.hparams
        weights = hp.pretrained_file if initial_weights else None
        pretrained = bool(hp.pretrained and initial_weights)
        kwargs = {**self.timm_kwargs(), "num_classes": hp.num_classes}
        loaded = load_model(hp.model, weights, pretrained=pretrained, file_head=False, argument="model.pretrained_file", **kwargs)
        return loaded.model

    def default_class_names(self) -> list[str]:
        """The classes of the released head that ``pretrained`` loads (ImageNet's by name, others by number), for a
        classifier given no ``num_classes``."""
        info = released_weights(self.hparams.model) if self.hparams.pretrained else None
        if info is None or info.num_classes == 0:
            reason = "it has no released head" if info is not None else "model.pretrained is off"
            raise ValueError(
                f"model.num_classes is not set ({reason}); the vimkit command takes it from the data's classes: "
                "give a labelled split (train / val / test) in the data section, or a checkpoint file as --ckpt_path"
            )
        subset = infer_imagenet_subset({"num_classes": info.num_classes})
        if subset is not None:
            return ImageNetInfo(subset).label_descriptions()  # type: ignore[return-value]  # a dict only with as_dict=True
        return [str(i) for i in range(info.num_classes)]

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) of the trained model."""
        return self.model(inputs)

    def classify(self, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        """Evaluation logits (B, num_classes) of ``model`` (the trained or the EMA weights) on a batch's inputs.

        Modalities that evaluate several views per sample (video: clips x crops) override this to average them.
        """
        return model(inputs)

    # ----------------------------------------------------------------------------------------- training
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        inputs, targets = batch[0], batch[1]
        if self.mixup is not None:
            inputs, targets = inputs[: len(inputs) // 2 * 2], targets[: len(targets) // 2 * 2]  # Mixup pairs samples
        if len(inputs) == 0:
            return None  # every sample of the batch was unreadable: skip the step
        if self.mixup is not None:
            inputs, targets = self.mixup(inputs, targets)
        loss = classification_loss(self.model(inputs), targets, self.hparams.label_smoothing)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(inputs))
        return loss

    # ----------------------------------------------------------------------------------------- evaluation
    def evaluate(self, batch: Any, stage: str, metrics: MetricCollection, ema_metrics: MetricCollection) -> None:
        """Log loss and accuracy of the model and, when enabled, of the EMA weights on one batch."""
        inputs, targets = batch[0], batch[1]
        if len(inputs) == 0:
            return
        logits = self.classify(self.model, inputs)
        self.log(f"{stage}/loss", F.cross_entropy(logits, targets), prog_bar=True, batch_size=len(inputs), sync_dist=True)
        metrics.update(logits, targets)
        self.log_dict(metrics, prog_bar=True, batch_size=len(inputs))
        if self.ema is not None:
            ema_metrics.update(self.classify(self.ema.module, inputs), targets)
            self.log_dict(ema_metrics, prog_bar=True, batch_size=len(inputs))

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.evaluate(batch, "val", self.val_metrics, self.val_ema_metrics)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.evaluate(batch, "test", self.test_metrics, self.test_ema_metrics)

    def final_metric_line(self, metrics: dict[str, Any]) -> str | None:
        """``Final validation accuracy of the EMA weights (...): top-1 94.2% top-5 99.7% (trained weights: ...)``."""
        accuracy = final_accuracy_line(metrics, self.ema is not None)
        return None if accuracy is None else f"Final validation accuracy {accuracy}"

    # ----------------------------------------------------------------------------------------- prediction
    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        """Top-5 classes of each readable sample with the :attr:`eval_model`: ``paths``, ``indices`` (B, 5), ``probs``
        (B, 5); and ``failed``, ``(path, reason)`` of each sample that could not be read (the batch's ``skipped``)."""
        failed = [(item.path, item.reason) for item in getattr(batch, "skipped", [])]
        top_k = min(5, self.num_classes)
        if len(batch[0]) == 0:  # every sample of the batch was unreadable: nothing to run the model on
            indices, probs = torch.empty(0, top_k, dtype=torch.long), torch.empty(0, top_k)
        else:
            top = self.classify(self.eval_model, batch[0]).float().softmax(dim=-1).topk(top_k, dim=-1)
            indices, probs = top.indices.cpu(), top.values.cpu()
        return {"paths": list(getattr(batch, "paths", [])), "indices": indices, "probs": probs, "failed": failed}

    def write_predictions(self, predictions: list[Any], output: Path) -> str:
        """A CSV row per input: path, class and probability for each of the top-5 classes, and ``error`` (empty class
        columns and the reason for an input that could not be read: corrupt, empty, ...)."""
        names = self.class_names
        output.parent.mkdir(parents=True, exist_ok=True)
        top_k = predictions[0]["indices"].shape[-1] if predictions else min(5, self.num_classes)
        failed = [failure for batch in predictions for failure in batch.get("failed", [])]
        with output.open("w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["path"] + [f"{field}{k}" for k in range(1, top_k + 1) for field in ("class", "prob")] + ["error"])
            for batch in predictions:
                for sample_path, indices, probs in zip(batch["paths"], batch["indices"].tolist(), batch["probs"].tolist()):
                    writer.writerow([sample_path] + [v for i, p in zip(indices, probs) for v in (names[i], f"{p:.4f}")] + [""])
                for sample_path, reason in batch.get("failed", []):
                    writer.writerow([sample_path] + [""] * (2 * top_k) + [reason])
        predicted = sum(len(batch["paths"]) for batch in predictions)
        unreadable = f" and {len(failed)} unreadable files (the reason in the 'error' column)" if failed else ""
        return f"Predictions for {predicted} files{unreadable}: {output}"
