"""The ``vimkit`` command (also ``python -m vim``).

- ``vimkit fit|validate|test|predict --config configs/<name>.yaml [--section.key value ...]``: LightningCLI
  over any :class:`~vim.training.classifier.Classifier` and classification data module named in the config
  (``class_path``, or a short class name: ``--model ImageClassifier``, ``--model.help ImageClassifier``). The data
  section sets what model and data share (``img_size``, ``num_frames``; the number of classes comes from the data's
  classes or, for data without a labelled split, from the checkpoint file given as ``--ckpt_path``). Each command
  writes into its own run folder (:mod:`vim.training.run_folder`: ``runs/<name>/version_N``, ``runs/<name>/latest``);
  checkpoints are written atomically, ``fit`` ends with a checkpoint of its final state and prints the validation
  accuracy of the weights ``export`` and ``predict`` use, and ``predict`` writes top-5 classes to CSV
  (``--predict_writer.output``; default ``<run folder>/predictions.csv``). ``--ckpt_path`` takes a file or a URL,
  read without running pickled code (:func:`vim.models.checkpoint.read_checkpoint`); resume an interrupted run with
  ``--ckpt_path last``. A command that loads a checkpoint does not read the model's released or initial weights file
  (the checkpoint holds every weight); ``predict`` without a checkpoint uses the model name's released weights.
- ``vimkit export --ckpt CKPT --out FILE.safetensors``: the trained (EMA) weights for ``timm.create_model``.
- ``vimkit extract ...``: forwarded to ``vim.extraction.main``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.rank_zero import rank_zero_only, rank_zero_warn

from vim.data.detection import DetectionDataModule  # noqa: F401
from vim.data.generated import (  # noqa: F401
    DigitsDataModule,
    MovingDigitsDataModule,
    SceneDetectionDataModule,
    SceneSegmentationDataModule,
    ShapesDataModule,
)
from vim.data.images import ImageDataModule  # noqa: F401

# The classes a config or `--model X` / `--data X` names by their short names: imported, so the parser knows them.
from vim.data.labelled import LabelledDataModule
from vim.data.points import PointCloudDataModule  # noqa: F401
from vim.data.segmentation import ADE20KDataModule, SegmentationDataModule  # noqa: F401
from vim.data.video import VideoClipDataModule  # noqa: F401
from vim.data.workers import available_cores
from vim.files import FolderInUseError, is_remote
from vim.models.checkpoint import CheckpointError
from vim.models.loading import read_training_checkpoint
from vim.models.weights import NoReleasedWeightsError, WeightsUnavailableError, has_released_weights
from vim.training.callbacks import FinalState, PredictionWriter, final_report
from vim.training.checkpoint_io import AtomicCheckpointIO
from vim.training.classifier import Classifier
from vim.training.detection import Detector  # noqa: F401
from vim.training.image_classifier import ImageClassifier  # noqa: F401
from vim.training.points import PointCloudClassifier  # noqa: F401
from vim.training.run_folder import RunFolder, finished
from vim.training.segmentation import Segmenter  # noqa: F401
from vim.training.task import TaskModule, weights_from_checkpoint
from vim.training.video import VideoClassifier  # noqa: F401

PROG = "vimkit"
"""The command's name in help and usage, however it was started (the console script or ``python -m vim``)."""
LIGHTNING_COMMANDS = {
    "fit": "train a model (--ckpt_path last resumes the latest run)",
    "validate": "evaluate a checkpoint on the validation data",
    "test": "evaluate a checkpoint on the test data (several views per video)",
    "predict": "write the top-5 classes of each input to a CSV",
}
COMMANDS = {
    **LIGHTNING_COMMANDS,
    "export": "ONNX, torch.export or AOTInductor model; .safetensors weights",
    "extract": "write features of images, video clips or point clouds",
}


