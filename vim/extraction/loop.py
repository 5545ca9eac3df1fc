"""The extraction loop of :func:`vim.extract`: shards of inputs through Lightning's predict loop, on one process or many.

The inputs are cut into shards by index alone (shard ``i`` holds inputs ``i * shard_size`` up to ``(i + 1) *
shard_size``), so the shards are the same whatever the number of processes. At the start, rank 0 records the run
(the manifest, marked incomplete) and lists the shards without their ``shard-<i>.json``; the unfinished shards are
dealt round-robin over the ranks. Each rank loads, runs and writes its own shards: arrays first, the shard's json
last, every file through a temporary name, so a finished shard is one whose json exists, and a rerun on any number
of processes does only the others. When every rank is done (a barrier that waits as long as the slowest rank takes),
rank 0 merges the shards' jsons into the manifest. Runs on Lightning's strategies: one device, or DDP over
``devices`` x ``num_nodes`` processes (the output folder must then be one that every node sees).
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from vim.data.samples import Unreadable
from vim.files import atomic_write

from .manifest import MANIFEST, Shards, final_manifest, shard_files

__all__ = ["STRATEGIES", "FeatureSettings", "ShardPlan", "compute_features", "extract_shards", "trainer_devices"]

STRATEGIES = ("auto", "ddp", "ddp_spawn", "ddp_fork", "ddp_notebook")
"""Lightning strategies that run a whole model on each process (the extraction is data parallel only)."""


# ---------------------------------------------------------------------------------------------- the run
@dataclass(frozen=True)
class FeatureSettings:
    """What each batch computes and how the batches are loaded.

    Args:
        tokens, layers: the features to compute besides ``pooled`` (:func:`compute_features`).
        batch_size: inputs per forward pass (a shard's last batch may be smaller).
        num_workers: loader processes of each rank.
        unit: what an input is called on the progress bar ("image", "clip", "cloud").
        progress: show a progress bar (on rank 0).
    """

    tokens: bool = False
    layers: tuple[int, ...] = ()
    batch_size: int = 32
    num_workers: int = 0
    unit: str = "input"
    progress: bool = True

    @property
    def keys(self) -> list[str]:
        """The feature keys written: ``pooled``, then ``tokens`` and ``layer<i>`` when asked for."""
        return ["pooled"] + (["tokens"] if self.tokens else []) + [f"layer{i}" for i in self.layers]


@dataclass(frozen=True)
class ShardPlan:
    """Where the run writes and what it records: the output folder ``out`` (exists), the run's ``settings`` as the
    manifest stores them (``keys``, ``format`` and ``shard_size`` are used here) and the ``inputs``' names, in order."""

    out: Path
    settings: dict[str, Any]
    inputs: list[str]

    @property
    def shards(self) -> Shards:
        return Shards(len(self.inputs), self.settings["shard_size"])

    def started(self) -> dict[str, Any]:
        """The manifest while the run goes on: a crash leaves a record of its settings and inputs before any shard."""
        return {"settings": self.settings, "complete": False, "inputs": self.inputs}


def _write_json(path: Path, data: Any) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1)))


def _write_shard(out: Path, name: str, arrays: dict[str, np.ndarray], fmt: str) -> None:
    """Shard ``name``'s arrays into ``out``, in the files :func:`~vim.extraction.manifest.shard_files` names."""
    files = shard_files(name, list(arrays), fmt)
    if fmt == "safetensors":
        from safetensors.numpy import save_file

        atomic_write(out / files[0], lambda tmp: save_file(arrays, str(tmp)))
        return
    for array, file in zip(arrays.values(), files):

        def write(tmp: Path, array: np.ndarray = array) -> None:
            with tmp.open("wb") as stream:
                np.save(stream, array)

        atomic_write(out / file, write)


