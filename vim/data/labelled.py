"""What every labelled data module shares (image, video and point-cloud classification, segmentation, detection):
loaders, resumable shuffling, skip reporting, classes.

:class:`LabelledDataModule` is the base of :class:`~vim.data.images.ImageDataModule`,
:class:`~vim.data.video.VideoClipDataModule`, :class:`~vim.data.points.PointCloudDataModule`,
:class:`~vim.data.segmentation.SegmentationDataModule` and :class:`~vim.data.detection.DetectionDataModule`, which are
siblings: each has only its own settings and supplies its class list, its datasets and its batch type. The base
turns them into Lightning's loaders:

- the training loader shuffles with a seed per epoch and resumes part way through an epoch (a run killed mid-epoch
  continues with the batch it had not taken; :class:`~vim.data.sampling.ResumableSampler`), counting the batches
  actually taken (with gradient accumulation, and batches whose samples were all unreadable);
- samples that cannot be read never stop an epoch: they are left out of their batch, and each is reported as a
  :class:`~vim.data.samples.DataWarning` naming the file, with a running count; other notes about a sample (a small
  image upsampled, a truncated video) are reported once each;
- ``num_classes`` is what the ``vimkit`` command passes to the model (``len(classes)``, or None when no labelled split
  is given, e.g. ``predict`` with a folder of unlabelled files).

Batches are named tuples whose first two fields are the inputs (B, ...) and the targets (B,), with ``paths`` (the
samples, for ``predict``) and ``skipped`` (the :class:`~vim.data.samples.Unreadable` samples left out).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch.utils.data import DataLoader, Dataset

from vim.data.samples import DataWarning
from vim.data.sampling import ResumableSampler
from vim.data.workers import default_num_workers

SPLITS = ("train", "val", "test")
"""The labelled splits; ``predict`` reads unlabelled samples."""


def paired_splits(second: str, **pairs: tuple[str | None, str | None]) -> dict[str, tuple[str | None, str | None]]:
    """``{split: (images, second)}`` of a task whose splits each need two settings (images and masks, images and
    annotations), given as ``train=(images, masks)``; ValueError naming the settings of a split that gives only one."""
    for split, (images, other) in pairs.items():
        if (images is None) != (other is None):
            raise ValueError(f"data.{split}_images and data.{split}_{second} go together: set both or neither")
    return pairs


def train_batches_per_epoch(trainer: Trainer | None, loader_batches: int) -> int:
    """Batches Lightning runs per training epoch: the loader's, cut by ``limit_train_batches`` (all without a trainer)."""
    if trainer is None:
        return loader_batches
    limit = trainer.limit_train_batches
    if isinstance(limit, float):
        return max(int(loader_batches * limit), 1)
    return max(min(loader_batches, int(limit)), 1) if limit is not None else loader_batches


def train_batches_run(trainer: Trainer) -> int:
    """Training batches the fit loop has run so far, over all epochs: every batch taken from the loader, including
    those inside a gradient-accumulation window and those whose samples were all unreadable.

    Where a resumed run's sampler starts. Optimizer steps times ``accumulate_grad_batches`` is not this count:
    an epoch ends with a step over the batches left, however few.
    """
    # Lightning declares `total` as the wider _ReadyCompletedTracker; a batch progress holds a _ProcessedTracker
    return trainer.fit_loop.epoch_loop.batch_progress.total.processed  # type: ignore[attr-defined]


