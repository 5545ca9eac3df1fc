"""The ``vim`` command.

- ``vim fit|validate|test|predict --config configs/<name>.yaml [--section.key value ...]``: LightningCLI
  over any :class:`~vim.training.classifier.Classifier` and datamodule named in the config
  (``class_path``), with checkpoints written atomically, a final accuracy line after ``fit``, and
  ``predict`` writing top-5 classes to CSV (``--predict_writer.output``; default ``<log_dir>/predictions.csv``).
  Resume an interrupted run with ``--ckpt_path last``.
- ``vim export --ckpt CKPT --out FILE.safetensors``: the trained (EMA) weights for ``timm.create_model``.
- ``vim extract ...``: forwarded to ``vim.extraction.main``.
"""

from __future__ import annotations

import os
import sys

import torch
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO

from vim.training.callbacks import CsvPredictionWriter, FinalReport
from vim.training.checkpoint_io import AtomicCheckpointIO
from vim.training.classifier import Classifier


def share_cores_with_data_workers(trainer: Trainer, datamodule: LightningDataModule) -> None:
    """On CPU, give torch the cores that this process's data-loader workers leave free.

    Oversubscribed OpenMP threads spin-wait on each other: on a 2-core machine with one loader worker,
    two torch threads made a small Vim's training step about eight times slower than one thread.
    ``OMP_NUM_THREADS``, when set, wins.
    """
    if "OMP_NUM_THREADS" in os.environ or not isinstance(trainer.accelerator, CPUAccelerator):
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    per_process = cores // max(1, trainer.num_devices)
    torch.set_num_threads(max(1, per_process - getattr(datamodule, "num_workers", 0)))


class VimCLI(LightningCLI):
    """LightningCLI with the predictions CSV writer and atomic checkpoint files."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(CsvPredictionWriter, "predict_writer")

    def instantiate_trainer(self, **kwargs) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # not replaced by the config
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        share_cores_with_data_workers(trainer, self.datamodule)
        return trainer


def run_lightning(argv: list[str], run: bool = True) -> VimCLI:
    """Parse ``argv`` (``fit --config ...``) and run it; with ``run=False``, ``argv`` has no subcommand."""
    return VimCLI(
        Classifier,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_defaults={"callbacks": [FinalReport()]},
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