# ---------------------------------------------------------------------------------------------- data
class ShardBatch(NamedTuple):
    """Up to ``batch_size`` consecutive inputs of one shard: ``inputs`` (B, ...) the readable ones stacked (None when
    none is), ``names`` their names, ``failed`` the others as ``{"input", "reason"}``."""

    shard: int
    inputs: torch.Tensor | None
    names: list[str]
    failed: list[dict[str, str]]


class ShardBatches(Dataset):
    """The batches of some shards, shard after shard; each item is a whole :class:`ShardBatch`, loaded (in a loader
    worker when there are workers) from ``dataset``, whose items are a sample (tensor first, ``path``) or
    :class:`~vim.data.samples.Unreadable` (``path``, ``reason``)."""

    def __init__(self, dataset: Dataset, shards: Shards, todo: Sequence[int], batch_size: int) -> None:
        self.dataset = dataset
        self.batches: list[tuple[int, range]] = []
        for shard in todo:
            indices = shards.inputs(shard)
            self.batches += [(shard, indices[start : start + batch_size]) for start in range(0, len(indices), batch_size)]

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> ShardBatch:
        shard, indices = self.batches[index]
        samples = [self.dataset[i] for i in indices]
        loaded = [s for s in samples if not isinstance(s, Unreadable)]
        failed = [{"input": s.path, "reason": s.reason} for s in samples if isinstance(s, Unreadable)]
        inputs = torch.stack([s[0] for s in loaded]) if loaded else None
        return ShardBatch(shard, inputs, [s.path for s in loaded], failed)


def _unbatched(item: ShardBatch) -> ShardBatch:
    return item


class ExtractionShards(LightningDataModule):
    """Which shards this run extracts, and this rank's batches of them.

    ``setup`` (on every rank, once the processes are connected): rank 0 writes the plan's started manifest, so that a
    crash leaves a record of the run's settings before any shard, and lists the unfinished shards; every rank gets
    that list from rank 0 (one listing, even while other ranks already write shards) and takes every
    ``world_size``-th shard of it, starting at its rank.
    """

    def __init__(self, dataset: Dataset, plan: ShardPlan, batch_size: int, num_workers: int) -> None:
        super().__init__()
        self.allow_zero_length_dataloader_with_multiple_devices = True  # fewer unfinished shards than ranks
        self.dataset, self.plan, self.shards = dataset, plan, plan.shards
        self.batch_size, self.num_workers = batch_size, num_workers
        self.todo: list[int] = []
        self.finished_inputs = 0

    def setup(self, stage: str) -> None:
        trainer = self.trainer
        if trainer is None:
            raise RuntimeError("ExtractionShards.setup needs the trainer that runs the extraction")
        listed: list[int] = []  # on other ranks, replaced by rank 0's list
        if trainer.is_global_zero:
            _write_json(self.plan.out / MANIFEST, self.plan.started())
            listed = [shard for shard, done in enumerate(self.shards.finished(self.plan.out)) if not done]
        unfinished = trainer.strategy.broadcast(listed, src=0)
        self.todo = unfinished[trainer.global_rank :: trainer.world_size]
        self.finished_inputs = self.shards.num_inputs - sum(len(self.shards.inputs(shard)) for shard in unfinished)

    def inputs_to_do(self) -> int:
        """How many inputs this rank's shards hold."""
        return sum(len(self.shards.inputs(shard)) for shard in self.todo)

    def predict_dataloader(self) -> DataLoader:
        batches = ShardBatches(self.dataset, self.shards, self.todo, self.batch_size)
        # torch types collate_fn as taking a list; without batching (batch_size=None) it takes each item
        return DataLoader(batches, batch_size=None, num_workers=self.num_workers, collate_fn=_unbatched)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- model
