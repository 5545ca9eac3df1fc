"""Callbacks the ``vimkit`` command always installs: the final checkpoint, the predictions writer; the final report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.trainer.states import TrainerFn

from vim.training.run_folder import LATEST
from vim.training.task import TaskModule


class FinalState(Callback):
    """Ends every ``fit`` with a checkpoint of its final state, and notes whether its last validation saw that state.

    The trainer's checkpoint folder gets ``last.ckpt`` (weights, EMA, optimizer, schedule, loop and data position),
    written through the trainer's checkpoint IO (atomically, under the ``vimkit`` command), whatever the periodic checkpoints'
    schedule: a run of 176 steps checkpointed every 50 ends with step 176, not 150. A run that stops at
    ``max_steps`` saves after its last batch, as a periodic checkpoint would, so that raising ``max_steps`` continues
    the same epoch (Lightning counts an epoch cut short at the end of training as complete).
    """

    def __init__(self) -> None:
        self.checkpoint: str | None = None
        self.saved_step: int | None = None
        self.validated_step: int | None = None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.checkpoint = self.saved_step = self.validated_step = None

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self.validated_step = trainer.global_step

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps:
            self.save(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.save(trainer)

    def save(self, trainer: Trainer) -> None:
        """Write ``last.ckpt`` in the checkpoint folder, once per step."""
        checkpoints = trainer.checkpoint_callback
        if not isinstance(checkpoints, ModelCheckpoint) or checkpoints.dirpath is None or self.saved_step == trainer.global_step:
            return
        path = str(Path(checkpoints.dirpath, checkpoints.CHECKPOINT_NAME_LAST + checkpoints.FILE_EXTENSION))
        checkpoints.last_model_path = path  # part of the saved state, as ModelCheckpoint records it before saving
        trainer.save_checkpoint(path, weights_only=False)
        self.checkpoint, self.saved_step = path, trainer.global_step

    def final_weights_validated(self, trainer: Trainer) -> bool:
        """Whether this fit's last validation ran on the weights it ended with."""
        return self.validated_step == trainer.global_step


def final_report(trainer: Trainer, module: LightningModule, checkpoint: str | None, run_folder: Path | None) -> str:
    """What a finished ``vimkit fit`` prints: steps, the run folder, the final checkpoint and the final score."""
    lines = [f"Finished {trainer.current_epoch} epochs, {trainer.global_step} steps."]
    if run_folder is not None:
        latest = run_folder.parent / LATEST
        pointed = latest.is_symlink() and latest.resolve() == run_folder.resolve()
        lines.append(f"Run folder: {run_folder}" + (f" ({latest} points at it)" if pointed else ""))
    for logger in trainer.loggers:
        if isinstance(logger, CSVLogger):
            metrics = Path(logger.log_dir, "metrics.csv")
            lines.append(f"Metrics: {metrics} (plot: python tools/plot_metrics.py {metrics})")
    if checkpoint is not None:
        step = trainer.global_step
        export = getattr(module, "export_hint", TaskModule.export_hint)
        lines.append(f"Final checkpoint: {checkpoint} (step {step}; {export})")
    score = module.final_metric_line(trainer.callback_metrics) if isinstance(module, TaskModule) else None
    if score is not None:
        lines.append(score)
    return "\n".join(lines)


class PredictionWriter(BasePredictionWriter):
    """Writes ``predict``'s results through the task module's ``write_predictions``: top-5 classes as a CSV, masks as
    PNGs, detections as COCO-format JSON. Every input is accounted for: one that could not be read (corrupt, empty,
    ...) is listed with the reason.

    Args:
        output: where to write; None: the task's ``predictions_file`` (``predictions.csv``, ``masks``,
            ``detections.json``) in the trainer's log directory (the run folder).
    """

    def __init__(self, output: str | None = None) -> None:
        super().__init__(write_interval="epoch")
        self.output = output

    def output_path(self, trainer: Trainer, module: TaskModule) -> Path:
        return Path(self.output) if self.output is not None else Path(trainer.log_dir or ".") / module.predictions_file

    def write_on_epoch_end(self, trainer: Trainer, pl_module: LightningModule, predictions: Any, batch_indices: Any) -> None:
        if trainer.world_size > 1:
            raise ValueError("PredictionWriter writes from one process: run predict with trainer.devices=1")
        if not isinstance(pl_module, TaskModule):
            raise TypeError(f"PredictionWriter writes a vim task module's predictions, not a {type(pl_module).__name__}'s")
        written = pl_module.write_predictions(list(predictions), self.output_path(trainer, pl_module))
        bar = trainer.progress_bar_callback
        new_line = "\n" if bar is not None and getattr(bar, "is_enabled", False) else ""  # a bar leaves the cursor on its line
        print(f"{new_line}{written}")
