"""Modality-independent classifier training: the part every Vim task (images, video, point clouds) shares.

:class:`Classifier` is a LightningModule around any ``timm.create_model`` name (the Vim backbones that
``vim.models`` registers, or any timm model). It owns the training recipe: AdamW from timm's optimizer
factory (no weight decay on 1-D parameters and ``no_weight_decay()``), a per-step warmup + cosine
schedule, label smoothing, Mixup / CutMix with a soft-target loss, EMA weights (validated, saved in the
checkpoint, exported), drop path, torchmetrics top-1 / top-5, and per-step reseeding so that a resumed
run draws the same random numbers as an uninterrupted one.

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

import contextlib
import math
import os
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.utilities.parsing import AttributeDict
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from timm.data import ImageNetInfo, Mixup, infer_imagenet_subset
from timm.optim import create_optimizer_v2, list_optimizers
from timm.utils import ModelEmaV3
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import Self

import vim.models  # noqa: F401  (registers the Vim backbones in timm)
from vim.data.sampling import mix_seed, seed_everything_from
from vim.models.checkpoint import safely_unpickled
from vim.models.loading import load_model
from vim.models.weights import released_weights
from vim.training.schedule import WarmupCosine, WarmupCosineLR

_WEIGHTS_FROM_CHECKPOINT: ContextVar[bool] = ContextVar("weights_from_checkpoint", default=False)


@contextlib.contextmanager
def weights_from_checkpoint() -> Iterator[None]:
    """Classifiers built inside this context leave ``pretrained`` / ``pretrained_file`` unread (random initial weights):
    a checkpoint is about to restore every weight, so resuming or evaluating offline needs neither the hub nor the
    file. :meth:`Classifier.restore_initial_weights` reads them after all."""
    token = _WEIGHTS_FROM_CHECKPOINT.set(True)
    try:
        yield
    finally:
        _WEIGHTS_FROM_CHECKPOINT.reset(token)


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


def classification_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Cross-entropy of (B, K) logits against class indices (B,), smoothed, or soft targets (B, K) from Mixup.

    Soft targets already carry Mixup's label smoothing, so it is applied to class indices only.
    """
    return F.cross_entropy(logits, targets, label_smoothing=0.0 if targets.is_floating_point() else label_smoothing)