def command_parser() -> argparse.ArgumentParser:
    """The top-level parser: ``vimkit --help`` lists every command with a line saying what it does."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Vision Mamba for images, video and point clouds: training, evaluation, export, feature extraction.",
        epilog=f"'{PROG} <command> --help' lists a command's options.",
    )
    commands = parser.add_subparsers(title="commands", metavar="<command>", required=True)
    for name, description in COMMANDS.items():
        commands.add_parser(name, help=description, add_help=False)
    return parser


def ignore_understood_dependency_warnings() -> None:
    """Ignore the dependency warnings a plain command would print that neither the user nor vim can act on."""
    # torch 2.9+ deprecates `isinstance(x, LeafSpec)`, which Lightning's own pytree helper still does every batch.
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
        module=r"lightning\.pytorch\.utilities\._pytree",
    )
    # jsonargparse 4.49 deprecates parser methods that LightningCLI calls (add_instantiator, instantiate_classes,
    # skip_none); shown only where deprecation warnings are turned on, as under PYTHONWARNINGS=default.
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"lightning\.pytorch\.cli")


UNCAUSED_NOTICES = {
    "lightning.pytorch.utilities.rank_zero": re.compile(
        r"(GPU|TPU|HPU) available: False"
        r"|💡 Tip: "
        r"|Loading `\w+_dataloader` to estimate number of stepping batches"
        r"|The following callbacks returned in `LightningModule\.configure_callbacks` will override"
    ),
    "torch.utils.cpp_extension": re.compile(r"No CUDA runtime is found"),
}
"""By logger, the notices that a plain run prints without the user causing them: Lightning's absent accelerators, its
advertisement, a step of its own bookkeeping, vim's own summary replacing Lightning's; torch's note, on a machine
without CUDA, that it found no CUDA runtime (on importing its C++ extension builder, as ``torch.compile`` does)."""


class _DropNotices(logging.Filter):
    def __init__(self, pattern: re.Pattern[str]) -> None:
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


def quiet_uncaused_notices() -> None:
    """Keep :data:`UNCAUSED_NOTICES` off a command's output (the loggers' other notices and warnings stay)."""
    for name, pattern in UNCAUSED_NOTICES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNotices) for f in logger.filters):
            logger.addFilter(_DropNotices(pattern))


GENERATED_DATA = {
    "vim.data.generated.DigitsDataModule",
    "vim.data.generated.MovingDigitsDataModule",
    "vim.data.generated.SceneDetectionDataModule",
    "vim.data.generated.ShapesDataModule",
    "vim.data.generated.SceneSegmentationDataModule",
}
"""The quickstarts' data modules: their data is generated (``root`` only says where), so a run keeps the config's name."""
DATA_FOLDER_SETTINGS = ("root", "train_root", "train_path", "train_list", "train_images")
QUICKSTART_RUNS = {"quickstart", "video_quickstart", "points_quickstart", "segmentation_quickstart", "detection_quickstart"}
"""The run names of the quickstart configs."""


def own_data_name(data: Any) -> str | None:
    """The name of the user's data in a fit's ``data`` config: its training folder's (or list's) name; None for a
    quickstart's generated data (wherever its ``root`` puts it) or data without a path."""
    args = data.get("init_args") or {}
    if data.get("class_path") in GENERATED_DATA:
        return None
    for key in DATA_FOLDER_SETTINGS:
        if args.get(key):
            path = Path(str(args[key])).resolve()
            return path.parent.name if path.name in ("train", "training") or path.is_file() else path.name
    return None


def name_quickstart_runs_after_the_data(config: Any) -> None:
    """A quickstart config on your own data (another data module) writes ``runs/<quickstart>_<your data's name>``, not
    the quickstart's ``runs/<quickstart>`` (whose ``latest`` would then move to a run on other data): its loggers named
    after a quickstart get the data's name appended."""
    data_name = own_data_name(config.get("data") or {})
    loggers = config.get("trainer", {}).get("logger")
    if data_name is None or not isinstance(loggers, list):
        return
    for logger in loggers:
        args = logger.get("init_args") if hasattr(logger, "get") else None
        if args is not None and args.get("name") in QUICKSTART_RUNS:
            args["name"] = f"{args['name']}_{data_name}"


