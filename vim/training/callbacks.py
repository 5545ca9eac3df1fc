"""Callbacks the ``vimkit`` command always installs: the final checkpoint, the predictions CSV writer; the final report."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.trainer.states import TrainerFn

from vim.training.classifier import Classifier
from vim.training.run_folder import LATEST


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


def final_report(trainer: Trainer, module: LightningModule, checkpoint: str | None, run_folder: Path | None) -> str:
    """What a finished ``vimkit fit`` prints: steps, the run folder, the final checkpoint and the final accuracy."""
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
        lines.append(f"Final checkpoint: {checkpoint} (step {step}; timm weights: vimkit export --ckpt <it> --out <file>)")
    accuracy = final_accuracy_line(trainer.callback_metrics, getattr(module, "ema", None) is not None)
    if accuracy is not None:
        lines.append(f"Final validation accuracy {accuracy}")
    return "\n".join(lines)


class CsvPredictionWriter(BasePredictionWriter):
    """Writes ``predict`` results as CSV: path, class and probability for each of the top-5 classes, and ``error``.

    Every input gets a row: one that could not be read (corrupt, empty, ...) has empty class columns and the reason
    in ``error``.

    Args:
        output: CSV path; None writes ``predictions.csv`` in the trainer's log directory (the run folder).
    """

    def __init__(self, output: str | None = None) -> None:
        super().__init__(write_interval="epoch")
        self.output = output

    def csv_path(self, trainer: Trainer) -> Path:
        return Path(self.output) if self.output is not None else Path(trainer.log_dir or ".") / "predictions.csv"

    def write_on_epoch_end(self, trainer: Trainer, pl_module: LightningModule, predictions: Any, batch_indices: Any) -> None:
        if trainer.world_size > 1:
            raise ValueError("CsvPredictionWriter writes from one process: run predict with trainer.devices=1")
        if not isinstance(pl_module, Classifier):
            raise TypeError(f"CsvPredictionWriter writes a vim Classifier's predictions, not a {type(pl_module).__name__}'s")
        names = pl_module.class_names
        path = self.csv_path(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        top_k = predictions[0]["indices"].shape[-1] if predictions else 5
        failed = [failure for batch in predictions for failure in batch.get("failed", [])]
        with path.open("w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["path"] + [f"{field}{k}" for k in range(1, top_k + 1) for field in ("class", "prob")] + ["error"])
            for batch in predictions:
                for sample_path, indices, probs in zip(batch["paths"], batch["indices"].tolist(), batch["probs"].tolist()):
                    writer.writerow([sample_path] + [v for i, p in zip(indices, probs) for v in (names[i], f"{p:.4f}")] + [""])
                for sample_path, reason in batch.get("failed", []):
                    writer.writerow([sample_path] + [""] * (2 * top_k) + [reason])
        predicted = sum(len(batch["paths"]) for batch in predictions)
        unreadable = f" and {len(failed)} unreadable files (the reason in the 'error' column)" if failed else ""
        bar = trainer.progress_bar_callback
        new_line = "\n" if bar is not None and getattr(bar, "is_enabled", False) else ""  # a bar leaves the cursor on its line
        print(f"{new_line}Predictions for {predicted} files{unreadable}: {path}")