def compute_features(model: Any, batch: torch.Tensor, tokens: bool, layers: Sequence[int]) -> dict[str, torch.Tensor]:
    """The feature arrays of one batch: ``pooled`` (B, F), optionally ``tokens`` and ``layer<i>``.

    ``model`` is a timm model (``forward_features`` and ``forward_head``; ``forward_intermediates`` for ``layers``),
    an API that timm does not declare as a type."""
    if layers:
        final, intermediates = model.forward_intermediates(batch, indices=list(layers), output_fmt="NLC")
    else:
        final, intermediates = model.forward_features(batch), []
    out = {"pooled": model.forward_head(final, pre_logits=True)}
    if tokens:
        out["tokens"] = final
    out.update({f"layer{i}": y for i, y in zip(layers, intermediates)})
    return out


class BatchFeatures(NamedTuple):
    """The features of a :class:`ShardBatch`'s readable inputs (arrays keyed like :func:`compute_features`, float32)."""

    shard: int
    features: dict[str, np.ndarray]
    names: list[str]
    failed: list[dict[str, str]]


class FeatureExtractor(LightningModule):
    """A headless backbone whose ``predict_step`` turns a :class:`ShardBatch` into :class:`BatchFeatures`."""

    def __init__(self, network: nn.Module, tokens: bool, layers: Sequence[int]) -> None:
        super().__init__()
        self.network, self.tokens, self.layers = network, tokens, list(layers)

    def predict_step(self, batch: ShardBatch) -> BatchFeatures:
        features = {}
        if batch.inputs is not None:
            computed = compute_features(self.network, batch.inputs, self.tokens, self.layers)
            features = {key: value.float().cpu().numpy() for key, value in computed.items()}
        return BatchFeatures(batch.shard, features, batch.names, batch.failed)


# ---------------------------------------------------------------------------------------------- writing
@dataclass
class _OpenShard:
    """The batches of a shard received so far."""

    arrays: dict[str, list[np.ndarray]] = field(default_factory=dict)
    names: list[str] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)

    def add(self, batch: BatchFeatures) -> int:
        """Append ``batch``; how many inputs the shard has received."""
        for key, array in batch.features.items():
            self.arrays.setdefault(key, []).append(array)
        self.names += batch.names
        self.failed += batch.failed
        return len(self.names) + len(self.failed)


class ShardWriter(Callback):
    """Writes each shard as soon as all its inputs have come back: its arrays (when it has readable inputs), then its
    json ``{"inputs": [...], "failed": [...]}``."""

    def __init__(self, out: Path, shards: Shards, fmt: str) -> None:
        self.out, self.shards, self.fmt = out, shards, fmt
        self.open: dict[int, _OpenShard] = {}

    def on_predict_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: BatchFeatures, batch: ShardBatch, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        shard = outputs.shard
        if self.open.setdefault(shard, _OpenShard()).add(outputs) < len(self.shards.inputs(shard)):
            return
        done, name = self.open.pop(shard), self.shards.name(shard)
        if done.names:
            _write_shard(self.out, name, {key: np.concatenate(parts) for key, parts in done.arrays.items()}, self.fmt)
        _write_json(self.out / f"{name}.json", {"inputs": done.names, "failed": done.failed})


