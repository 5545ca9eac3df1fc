"""Where a ``vimkit`` run writes: a folder per run, and ``latest`` pointing at the newest run that has a checkpoint.

With a config's loggers at ``save_dir: runs, name: quickstart`` (and ModelCheckpoint without a ``dirpath``)::

    runs/quickstart/
        version_0/                      the first `vimkit fit --config configs/quickstart.yaml`
            config.yaml                 the settings it ran with
            hparams.yaml, metrics.csv   CSV logger (tools/plot_metrics.py draws metrics.csv)
            tensorboard/                TensorBoard logger (its sub_dir)
            checkpoints/last.ckpt       the run's final state (periodic checkpoints beside it)
            test_0/                     a later `vimkit test` of one of its checkpoints (validate_N, predict_N alike)
        version_1/                      the next fit
        latest -> version_1

``latest`` is the highest ``version_N`` holding a ``checkpoints/last.ckpt``: a new fit moves it to its folder once it
has written that file, so a fit stopped before its first checkpoint (interrupted, crashed, or given a ``--ckpt_path``
that does not exist) leaves ``latest`` on the run that can be resumed.

``fit`` opens the next ``version_N`` folder, except when it resumes a run's own ``checkpoints/last.ckpt``
(``--ckpt_path last``: that of the highest ``version_N`` holding one, where ``latest`` points): then it continues
that run in its folder, appending to its ``metrics.csv``. Resuming from any other checkpoint starts a new run (a
branch), so no two runs ever write under one name. ``validate``, ``test`` and ``predict`` write into a numbered
folder inside the run whose checkpoint they load (or directly under ``runs/<name>`` for a checkpoint from
elsewhere).

The loggers sharing the first logger's ``save_dir/name`` are given the chosen folder as their version
before anything is written; the first logger's folder is Lightning's default checkpoint folder.
"""

from __future__ import annotations

import csv
import io
import os
import re
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.trainer.states import TrainerFn

from vim.files import atomic_write
from vim.models.checkpoint import read_checkpoint