class Classifier(LightningModule):
    """Train, evaluate and predict with a timm classifier; subclasses add their modality's model arguments.

    Args:
        model: timm model name, e.g. ``vim_tiny_patch16_224`` (any ``timm.list_models()`` name works); a tag
            (``vim_small_patch16_224.in1k``) selects the released weights that ``pretrained`` loads.
        num_classes: number of classes. The ``vimkit`` command sets it from the data's classes; None (data without
            labelled splits, e.g. ``predict`` on a folder of files) keeps the released head of a ``pretrained`` model.
        model_kwargs: extra ``timm.create_model`` arguments (``patch_size``, ``embed_dim``, ``depth``, ...).
        pretrained: start from the released weights of the model name's tag (``vim.models.weights``: downloaded once
            into timm's cache); a head of another size than the released one is re-initialized for ``num_classes``.
        pretrained_file: start from a weights file instead (``.safetensors``/``.pth``, e.g. from ``vimkit export``)
            through timm's pretrained loading (a classifier head of another size is re-initialized).
        drop_path_rate: stochastic depth rate.
        lr: peak learning rate (after any batch-size scaling).
        weight_decay: the optimizer's weight decay (not applied to 1-D parameters and ``no_weight_decay()``).
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
        optimizer: timm's optimizer by name (``timm.optim.list_optimizers()``): "adamw" (Vim, VideoMamba, PointMamba,
            VMamba), "lamb" (MambaVision), ...

    A checkpoint holds every weight: it is saved with ``pretrained`` off and no ``pretrained_file``, so restoring it
    (resume, ``load_from_checkpoint``, ``vimkit extract --checkpoint``) reads neither the released nor the initial file.
    """

    hparams: AttributeDict
    """Every ``__init__`` argument (``save_hyperparameters``), read as ``self.hparams.lr``: Lightning types the property
    more widely, as ``AttributeDict | MutableMapping``, which has no attributes for a type checker."""

    def __init__(
        self,
        model: str,
        num_classes: int | None = None,
        model_kwargs: dict[str, Any] | None = None,
        pretrained: bool = False,
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
        optimizer: str = "adamw",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if pretrained and pretrained_file is not None:
            raise ValueError("model.pretrained and model.pretrained_file both choose the initial weights: set one")
        if layer_decay is not None and not 0 < layer_decay <= 1:
            raise ValueError(f"layer_decay must lie in (0, 1], got {layer_decay}")
        optimizers = [str(name) for name in list_optimizers()]
        if optimizer.lower() not in optimizers:
            raise ValueError(f"optimizer {optimizer!r} is not one of timm's: {', '.join(optimizers)}")
        self.class_names = self.released_class_names() if num_classes is None else [str(i) for i in range(num_classes)]
        self.hparams.num_classes = num_classes = len(self.class_names)
        self.model = self.build_model(initial_weights=not _WEIGHTS_FROM_CHECKPOINT.get())
        self.ema = ModelEmaV3(self.model, decay=ema_decay) if ema_decay is not None else None
        if self.ema is not None:
            self.ema.requires_grad_(False)  # updated by averaging, never by gradients (and ignored by DDP)
            self.ema.module.train()  # follows this module's train/eval mode like any submodule; it only runs in eval
        self.mixup = (
            Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, label_smoothing=label_smoothing, num_classes=num_classes)
            if mixup_alpha > 0 or cutmix_alpha > 0
            else None
        )
        self.val_metrics = accuracy_metrics(num_classes, "val/")
        self.val_ema_metrics = accuracy_metrics(num_classes, "val_ema/")
        self.test_metrics = accuracy_metrics(num_classes, "test/")
        self.test_ema_metrics = accuracy_metrics(num_classes, "test_ema/")
        self._base_seed = 0

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]  # no stream (IO): read_checkpoint reads paths and URLs
        cls,
        checkpoint_path: str | os.PathLike,
        map_location: Any = None,
        hparams_file: str | Path | None = None,
        strict: bool | None = None,
        weights_only: bool | None = None,
        **kwargs: Any,
    ) -> Self:
        """Lightning's, with the file or URL read as :func:`~vim.models.checkpoint.read_checkpoint` reads it: only
        :data:`~vim.models.checkpoint.SAFE_GLOBALS` are unpickled, whatever ``weights_only`` asks (Lightning's own
        loader unpickles anything from a URL); :class:`~vim.models.checkpoint.CheckpointError` otherwise."""
        with safely_unpickled(checkpoint_path) as path:
            return super().load_from_checkpoint(path, map_location, hparams_file, strict, weights_only=True, **kwargs)

    @property
    def num_classes(self) -> int:
        """Outputs of the classifier head."""
        return self.hparams.num_classes

    # ----------------------------------------------------------------------------------------- model
    def model_kwargs(self) -> dict[str, Any]:
        """Modality-specific ``timm.create_model`` arguments; subclasses extend this."""
        return {}

    def build_model(self, initial_weights: bool = True) -> nn.Module:
        """The timm model (:func:`vim.models.loading.load_model`) with released weights (``pretrained``), a weights file
        (``pretrained_file``) or, without either or without ``initial_weights``, a random initialisation."""
        hp = self.hparams
        kwargs = {**self.model_kwargs(), **(hp.model_kwargs or {})}
        kwargs.update(num_classes=hp.num_classes, drop_path_rate=hp.drop_path_rate)
        weights = hp.pretrained_file if initial_weights else None
        pretrained = bool(hp.pretrained and initial_weights)
        loaded = load_model(hp.model, weights, pretrained=pretrained, file_head=False, argument="model.pretrained_file", **kwargs)
        return loaded.model

    def released_class_names(self) -> list[str]:
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

    def restore_initial_weights(self) -> None:
        """Rebuild the model from ``pretrained`` / ``pretrained_file``, and the EMA from it: for a model built inside
        :func:`weights_from_checkpoint` whose checkpoint turned out not to exist (``--ckpt_path last`` on a new run)."""
        self.model = self.build_model()
        if self.ema is not None:
            self.ema.set(self.model)

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
        """Take the class names from labelled data, which must have ``num_classes`` of them (the ``vimkit`` command sets
        ``num_classes`` from the data; a model built by hand may disagree). ``predict`` names classes as the
        checkpoint it loads does."""
        self._base_seed = torch.initial_seed()
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if stage == "predict" or datamodule is None or getattr(datamodule, "num_classes", None) is None:
            return
        classes = list(datamodule.classes)
        if len(classes) != self.num_classes:
            raise ValueError(
                f"model.num_classes={self.num_classes} but the data has {len(classes)} classes "
                f"({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''})"
            )
        self.class_names = classes

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Save the class names; mark the weights as restored from here (see the class docstring)."""
        checkpoint["class_names"] = self.class_names
        if self.CHECKPOINT_HYPER_PARAMS_KEY in checkpoint:
            checkpoint[self.CHECKPOINT_HYPER_PARAMS_KEY].update(pretrained=False, pretrained_file=None)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.class_names = checkpoint.get("class_names", self.class_names)

    # ----------------------------------------------------------------------------------------- training
    def configure_callbacks(self) -> list[Callback]:
        """The summary of the trained network in place of Lightning's model summary, where the trainer shows one."""
        from vim.training.summary import NetworkSummary

        callbacks = self.trainer.callbacks  # type: ignore[attr-defined]  # set by Lightning's callback connector
        shows_summary = any(isinstance(callback, ModelSummary) for callback in callbacks)
        return [NetworkSummary()] if shows_summary else []

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        hp = self.hparams
        optimizer = create_optimizer_v2(
            self.model, opt=hp.get("optimizer", "adamw"), lr=hp.lr, weight_decay=hp.weight_decay, layer_decay=hp.layer_decay
        )
        for group in optimizer.param_groups:  # timm leaves a layer's scale to its own schedulers; LambdaLR needs it in lr
            group["lr"] = hp.lr * group.get("lr_scale", 1.0)
        total_steps, steps_per_epoch = self.optimizer_steps()
        warmup_steps = min(round(hp.warmup_epochs * steps_per_epoch), total_steps)
        schedule = WarmupCosine(hp.lr, total_steps, warmup_steps, hp.warmup_lr, hp.min_lr)  # a resume keeps only the step
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": WarmupCosineLR(optimizer, schedule), "interval": "step"}}

    def optimizer_steps(self) -> tuple[int, int]:
        """Optimizer steps of the whole run (``trainer.estimated_stepping_batches``: ``max_epochs``, ``max_steps``,
        ``limit_train_batches`` and accumulation applied) and of one epoch."""
        trainer = self.trainer
        total = trainer.estimated_stepping_batches  # loads the training data to count its batches, unless max_steps decides
        batches = trainer.num_training_batches
        if math.isinf(batches):  # max_steps alone bounds the run: the data module counts an epoch's batches
            # Lightning's data connector sets trainer.datamodule; Trainer does not declare it
            datamodule = trainer.datamodule  # type: ignore[attr-defined]
            batches = getattr(datamodule, "train_batches_per_epoch", lambda: math.inf)()
        if math.isinf(total) or math.isinf(batches):
            raise ValueError("the schedule needs a training loader with a length, and max_epochs or max_steps")
        return int(total), math.ceil(batches / trainer.accumulate_grad_batches)

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
        loss = classification_loss(self.model(inputs), targets, self.hparams.label_smoothing)
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
