"""Callbacks the ``vim`` command always installs: a final accuracy report and the predictions CSV writer."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter


def final_accuracy_line(metrics: dict[str, Any]) -> str | None:
    """``val top-1 93.1% top-5 99.7% | EMA top-1 94.0% top-5 99.7%`` from logged metrics (None without val accuracy)."""
    parts = []
    for prefix, label in (("val/", "val"), ("val_ema/", "EMA")):
        if f"{prefix}acc1" in metrics:
            parts.append(
                f"{label} top-1 {100 * float(metrics[f'{prefix}acc1']):.1f}% top-5 {100 * float(metrics[f'{prefix}acc5']):.1f}%"
            )
    return " | ".join(parts) or None


class FinalReport(Callback):
    """Prints, at the end of ``fit``, the last validation accuracy, where the logs and checkpoints are."""

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        log_dir = trainer.log_dir  # a collective call under ddp: every rank asks, rank 0 prints
        if not trainer.is_global_zero:
            return
        line = final_accuracy_line(trainer.callback_metrics)
        print(f"\nFinished {trainer.current_epoch} epochs, {trainer.global_step} steps.")
        if log_dir is not None:
            print(f"Logs: {log_dir} (plot: python tools/plot_metrics.py {log_dir}/metrics.csv)")
        if trainer.checkpoint_callback is not None and trainer.checkpoint_callback.last_model_path:
            print(f"Checkpoint: {trainer.checkpoint_callback.last_model_path} (weights: vim export --ckpt <it> --out <file>)")
        if line is not None:
            print(f"Final validation accuracy: {line}")


class CsvPredictionWriter(BasePredictionWriter):
    """Writes ``predict`` results as CSV: path, then class and probability for each of the top-5 classes.

    Args:
        output: CSV path; None writes ``predictions.csv`` in the trainer's log directory.
    """

    def __init__(self, output: str | None = None) -> None:
        super().__init__(write_interval="epoch")
        self.output = output

    def csv_path(self, trainer: Trainer) -> Path:
        return Path(self.output) if self.output is not None else Path(trainer.log_dir or ".") / "predictions.csv"

    def write_on_epoch_end(self, trainer: Trainer, pl_module: LightningModule, predictions: Any, batch_indices: Any) -> None:
        if trainer.world_size > 1:
            raise ValueError("CsvPredictionWriter writes from one process: run predict with trainer.devices=1")
        names = pl_module.class_names
        path = self.csv_path(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        top_k = predictions[0]["indices"].shape[-1] if predictions else 5
        with open(path, "w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["path"] + [f"{field}{k}" for k in range(1, top_k + 1) for field in ("class", "prob")])
            for batch in predictions:
                for sample_path, indices, probs in zip(batch["paths"], batch["indices"].tolist(), batch["probs"].tolist()):
                    writer.writerow([sample_path] + [v for i, p in zip(indices, probs) for v in (names[i], f"{p:.4f}")])
        print(f"Predictions for {sum(len(b['paths']) for b in predictions)} files: {path}")