FOLDER_LOGGERS = (CSVLogger, TensorBoardLogger)
"""Loggers that write into ``save_dir/name/<version>``: the run folder is their version."""
LATEST = "latest"
LAST_CHECKPOINT = Path("checkpoints", f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{ModelCheckpoint.FILE_EXTENSION}")
"""A run folder's final (or newest) state, relative to the folder."""


# ---------------------------------------------------------------------------------------------- folders
def next_folder(parent: Path, stem: str) -> str:
    """``<stem>_<N>``, N one above the highest existing ``<stem>_*`` folder in ``parent`` (0 if none)."""
    numbers = [int(m.group(1)) for p in parent.glob(f"{stem}_*") if p.is_dir() and (m := re.fullmatch(rf"{stem}_(\d+)", p.name))]
    return f"{stem}_{max(numbers, default=-1) + 1}"


def latest_run(root: Path) -> str | None:
    """The highest ``version_N`` folder under ``root`` holding a last checkpoint, or None.

    Found from the folders, not read from the ``latest`` link: a process killed between writing its first checkpoint
    and moving the link leaves the link one run behind.
    """
    numbers = [int(m.group(1)) for p in root.glob("version_*") if (m := re.fullmatch(r"version_(\d+)", p.name))]
    runs = (f"version_{n}" for n in sorted(numbers, reverse=True))
    return next((run for run in runs if (root / run / LAST_CHECKPOINT).is_file()), None)


def point_latest(root: Path) -> None:
    """Point ``root/latest`` at :func:`latest_run` (a relative link, replaced in one step); unchanged while no run has
    a last checkpoint."""
    version = latest_run(root)
    link = root / LATEST
    if version is None or (link.is_symlink() and link.readlink() == Path(version)):
        return
    tmp = root / f".{LATEST}.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(version, target_is_directory=True)
    tmp.replace(link)


def run_of(root: Path, checkpoint: str | os.PathLike) -> str | None:
    """The run folder name (``version_N``) under ``root`` that holds ``checkpoint``, or None."""
    try:
        relative = Path(checkpoint).resolve().relative_to(root.resolve())
    except ValueError:
        return None
    return relative.parts[0] if len(relative.parts) > 1 else None


def resolve_checkpoint(root: Path, ckpt_path: str | None) -> Path | None:
    """The file that ``ckpt_path`` names: ``"last"`` is the latest run's last checkpoint; None when there is none."""
    if ckpt_path is None or ckpt_path in ("best", "hpc", "registry"):
        return None
    if ckpt_path == "last":
        run = latest_run(root)
        return root / run / LAST_CHECKPOINT if run is not None else None
    return Path(ckpt_path)


# ---------------------------------------------------------------------------------------------- the run
class RunFolder(Callback):
    """The folder of one ``vimkit`` command, chosen before anything is written (see the module docstring).

    Args:
        root: ``save_dir/name`` of the run's loggers, e.g. ``runs/quickstart``.
        version: the folder under ``root``: ``version_3``, or ``version_3/test_0`` for an evaluation.
        checkpoint: the checkpoint the command loads (``"last"`` resolved), or None.
        continues: ``fit`` continues the run of ``checkpoint`` in its folder.
    """

    def __init__(self, root: Path, version: str, checkpoint: Path | None, continues: bool) -> None:
        self.root, self.version, self.checkpoint, self.continues = root, version, checkpoint, continues
        self.checkpointed = False
        """This run's folder holds a last checkpoint and ``latest`` was brought up to date."""

    @property
    def path(self) -> Path:
        return self.root / self.version

    @classmethod
    def choose(cls, trainer: Trainer, subcommand: str, ckpt_path: str | None) -> RunFolder | None:
        """The folder for ``vimkit <subcommand> --ckpt_path <ckpt_path>``, with the trainer's loggers pointed at it.

        None when the first logger is not a CSV or TensorBoard logger (whose folders are ``save_dir/name/version``).
        """
        if not trainer.loggers or not isinstance(trainer.loggers[0], FOLDER_LOGGERS):
            return None
        root = Path(trainer.loggers[0].root_dir)
        checkpoint = resolve_checkpoint(root, ckpt_path)
        run = run_of(root, checkpoint) if checkpoint is not None else None
        continues = False
        if subcommand == "fit":
            if checkpoint is not None and run is not None:
                continues = checkpoint.resolve() == (root / run / LAST_CHECKPOINT).resolve()
            version = run if run is not None and continues else next_folder(root, "version")
        elif run is None:
            version = next_folder(root, subcommand)
        else:
            version = str(Path(run, next_folder(root / run, subcommand)))
            for callback in trainer.checkpoint_callbacks:
                if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
                    # An evaluation saves nothing; the run's own folder lets ModelCheckpoint restore its state quietly.
                    callback.dirpath = str(root / run / LAST_CHECKPOINT.parent)
        for logger in trainer.loggers:
            if isinstance(logger, FOLDER_LOGGERS) and Path(logger.root_dir) == root:
                logger._version = version  # what their `version` argument sets; read when they first write
        return cls(root, version, checkpoint, continues)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if trainer.is_global_zero:
            self.path.mkdir(parents=True, exist_ok=True)
            if stage == "fit":
                point_latest(self.root)  # a link left behind by a process killed after a checkpoint

    # `latest` follows this run's first last.ckpt: checked after any step may have written it, at the end and on failure
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self.point_latest_once_checkpointed(trainer)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self.point_latest_once_checkpointed(trainer)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            self.point_latest_once_checkpointed(trainer)

    def point_latest_once_checkpointed(self, trainer: Trainer) -> None:
        if trainer.is_global_zero and not self.checkpointed and (self.path / LAST_CHECKPOINT).is_file():
            self.checkpointed = True
            point_latest(self.root)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """A continued run drops the metrics its previous process logged after the checkpoint it resumes."""
        if self.continues and trainer.is_global_zero:
            for logger in trainer.loggers:
                if isinstance(logger, RunCSVLogger):
                    logger.drop_rows_after(trainer.global_step)


def finished(checkpoint: Path, trainer: Trainer) -> str | None:
    """Why resuming ``checkpoint`` would train nothing (its epochs or steps already reach the trainer's limits), or None."""
    state = read_checkpoint(checkpoint, mmap=True)
    epochs = state["loops"]["fit_loop"]["epoch_progress"]["current"]["completed"]
    steps = state["global_step"]
    if trainer.max_steps != -1 and steps >= trainer.max_steps:
        limit = f"max_steps={trainer.max_steps}"
    elif trainer.max_epochs is not None and trainer.max_epochs != -1 and epochs >= trainer.max_epochs:
        limit = f"max_epochs={trainer.max_epochs}"
    else:
        return None
    return (
        f"Nothing left to do: {checkpoint} already holds the end of its run ({epochs} epochs, {steps} steps; {limit}). "
        "Raise --trainer.max_epochs or --trainer.max_steps to train further."
    )


# ---------------------------------------------------------------------------------------------- metrics.csv
class ContinuedMetricsWriter(ExperimentWriter):
    """Lightning's ``metrics.csv`` writer, except that it appends to the file of the run it continues."""

    def _check_log_dir_exists(self) -> None:  # Lightning's deletes an existing metrics.csv, with a warning
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, mode="r", newline="") as file:
                self.metrics_keys = next(csv.reader(file), [])


class RunCSVLogger(CSVLogger):
    """Lightning's CSV logger for a :class:`RunFolder`: a continued run appends to its ``metrics.csv``.

    Same arguments as ``lightning.pytorch.loggers.CSVLogger``.
    """

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if not isinstance(self._experiment, ExperimentWriter):  # None before the first write
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = ContinuedMetricsWriter(log_dir=self.log_dir)
        return self._experiment

    def drop_rows_after(self, step: int) -> None:
        """Drop the rows of ``metrics.csv`` logged after the checkpoint of optimizer step ``step`` that a run resumes.

        Lightning stamps a training batch with the steps done before it (the batch that makes step ``step + 1`` is
        logged at ``step``), an evaluation with the steps done: rows past ``step``, and training rows at it, came
        after the checkpoint, and the resumed run logs them again.
        """
        self.save()
        path = Path(self.log_dir, ExperimentWriter.NAME_METRICS_FILE)
        if not path.is_file():
            return
        with path.open(newline="") as file:
            header, *rows = list(csv.reader(file)) or [[]]
        if "step" not in header:
            return
        column = header.index("step")
        training = [i for i, name in enumerate(header) if name.startswith(("train/", "lr-"))]

        def before_checkpoint(row: list[str]) -> bool:
            logged = int(float(row[column])) if row[column] else -1
            return logged < step or (logged == step and not any(row[i] for i in training))

        kept = [row for row in rows if before_checkpoint(row)]
        if len(kept) < len(rows):
            text = io.StringIO()
            csv.writer(text).writerows([header, *kept])
            atomic_write(path, lambda tmp: tmp.write_text(text.getvalue()))
