"""Modality-independent classifier training: the part every Vim task (images, video, point clouds) shares.

:class:`Classifier` is a LightningModule around any ``timm.create_model`` name (the Vim backbones that
``vim.models`` registers, or any timm model). It owns the training recipe: AdamW from timm's optimizer
factory (no weight decay on 1-D parameters and ``no_weight_decay()``), a per-step warmup + cosine
schedule, label smoothing, Mixup / CutMix with a soft-target loss, EMA weights (validated, saved in the
checkpoint, exported), drop path, torchmetrics top-1 / top-5, and per-step reseeding so that a resumed
run draws the same random numbers as an uninterrupted one.

How a new modality builds on it (e.g. ``VideoClassifier``)::

    class VideoClassifier(Classifier):
        def __init__(self, model: str, num_classes: int, num_frames: int = 8, **kwargs) -> None:
            super().__init__(model, num_classes, **kwargs)  # recipe arguments go through **kwargs

        def model_kwargs(self) -> dict:                 # extra timm kwargs, e.g. the clip length
            return {"num_frames": self.hparams.num_frames}

Its datamodule yields batches whose first two items are ``inputs`` (B, ...) and ``targets`` (B,) (an
optional ``paths`` field names the samples for ``predict``; see :class:`vim.data.images.ImageBatch`).
Mixup / CutMix (timm's ``Mixup``) mix along the batch and cut boxes in the last two axes, so they work
for (B, C, H, W) images and (B, C, T, H, W) clips; leave them at 0 for point clouds.
"""

from __future__ import annotations

import difflib
import math
from typing import Any

import timm
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from timm.data import Mixup
from timm.optim import create_optimizer_v2
from timm.utils import ModelEmaV3
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

import vim.models  # noqa: F401  (registers the Vim backbones in timm)
from vim.data.sampling import mix_seed, seed_everything_from
from vim.files import check_weights_file
from vim.training.schedule import WarmupCosine


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, **kwargs)``; an unknown name raises ValueError listing the closest known names."""
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.5)
        hint = f"; close names: {', '.join(close)}" if close else "; see timm.list_models()"
        raise ValueError(f"model '{name}' is not a registered timm model{hint}")
    return timm.create_model(name, **kwargs)


def accuracy_metrics(num_classes: int, prefix: str) -> MetricCollection:
    """Top-1 and top-5 (top-k capped at the class count) accuracy, logged as ``<prefix>acc1`` / ``<prefix>acc5``."""
    return MetricCollection(
        {
            "acc1": MulticlassAccuracy(num_classes, top_k=1, average="micro"),
            "acc5": MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro"),
        },
        prefix=prefix,
    )


def classification_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Cross-entropy of (B, K) logits against class indices (B,), smoothed, or soft targets (B, K) from Mixup.

    Soft targets already carry Mixup's label smoothing, so it is applied to class indices only.
    """
    return F.cross_entropy(logits, targets, label_smoothing=0.0 if targets.is_floating_point() else label_smoothing)


