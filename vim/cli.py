"""The ``vim`` command.

- ``vim fit|validate|test|predict --config configs/<name>.yaml [--section.key value ...]``: LightningCLI
  over any :class:`~vim.training.classifier.Classifier` and datamodule named in the config
  (``class_path``). Each command writes into its own run folder (:mod:`vim.training.run_folder`:
  ``runs/<name>/version_N``, ``runs/<name>/latest``); checkpoints are written atomically, ``fit`` ends with
  a checkpoint of its final state and prints the validation accuracy of the weights ``export`` and
  ``predict`` use, and ``predict`` writes top-5 classes to CSV (``--predict_writer.output``; default
  ``<run folder>/predictions.csv``). Resume an interrupted run with ``--ckpt_path last``.
- ``vim export --ckpt CKPT --out FILE.safetensors``: the trained (EMA) weights for ``timm.create_model``.
- ``vim extract ...``: forwarded to ``vim.extraction.main``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.rank_zero import rank_zero_only, rank_zero_warn

from vim.data.workers import available_cores
from vim.training.callbacks import CsvPredictionWriter, FinalState, final_report
from vim.training.checkpoint_io import AtomicCheckpointIO
from vim.training.classifier import Classifier
from vim.training.run_folder import RunFolder, finished


def share_cores_with_data_workers(trainer: Trainer, datamodule: LightningDataModule) -> None:
    """On CPU, give torch the cores that this process's data-loader workers leave free.

    Oversubscribed OpenMP threads spin-wait on each other: on a 2-core machine with one loader worker,
    two torch threads made a small Vim's training step about eight times slower than one thread.
    ``OMP_NUM_THREADS``, when set, wins.
    """
    if "OMP_NUM_THREADS" in os.environ or not isinstance(trainer.accelerator, CPUAccelerator):
        return
    per_process = available_cores() // max(1, trainer.num_devices)
    torch.set_num_threads(max(1, per_process - getattr(datamodule, "num_workers", 0)))


class VimCLI(LightningCLI):
    """LightningCLI with run folders, atomic checkpoint files, a final checkpoint and report, and the predictions CSV."""

    run_folder: RunFolder | None = None

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(CsvPredictionWriter, "predict_writer")

    def instantiate_trainer(self, **kwargs) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # not replaced by the config
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        share_cores_with_data_workers(trainer, self.datamodule)
        if self.subcommand is not None:
            self.run_folder = RunFolder.choose(trainer, self.subcommand, self.config[self.subcommand].get("ckpt_path"))
            if self.run_folder is not None:
                trainer.callbacks.append(self.run_folder)
        return trainer

    def checkpoint_to_load(self, ckpt_path: str | None) -> str | None:
        """``ckpt_path`` with ``"last"`` resolved to the latest run's last checkpoint (:mod:`vim.training.run_folder`)."""
        if ckpt_path == "last" and self.run_folder is not None:
            return None if self.run_folder.checkpoint is None else str(self.run_folder.checkpoint)
        return ckpt_path

    def fit(self, model: LightningModule, ckpt_path: str | None = None, **kwargs: Any) -> None:
        """Train (unless the checkpoint to resume already finished), validate the final weights if the last validation
        saw earlier ones, and print the report."""
        resume = self.checkpoint_to_load(ckpt_path)
        if ckpt_path == "last" and resume is None and self.run_folder is not None:
            rank_zero_warn(f"--ckpt_path last: no run under {self.run_folder.root} has a last checkpoint; starting a new run")
        if resume is not None and Path(resume).is_file() and (reason := finished(Path(resume), self.trainer)):
            if rank_zero_only.rank == 0:  # the trainer's own rank is known only once fit has set up its processes
                print(reason)
            return
        self.trainer.fit(model, ckpt_path=resume, **kwargs)
        final = next(callback for callback in self.trainer.callbacks if isinstance(callback, FinalState))
        if not final.final_weights_validated(self.trainer) and sum(self.trainer.num_val_batches) > 0:
            self.trainer.validate(model, datamodule=kwargs.get("datamodule"), verbose=False)
        if self.trainer.is_global_zero:
            folder = self.run_folder.path if self.run_folder is not None else None
            print("\n" + final_report(self.trainer, model, final.checkpoint, folder))

    def validate(self, model: LightningModule, ckpt_path: str | None = None, **kwargs: Any) -> Any:
        return self.trainer.validate(model, ckpt_path=self.checkpoint_to_load(ckpt_path), **kwargs)

    def test(self, model: LightningModule, ckpt_path: str | None = None, **kwargs: Any) -> Any:
        return self.trainer.test(model, ckpt_path=self.checkpoint_to_load(ckpt_path), **kwargs)

    def predict(self, model: LightningModule, ckpt_path: str | None = None, **kwargs: Any) -> Any:
        return self.trainer.predict(model, ckpt_path=self.checkpoint_to_load(ckpt_path), **kwargs)


def run_lightning(argv: list[str], run: bool = True) -> VimCLI:
    """Parse ``argv`` (``fit --config ...``) and run it; with ``run=False``, ``argv`` has no subcommand."""
    return VimCLI(
        Classifier,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_defaults={"callbacks": [FinalState()]},
        save_config_kwargs={"overwrite": True},
        args=argv,
        run=run,
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["extract"]:
        from vim.extraction import main as extract_main  # imported only when asked for

        extract_main(argv[1:])
    elif argv[:1] == ["export"]:
        from vim.training import export

        export.main(argv[1:])
    else:
        run_lightning(argv)


if __name__ == "__main__":
    main()