class ExtractionProgress(Callback):
    """A tqdm bar on rank 0: the inputs finished before this run, then this rank's inputs as their batches come back
    (with one process, all of them)."""

    def __init__(self, unit: str, enabled: bool) -> None:
        self.unit, self.enabled = unit, enabled
        self.bar: tqdm | None = None

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        data: ExtractionShards = trainer.datamodule  # type: ignore[attr-defined]  # set by Lightning, undeclared
        desc = "vimkit extract" if trainer.world_size == 1 else f"vimkit extract (rank 0 of {trainer.world_size})"
        self.bar = tqdm(
            total=data.finished_inputs + data.inputs_to_do(), initial=data.finished_inputs, desc=desc, unit=self.unit,
            disable=not (self.enabled and trainer.is_global_zero),
        )  # fmt: skip

    def on_predict_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: ShardBatch, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        if self.bar is not None:
            self.bar.update(len(batch.names) + len(batch.failed))

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# ---------------------------------------------------------------------------------------------- running
def trainer_devices(device: str | None = None, devices: int = 1, num_nodes: int = 1, strategy: str = "auto") -> dict[str, Any]:
    """Lightning ``Trainer`` arguments (``accelerator``, ``devices``, ``num_nodes``, ``strategy``); ValueError naming a bad one.

    Args:
        device: a torch device or device type: "cpu", "cuda", "cuda:1", "mps"; None: Lightning's choice (a GPU where
            there is one).
        devices: processes per node, one device each.
        num_nodes: nodes.
        strategy: one of :data:`STRATEGIES`; "auto" is one device, or DDP with launched processes.
    """
    if devices < 1 or num_nodes < 1:
        raise ValueError(f"devices={devices} and num_nodes={num_nodes} must be at least 1")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES} (every process runs the whole model), got {strategy!r}")
    accelerator = "auto"
    chosen: int | list[int] = devices
    if device is not None:
        try:
            parsed = torch.device(device)
        except RuntimeError as error:
            raise ValueError(f"device={device!r} is not a torch device (cpu, cuda, cuda:1, mps, ...)") from error
        accelerator = parsed.type
        if parsed.index is not None and parsed.type != "cpu":
            if devices != 1:
                raise ValueError(f"device={device!r} names one device; with devices={devices} give its type ('{parsed.type}')")
            chosen = [parsed.index]
    return {"accelerator": accelerator, "devices": chosen, "num_nodes": num_nodes, "strategy": strategy}


@contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Without Lightning's INFO lines (accelerators available, processes registered) and its hints about loader workers
    and ranks without batches, which say nothing about extraction; its other warnings and errors still show."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*does not have many workers.*")
            warnings.filterwarnings("ignore", ".*(local rank has zero length|across ranks is zero).*")
            warnings.filterwarnings("ignore", ".*LeafSpec.* is deprecated.*")  # its CombinedLoader
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _wait_for_every_rank() -> None:
    """A barrier without the process group's timeout (30 minutes by default), for ranks that finish their shards long
    before the others (one shard left for two ranks): a gloo group whose timeout never comes, as Lightning's own
    waits of unknown length use. Outside a process group (one process, or the launcher of spawned ones) it returns."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    group = torch.distributed.new_group(backend="gloo", timeout=timedelta(days=10000))
    torch.distributed.barrier(group)  # type: ignore[arg-type]  # a group of every rank: none gets the non-member value
    torch.distributed.destroy_process_group(group)


def extract_shards(
    network: nn.Module, dataset: Dataset, plan: ShardPlan, features: FeatureSettings, devices: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Extract the unfinished shards of ``plan.inputs`` (items of ``dataset``) into ``plan.out`` and write the manifest.

    Args:
        network: the headless model.
        dataset: the inputs, in order: a sample (tensor first, ``path``) or :class:`~vim.data.samples.Unreadable` each.
        plan: the output folder, the settings the manifest records and the input names.
        features: what to compute, and how to load and show the inputs.
        devices: where to run, from :func:`trainer_devices` (None: its defaults).

    Returns:
        The manifest, on every rank.
    """
    out, shards = plan.out, plan.shards
    with _quiet_lightning():
        trainer = Trainer(
            **(devices or trainer_devices()), logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, use_distributed_sampler=False,
            callbacks=[ShardWriter(out, shards, plan.settings["format"]), ExtractionProgress(features.unit, features.progress)],
        )  # fmt: skip
        data = ExtractionShards(dataset, plan, features.batch_size, features.num_workers)
        model = FeatureExtractor(network, features.tokens, features.layers)
        trainer.predict(model, datamodule=data, return_predictions=False)
        _wait_for_every_rank()
        if trainer.is_global_zero:
            _write_json(out / MANIFEST, final_manifest(out, plan.settings, plan.inputs, shards))
        trainer.strategy.barrier("manifest written")
    return json.loads((out / MANIFEST).read_text())
