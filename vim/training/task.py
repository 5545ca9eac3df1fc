"""The training loop every ``vimkit`` task shares: classification of images, clips and clouds, segmentation, detection.

:class:`TaskModule` is a LightningModule that owns the recipe: the optimizer from timm's factory (no weight decay on 1-D
parameters and ``no_weight_decay()``, layer-wise lr decay through the model's ``group_matcher``), a per-step warmup
then cosine or poly schedule, EMA weights (validated, saved in the checkpoint, exported), per-step reseeding (a resumed
run draws the same random numbers as an uninterrupted one), class names saved with the checkpoint, safe checkpoint
loading, and initial weights read only when no checkpoint replaces them.

A task adds its model, its steps and its metrics::

    class Segmenter(TaskModule):
        def build_model(self, initial_weights: bool = True) -> nn.Module: ...   # the network, with its initial weights
        def training_step(self, batch, batch_idx): ...                         # the loss of batch (inputs, targets, ...)
        def validation_step(self, batch, batch_idx): ...
        def predict_step(self, batch, batch_idx): ...                          # what write_predictions writes
        def write_predictions(self, predictions, output): ...                  # the files of ``vimkit predict``
        def final_metric_line(self, metrics): ...                              # "mIoU 71.3%" in the fit's report

Its data module is a :class:`~vim.data.labelled.LabelledDataModule`, whose batches start with the inputs and targets.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any, ClassVar

import torch
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.utilities.parsing import AttributeDict
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from timm.optim import create_optimizer_v2, list_optimizers
from timm.utils import ModelEmaV3
from torch import nn
from typing_extensions import Self

import vim.models  # noqa: F401  (registers the Vim backbones in timm)
from vim.data.sampling import mix_seed, seed_everything_from
from vim.models.checkpoint import safely_unpickled
from vim.training.schedule import SCHEDULES, ScheduledLR

_WEIGHTS_FROM_CHECKPOINT: ContextVar[bool] = ContextVar("weights_from_checkpoint", default=False)


@contextlib.contextmanager
def weights_from_checkpoint() -> Iterator[None]:
    """Task modules built inside this context leave ``pretrained`` / ``pretrained_file`` unread (random initial weights):
    a checkpoint is about to restore every weight, so resuming or evaluating offline needs neither the hub nor the
    file. :meth:`TaskModule.restore_initial_weights` reads them after all."""
    token = _WEIGHTS_FROM_CHECKPOINT.set(True)
    try:
        yield
    finally:
        _WEIGHTS_FROM_CHECKPOINT.reset(token)


class TaskModule(LightningModule):
    """The shared recipe (see the module docstring); a task supplies :meth:`build_model` and its steps.

    Args:
        model: timm model name of the network or its backbone, e.g. ``vim_tiny_patch16_224`` (a tag,
            ``vim_small_patch16_224.in1k``, selects the released weights that ``pretrained`` loads).
        num_classes: number of classes (the ``vimkit`` command sets it from the data's classes).
        model_kwargs: extra ``timm.create_model`` arguments (``patch_size``, ``embed_dim``, ``depth``, ...).
        pretrained: start from the released weights of the model name's tag (downloaded once into timm's cache).
        pretrained_file: start from a weights file instead (``.safetensors`` / ``.pth``, e.g. from ``vimkit export``).
        drop_path_rate: stochastic depth rate.
        lr: peak learning rate.
        weight_decay: the optimizer's weight decay (not applied to 1-D parameters and ``no_weight_decay()``).
        layer_decay: layer-wise learning-rate decay (e.g. 0.75): the head trains at ``lr``, each layer below at
            ``layer_decay`` times the one above, as the model's ``group_matcher`` groups them (timm's optimizer
            factory). None: one rate for all.
        warmup_epochs: linear warmup length in epochs (fractions allowed).
        warmup_lr: learning rate at step 0.
        min_lr: learning rate at the end of the schedule.
        ema_decay: EMA decay per optimizer step (e.g. 0.99996); None disables EMA.
        optimizer: timm's optimizer by name (``timm.optim.list_optimizers()``): "adamw", "lamb", ...
        schedule: the decay after warmup, "cosine" (classification recipes) or "poly" (linear, power 1: the
            segmentation and detection recipes of mmseg / mmdet).

    A checkpoint holds every weight: it is saved with ``pretrained`` off and no ``pretrained_file``, so restoring it
    (resume, ``load_from_checkpoint``, ``vimkit extract --checkpoint``) reads neither the released nor the initial file.
    """

    hparams: AttributeDict
    """Every ``__init__`` argument (``save_hyperparameters``), read as ``self.hparams.lr``: Lightning types the property
    more widely, as ``AttributeDict | MutableMapping``, which has no attributes for a type checker."""
    predictions_file: ClassVar[str] = "predictions"
    """``vimkit predict``'s output in the run folder when ``--predict_writer.output`` is not given."""
    export_hint: ClassVar[str] = "timm weights: vimkit export --ckpt <it> --out <file>"
    """How the fit's final report says to export the final checkpoint."""

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
        ema_decay: float | None = None,
        optimizer: str = "adamw",
        schedule: str = "cosine",
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
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule {schedule!r} is not one of {', '.join(SCHEDULES)}")
        self.class_names = self.default_class_names() if num_classes is None else [str(i) for i in range(num_classes)]
        self.hparams.num_classes = len(self.class_names)
        self.model = self.build_model(initial_weights=not _WEIGHTS_FROM_CHECKPOINT.get())
        self.ema = ModelEmaV3(self.model, decay=ema_decay) if ema_decay is not None else None
        if self.ema is not None:
            self.ema.requires_grad_(False)  # updated by averaging, never by gradients (and ignored by DDP)
            self.ema.module.train()  # follows this module's train/eval mode like any submodule; it only runs in eval
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
        """Classes the model predicts."""
        return self.hparams.num_classes

    # ----------------------------------------------------------------------------------------- model
    def model_kwargs(self) -> dict[str, Any]:
        """Task-specific ``timm.create_model`` arguments; subclasses extend this."""
        return {}

    def timm_kwargs(self) -> dict[str, Any]:
        """Every ``timm.create_model`` argument besides the name: the task's, ``model_kwargs``, ``drop_path_rate``."""
        return {**self.model_kwargs(), **(self.hparams.model_kwargs or {}), "drop_path_rate": self.hparams.drop_path_rate}

    def build_model(self, initial_weights: bool = True) -> nn.Module:
        """The network with released weights (``pretrained``), a weights file (``pretrained_file``) or, without either or
        without ``initial_weights``, a random initialisation."""
        raise NotImplementedError

    def default_class_names(self) -> list[str]:
        """The class names of a module given no ``num_classes``; ValueError unless the task has some of its own."""
        raise ValueError(
            "model.num_classes is not set; the vimkit command takes it from the data's classes: give a labelled split "
            "(train / val / test) in the data section, or a checkpoint file as --ckpt_path"
        )

    def restore_initial_weights(self) -> None:
        """Rebuild the model from ``pretrained`` / ``pretrained_file``, and the EMA from it: for a model built inside
        :func:`weights_from_checkpoint` whose checkpoint turned out not to exist (``--ckpt_path last`` on a new run)."""
        self.model = self.build_model()
        if self.ema is not None:
            self.ema.set(self.model)

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
        plan = SCHEDULES[hp.get("schedule", "cosine")](hp.lr, total_steps, warmup_steps, hp.warmup_lr, hp.min_lr)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": ScheduledLR(optimizer, plan), "interval": "step"}}

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
        """Reseed from (seed, step, batch, rank): augmentation on the batch and drop path then draw the same numbers
        after a resume."""
        seed_everything_from(mix_seed(self._base_seed, self.global_step, batch_idx, self.global_rank))

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """Step, then update the EMA (before any callback, e.g. a checkpoint, sees this step's weights)."""
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            self.ema.update(self.model)

    # ----------------------------------------------------------------------------------------- reporting
    def final_metric_line(self, metrics: dict[str, Any]) -> str | None:
        """The line of the fit's final report that gives the final validation score (None: no score logged)."""
        return None

    def write_predictions(self, predictions: list[Any], output: Path) -> str:
        """Write ``predict_step``'s outputs (one entry per batch) to ``output`` and say what was written, in one line."""
        raise NotImplementedError