class LabelledDataModule(LightningDataModule):
    """Loaders, resumable shuffling, skip reporting and classes for a modality's datasets (see the module docstring).

    A modality implements :meth:`read_classes`, :meth:`has_split`, :meth:`labelled_dataset`,
    :meth:`unlabelled_dataset` and :meth:`collate_fn`, and names its split settings in :attr:`split_settings`.

    Args:
        batch_size: samples per device and step (global batch = batch_size x devices x nodes).
        num_workers: loader processes per device; None: one per core that the device processes leave free, at most 8
            (:func:`~vim.data.workers.default_num_workers`).
        pin_memory: page-locked host memory for faster copies to the GPU.
        seed: seed of the shuffling and of each sample's augmentation (the same on every rank).
    """

    skipped_sample: ClassVar[str] = "unreadable sample"
    """What a skipped sample is called in its warning: "unreadable image", "unreadable video", "point cloud"."""
    split_settings: ClassVar[str] = "data.{split}_root"
    """The setting(s) that give a split, in messages; ``{split}`` is "train", "val" or "test"."""

    def __init__(self, batch_size: int, num_workers: int | None, pin_memory: bool, seed: int) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be at least 1 (samples per device and step), got {batch_size}")
        if num_workers is not None and num_workers < 0:
            raise ValueError(f"data.num_workers must be 0 (load in the main process) or more, got {num_workers}")
        # Settings live in attributes, not self.hparams: under LightningCLI hparams hold the config's arguments, and the
        # generated datasets' modules (e.g. DigitsDataModule's `root`) take others than the ones read here.
        self.batch_size, self.num_workers, self.pin_memory, self.seed = batch_size, num_workers, pin_memory, seed
        self.datasets: dict[str, Dataset] = {}
        self.num_skipped = 0
        self._reported: set[str] = set()
        self._restored_batches_run: int | None = None

    # ---------------------------------------------------------------------------------------- what a modality supplies
    def read_classes(self) -> list[str] | None:
        """Class names in label order, from the data's folders, lists or files; None when no labelled split is given."""
        raise NotImplementedError

    def has_split(self, split: str) -> bool:
        """Whether the settings name data for ``split`` ("train", "val" or "test")."""
        raise NotImplementedError

    def labelled_dataset(self, split: str, source: str) -> Dataset:
        """The samples of split ``source`` prepared for ``split`` (training augmentation for "train", test views for
        "test"); ``source`` differs from ``split`` where ``test`` falls back to the validation data."""
        raise NotImplementedError

    def unlabelled_dataset(self) -> Dataset:
        """The samples to classify with ``predict``."""
        raise NotImplementedError

    @staticmethod
    def collate_fn(samples: Sequence[Any]) -> Any:
        """A batch (see the module docstring) of dataset items; :class:`~vim.data.samples.Unreadable` ones go to ``skipped``."""
        raise NotImplementedError

    # ---------------------------------------------------------------------------------------- classes
    @functools.cached_property
    def _classes(self) -> list[str] | None:
        return self.read_classes()  # read once: every split's samples and the model ask, and a Kinetics list is long

    @property
    def classes(self) -> list[str]:
        """Class names in label order; ValueError when no labelled split is given."""
        if self._classes is None:
            settings = " or ".join(self.split_settings.format(split=split) for split in SPLITS)
            raise ValueError(f"no labelled data: set {settings}")
        return self._classes

    @property
    def num_classes(self) -> int | None:
        """``len(classes)``, or None when no labelled split is given (the model's own head then decides)."""
        return None if self._classes is None else len(self._classes)

    # ---------------------------------------------------------------------------------------- datasets
    def setup(self, stage: str) -> None:
        if stage == "fit":
            self.datasets["train"] = self.labelled_dataset("train", self._require("train", stage))
        if stage == "validate" or (stage == "fit" and self.has_split("val")):
            self.datasets["val"] = self.labelled_dataset("val", self._require("val", stage))
        if stage == "test":
            self.datasets["test"] = self.labelled_dataset("test", self._require("test", stage, fallback="val"))
        if stage == "predict":
            self.datasets["predict"] = self.unlabelled_dataset()

    def _require(self, split: str, stage: str, fallback: str | None = None) -> str:
        """``split``, else ``fallback``, whichever the settings give; ValueError naming the settings otherwise."""
        for candidate in (split, fallback):
            if candidate is not None and self.has_split(candidate):
                return candidate
        wanted = " or ".join(self.split_settings.format(split=s) for s in (split, fallback) if s is not None)
        raise ValueError(f"{stage} needs {wanted}")

    # ---------------------------------------------------------------------------------------- loaders
    def loader(self, dataset: Dataset, sampler: ResumableSampler | None = None) -> DataLoader:
        workers = self.loader_workers()
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=sampler is not None,
            num_workers=workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=workers > 0,
            collate_fn=self.collate_fn,
        )

    def loader_workers(self, processes: int | None = None) -> int:
        """``num_workers``, else the machine's share for each of ``processes`` device processes (default: the
        trainer's devices, 1 without a trainer)."""
        if self.num_workers is not None:
            return self.num_workers
        if processes is None:
            processes = 1 if self.trainer is None else self.trainer.num_devices
        return default_num_workers(processes=processes)

    def train_sampler(self) -> ResumableSampler:
        """This rank's seeded sampler of the training set (the whole set without a trainer)."""
        trainer = self.trainer
        replicas, rank = (1, 0) if trainer is None else (trainer.world_size, trainer.global_rank)
        return ResumableSampler(self.datasets["train"], replicas, rank, seed=self.seed, drop_last=True)

    def train_batches_per_epoch(self) -> int:
        """Training batches of one epoch (``limit_train_batches`` applied), known before the loader is built: what
        a schedule given in epochs needs when the trainer has not loaded the data (a run bounded by ``max_steps``)."""
        return train_batches_per_epoch(self.trainer, len(self.train_sampler()) // self.batch_size)

    def train_dataloader(self) -> DataLoader:
        """Shuffled per epoch from ``seed``; after a resume it starts where the interrupted run stopped.

        ValueError when an epoch would hold no full batch (a partial last batch is dropped): a fit would take no step.
        """
        sampler = self.train_sampler()
        if len(sampler) < self.batch_size:
            raise ValueError(
                f"data.batch_size {self.batch_size} is larger than the {len(sampler)} training samples an epoch gives "
                f"each device: it would hold no full batch (the last, partial one is dropped) and the fit would take no "
                f"step; give --data.batch_size {max(1, len(sampler))} or less, or more training data"
            )
        if self.trainer is not None:
            epoch, batches_done = divmod(self.train_batches_run(), self.train_batches_per_epoch())
            sampler.set_epoch(epoch)
            sampler.skip_once(batches_done * self.batch_size)
            # The sampler resumes mid-epoch itself, which Lightning cannot see: silence its warning about that.
            warnings.filterwarnings("ignore", "You're resuming from a checkpoint that ended before", PossibleUserWarning)
        return self.loader(self.datasets["train"], sampler)

    def val_dataloader(self) -> DataLoader | list:
        return self.loader(self.datasets["val"]) if "val" in self.datasets else []

    def test_dataloader(self) -> DataLoader:
        return self.loader(self.datasets["test"])

    def predict_dataloader(self) -> DataLoader:
        return self.loader(self.datasets["predict"])

    # ---------------------------------------------------------------------------------------- resuming
    def train_batches_run(self) -> int:
        """Training batches run so far: from the checkpoint being resumed (once), else from the trainer (none without)."""
        if self._restored_batches_run is not None:
            seen, self._restored_batches_run = self._restored_batches_run, None
            return seen
        return 0 if self.trainer is None else train_batches_run(self.trainer)

    def state_dict(self) -> dict[str, int]:
        """Saved in checkpoints. Lightning restores it before it builds the loaders; the fit loop's own progress
        (:func:`train_batches_run`) comes back only later, after ``configure_optimizers`` has built them."""
        return {"train_batches_seen": train_batches_run(self.trainer)} if self.trainer else {}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._restored_batches_run = state_dict.get("train_batches_seen")

    # ---------------------------------------------------------------------------------------- reporting
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Report the batch's skipped samples (each, with a running count) and its notes (each once) as they occur."""
        for path, reason in batch.skipped:
            self.num_skipped += 1
            self.warn(f"skipped {self.skipped_sample} '{path}' ({reason}); {self.num_skipped} skipped so far")
        for message in self.notes(batch):
            if message not in self._reported:
                self._reported.add(message)
                self.warn(message)
        return batch

    def notes(self, batch: Any) -> list[str]:
        """Messages about the batch's samples besides the skipped ones, each reported once (a modality's own)."""
        return []

    @staticmethod
    def warn(message: str) -> None:
        """A :class:`~vim.data.samples.DataWarning` raised here, in vim's data code (where the sample was handled),
        not at the Lightning hook that called it."""
        warnings.warn(message, DataWarning, stacklevel=1)