def share_cores_with_data_workers(trainer: Trainer, datamodule: LightningDataModule) -> None:
    """On CPU, give torch the cores that this process's data-loader workers leave free.

    Oversubscribed OpenMP threads spin-wait on each other: on a 2-core machine with one loader worker,
    two torch threads made a small Vim's training step about eight times slower than one thread.
    ``OMP_NUM_THREADS``, when set, wins.
    """
    if "OMP_NUM_THREADS" in os.environ or not isinstance(trainer.accelerator, CPUAccelerator):
        return
    processes = max(1, trainer.num_devices)
    if isinstance(datamodule, LabelledDataModule):  # the workers its loaders will start (the trainer not yet attached)
        workers = datamodule.loader_workers(processes)
    else:
        workers = getattr(datamodule, "num_workers", 0)
    torch.set_num_threads(max(1, available_cores() // processes - workers))


def import_class(class_path: str) -> type:
    """The class a config's ``class_path`` names (``vim.training.segmentation.Segmenter``)."""
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def checkpoint_num_classes(ckpt_path: str | None) -> int | None:
    """The class count of the checkpoint file or URL ``ckpt_path`` (:func:`~vim.models.loading.read_training_checkpoint`:
    read safely, a URL downloaded for it); None for no file (``"last"`` is resolved later, with the run folder) or a
    checkpoint without it."""
    if ckpt_path is None or not (is_remote(ckpt_path) or Path(ckpt_path).is_file()):
        return None
    return read_training_checkpoint(ckpt_path, "--ckpt_path").num_classes


class VimCLI(LightningCLI):
    """LightningCLI with linked data and model settings, run folders, atomic checkpoint files, a final checkpoint and
    report, the predictions CSV, and initial weights read only when no checkpoint replaces them."""

    run_folder: RunFolder | None = None
    checkpoint_has_weights = False
    """The command loads a checkpoint, so the model was built without reading its released or initial weights."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(PredictionWriter, "predict_writer")
        # Set once, in the data section; a data module or model without the setting skips the link.
        parser.link_arguments("data.init_args.img_size", "model.init_args.img_size")
        parser.link_arguments("data.init_args.num_frames", "model.init_args.num_frames")
        parser.link_arguments(
            "data.num_classes",
            "model.init_args.num_classes",
            compute_fn=self.classes_of_data_or_checkpoint,
            apply_on="instantiate",
        )

    def classes_of_data_or_checkpoint(self, data_classes: int | None) -> int | None:
        """The model's class count: the data's; without a labelled split (``predict`` on a folder of inputs), that of
        the checkpoint file the command loads, whose class names the model then takes from it."""
        if data_classes is not None or self.subcommand is None:
            return data_classes
        return checkpoint_num_classes(self.config[self.subcommand].get("ckpt_path"))

    def instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand) if self.subcommand is not None else None
        ckpt_path = config.get("ckpt_path") if config is not None else None
        if config is not None and self.subcommand == "fit":
            name_quickstart_runs_after_the_data(config)
        if config is not None and self.subcommand == "predict" and ckpt_path is None:
            self.predict_with_released_weights(config.model)
        self.checkpoint_has_weights = ckpt_path is not None
        with weights_from_checkpoint() if self.checkpoint_has_weights else contextlib.nullcontext():
            super().instantiate_classes()

    @staticmethod
    def predict_with_released_weights(model: Any) -> None:
        """``predict`` without a checkpoint: the model's ``pretrained_file``, else the released weights of its name
        (random weights predict nothing). A task whose released weights are a backbone's only (segmentation) needs a
        checkpoint: ValueError."""
        name = model.init_args.model
        task = import_class(model.class_path)
        if not issubclass(task, Classifier):
            raise ValueError(
                f"vimkit predict with a {task.__name__} needs --ckpt_path (a checkpoint of its training): released "
                f"weights are a backbone's, without the {task.__name__}'s head"
            )
        if model.init_args.get("pretrained_file"):
            return
        if has_released_weights(name):
            model.init_args.pretrained = True
        else:
            warnings.warn(
                f"vimkit predict without --ckpt_path: model '{name}' has no released weights, so the predictions come from "
                "randomly initialised weights",
                stacklevel=1,
            )

    def instantiate_trainer(self, **kwargs) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # not replaced by the config
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        share_cores_with_data_workers(trainer, self.datamodule)
        if self.subcommand is not None:
            self.run_folder = RunFolder.choose(trainer, self.subcommand, self.config[self.subcommand].get("ckpt_path"))
            if self.run_folder is not None:
                trainer.callbacks.append(self.run_folder)  # type: ignore[attr-defined]  # set by Lightning, undeclared
        return trainer

    def checkpoint_to_load(self, model: LightningModule, ckpt_path: str | None) -> str | None:
        """``ckpt_path`` with ``"last"`` resolved to the latest run's last checkpoint (:mod:`vim.training.run_folder`).

        When there is none, the model gets the initial weights it was built without."""
        if ckpt_path == "last" and self.run_folder is not None:
            ckpt_path = None if self.run_folder.checkpoint is None else str(self.run_folder.checkpoint)
        if ckpt_path is None and self.checkpoint_has_weights and isinstance(model, TaskModule):
            model.restore_initial_weights()
        return ckpt_path

    def fit(self, model: LightningModule, ckpt_path: str | None = None, **kwargs: Any) -> None:
        """Train (unless the checkpoint to resume already finished), validate the final weights if the last validation
        saw earlier ones, and print the report."""
        resume = self.checkpoint_to_load(model, ckpt_path)
        if ckpt_path == "last" and resume is None and self.run_folder is not None:
            rank_zero_warn(f"--ckpt_path last: no run under {self.run_folder.root} has a last checkpoint; starting a new run")
        if resume is not None and Path(resume).is_file() and (reason := finished(Path(resume), self.trainer)):
            # the trainer's own rank is known only once fit has set up its processes; Lightning sets `rank` on the
            # function, which lightning_utilities' signature does not declare
            if rank_zero_only.rank == 0:  # type: ignore[attr-defined]
                print(reason)
            return
        self.trainer.fit(model, ckpt_path=resume, **kwargs)
        callbacks = self.trainer.callbacks  # type: ignore[attr-defined]  # set by Lightning's callback connector, undeclared
        final = next(callback for callback in callbacks if isinstance(callback, FinalState))
        if not final.final_weights_validated(self.trainer) and sum(self.trainer.num_val_batches) > 0:
            self.trainer.validate(model, datamodule=kwargs.get("datamodule"), verbose=False)
        if self.trainer.is_global_zero:
            folder = self.run_folder.path if self.run_folder is not None else None
            print("\n" + final_report(self.trainer, model, final.checkpoint, folder))

    def validate(self, model: LightningModule, ckpt_path: str | None = None, **kwargs: Any) -> Any:
        return self.trainer.validate(model, ckpt_path=self.checkpoint_to_load(model, ckpt_path), **kwargs)

    def test(self, model: LightningModule, ckpt_path: str | None = None, **kwargs: Any) -> Any:
        return self.trainer.test(model, ckpt_path=self.checkpoint_to_load(model, ckpt_path), **kwargs)

    def predict(self, model: LightningModule, ckpt_path: str | None = None, **kwargs: Any) -> Any:
        return self.trainer.predict(model, ckpt_path=self.checkpoint_to_load(model, ckpt_path), **kwargs)


def run_lightning(argv: list[str] | None = None, run: bool = True) -> VimCLI:
    """Parse ``argv`` (``fit --config ...``; None: the command line) and run it; with ``run=False``, ``argv`` has no
    subcommand."""
    return VimCLI(
        TaskModule,
        LabelledDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_defaults={"callbacks": [FinalState()]},
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": PROG},
        args=argv,
        run=run,
    )


def weights_error(error: BaseException) -> BaseException | None:
    """The weights error behind ``error``, if any, whose message alone ends the command: missing released weights
    (neither cached nor downloadable, a name without them), or a checkpoint that is refused (pickled code) or cannot be
    downloaded. jsonargparse wraps what a model's ``__init__`` or a link raises in a long validation error."""
    link: BaseException | None = error
    while link is not None:
        if isinstance(link, (NoReleasedWeightsError, WeightsUnavailableError, CheckpointError)):
            return link
        link = link.__cause__ or link.__context__
    return None


@contextlib.contextmanager
def errors_in_one_line(command: str) -> Iterator[None]:
    """End ``vimkit <command>`` on an expected error with ``vimkit <command>: error: <message>`` and exit status 1, as
    ``fit`` ends on missing weights: bad settings or inputs (ValueError, NoReleasedWeightsError among them), a file
    that is missing or cannot be written (OSError: not found, permission denied, a read-only or full disk), an output
    folder in use. Any other exception is a bug and keeps its traceback."""
    try:
        yield
    except (ValueError, OSError, FolderInUseError) as error:
        sys.exit(f"{PROG} {command}: error: {error}")


def main(argv: list[str] | None = None) -> None:
    """``vimkit <command> ...``: ``argv`` (default: the command line) names the command; ``vimkit --help`` lists them."""
    args = sys.argv[1:] if argv is None else list(argv)
    command = args[0] if args else None
    ignore_understood_dependency_warnings()
    quiet_uncaused_notices()
    if command == "extract":
        from vim.extraction import main as extract_main  # imported only when asked for

        with errors_in_one_line(command):
            extract_main(args[1:])
    elif command == "export":
        from vim.deploy.cli import main as export_main  # imported only when asked for

        with errors_in_one_line(command):
            export_main(args[1:])
    elif command in LIGHTNING_COMMANDS:
        try:
            run_lightning(argv)  # None: LightningCLI reads the command line itself
        except Exception as error:
            cause = weights_error(error) or (error if isinstance(error, ValueError) else None)
            if cause is None:
                raise
            sys.exit(f"{PROG} {command}: error: {cause}")
    else:
        command_parser().parse_args(args)  # prints the commands (--help), or names what is missing or unknown


if __name__ == "__main__":
    main()