class Classifier(LightningModule):
    """Train, evaluate and predict with a timm classifier; subclasses add their modality's model arguments.

    Args:
        model: timm model name, e.g. ``vim_tiny_patch16_224`` (any ``timm.list_models()`` name works).
        num_classes: number of classes (checked against the datamodule's class folders).
        model_kwargs: extra ``timm.create_model`` arguments (``patch_size``, ``embed_dim``, ``depth``, ...).
        pretrained_file: initialize from a weights file (``.safetensors``/``.pth``, e.g. from ``vim export``)
            through timm's pretrained loading (a classifier head of another size is re-initialized).
        drop_path_rate: stochastic depth rate.
        lr: peak learning rate (after any batch-size scaling).
        weight_decay: AdamW weight decay (not applied to 1-D parameters and ``no_weight_decay()``).
        layer_decay: layer-wise learning-rate decay (e.g. 0.75, as VideoMamba fine-tunes): the head trains at
            ``lr``, the last block (with the final norm, as timm groups it) at ``lr * layer_decay``, each block
            below at ``layer_decay`` times the one above, the patch and position embeddings lowest. Layers come
            from the model's ``group_matcher`` through timm's optimizer factory. None: one rate for all.
        warmup_epochs: linear warmup length in epochs (fractions allowed).
        warmup_lr: learning rate at step 0.
        min_lr: learning rate at the end of the cosine.
        label_smoothing: label smoothing (also of Mixup's soft targets).
        mixup_alpha: Mixup beta-distribution alpha (0 disables).
        cutmix_alpha: CutMix alpha (0 disables).
        ema_decay: EMA decay per optimizer step (e.g. 0.99996); None disables EMA.
    """

    def __init__(
        self,
        model: str,
        num_classes: int,
        model_kwargs: dict[str, Any] | None = None,
        pretrained_file: str | None = None,
        drop_path_rate: float = 0.0,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        layer_decay: float | None = None,
        warmup_epochs: float = 5.0,
        warmup_lr: float = 1e-6,
        min_lr: float = 1e-5,
        label_smoothing: float = 0.1,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        ema_decay: float | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        # Read settings from attributes, not self.hparams: under LightningCLI hparams hold what the config gave.
        self.model_name, self.num_classes, self.extra_model_kwargs = model, num_classes, dict(model_kwargs or {})
        self.pretrained_file, self.drop_path_rate = pretrained_file, drop_path_rate
        self.lr, self.weight_decay, self.warmup_epochs, self.warmup_lr, self.min_lr = (
            lr,
            weight_decay,
            warmup_epochs,
            warmup_lr,
            min_lr,
        )
        self.label_smoothing, self.layer_decay = label_smoothing, layer_decay
        if layer_decay is not None and not 0 < layer_decay <= 1:
            raise ValueError(f"layer_decay must lie in (0, 1], got {layer_decay}")
        self.model = self.build_model()
        self.ema = ModelEmaV3(self.model, decay=ema_decay) if ema_decay is not None else None
        if self.ema is not None:
            self.ema.requires_grad_(False)  # updated by averaging, never by gradients (and ignored by DDP)
            self.ema.module.train()  # follows this module's train/eval mode like any submodule; it only runs in eval
        self.mixup = (
            Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, label_smoothing=label_smoothing, num_classes=num_classes)
            if mixup_alpha > 0 or cutmix_alpha > 0
            else None
        )
        self.class_names = [str(i) for i in range(num_classes)]
        self.val_metrics = accuracy_metrics(num_classes, "val/")
        self.val_ema_metrics = accuracy_metrics(num_classes, "val_ema/")
        self.test_metrics = accuracy_metrics(num_classes, "test/")
        self.test_ema_metrics = accuracy_metrics(num_classes, "test_ema/")
        self._base_seed = 0

    # ----------------------------------------------------------------------------------------- model
    def model_kwargs(self) -> dict[str, Any]:
        """Modality-specific ``timm.create_model`` arguments; subclasses extend this."""
        return {}

    def build_model(self) -> nn.Module:
        kwargs = {**self.model_kwargs(), **self.extra_model_kwargs}
        kwargs.update(num_classes=self.num_classes, drop_path_rate=self.drop_path_rate)
        if self.pretrained_file is not None:
            check_weights_file(self.pretrained_file, "model.pretrained_file")
            kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": self.pretrained_file})
        return create_model(self.model_name, **kwargs)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) of the trained model."""
        return self.model(inputs)

    def classify(self, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        """Evaluation logits (B, num_classes) of ``model`` (the trained or the EMA weights) on a batch's inputs.

        Modalities that evaluate several views per sample (video: clips x crops) override this to average them.
        """
        return model(inputs)

    @property
    def eval_model(self) -> nn.Module:
        """The weights used for prediction and export: EMA when enabled, else the trained model."""
        return self.ema.module if self.ema is not None else self.model

    # ----------------------------------------------------------------------------------------- setup
    def setup(self, stage: str) -> None:
        self._base_seed = torch.initial_seed()
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if stage != "predict" and datamodule is not None and hasattr(datamodule, "classes"):
            classes = list(datamodule.classes)
            if len(classes) != self.num_classes:
                raise ValueError(
                    f"model.num_classes={self.num_classes} but the data has {len(classes)} classes "
                    f"({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''})"
                )
            self.class_names = classes

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["class_names"] = self.class_names

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.class_names = checkpoint.get("class_names", self.class_names)

    # ----------------------------------------------------------------------------------------- training
    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = create_optimizer_v2(
            self.model, opt="adamw", lr=self.lr, weight_decay=self.weight_decay, layer_decay=self.layer_decay
        )
        for group in optimizer.param_groups:  # timm leaves a layer's scale to its own schedulers; LambdaLR needs it in lr
            group["lr"] = self.lr * group.get("lr_scale", 1.0)
        total_steps = int(self.trainer.estimated_stepping_batches)
        steps_per_epoch = -(-self.train_batches_per_epoch() // self.trainer.accumulate_grad_batches)
        warmup_steps = min(round(self.warmup_epochs * steps_per_epoch), total_steps)
        schedule = WarmupCosine(self.lr, total_steps, warmup_steps, self.warmup_lr, self.min_lr)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": LambdaLR(optimizer, schedule), "interval": "step"}}

    def train_batches_per_epoch(self) -> int:
        """Training batches per epoch (``estimated_stepping_batches`` skips loading the data when ``max_steps`` decides)."""
        if math.isinf(self.trainer.num_training_batches):
            self.trainer.fit_loop.setup_data()
        if math.isinf(self.trainer.num_training_batches):
            raise ValueError("warmup_epochs needs a training loader with a length; this one has none")
        return int(self.trainer.num_training_batches)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Reseed from (seed, step, batch, rank): Mixup and drop path then draw the same numbers after a resume."""
        seed_everything_from(mix_seed(self._base_seed, self.global_step, batch_idx, self.global_rank))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        inputs, targets = batch[0], batch[1]
        if self.mixup is not None:
            inputs, targets = inputs[: len(inputs) // 2 * 2], targets[: len(targets) // 2 * 2]  # Mixup pairs samples
        if len(inputs) == 0:
            return None  # every sample of the batch was unreadable: skip the step
        if self.mixup is not None:
            inputs, targets = self.mixup(inputs, targets)
        loss = classification_loss(self.model(inputs), targets, self.label_smoothing)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(inputs))
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """Step, then update the EMA (before any callback, e.g. a checkpoint, sees this step's weights)."""
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            self.ema.update(self.model)

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
