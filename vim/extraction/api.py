""":func:`extract`: features of every input into an output folder, resuming what a previous run of the same settings
finished; see :mod:`vim.extraction` for the behaviour."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_only

from vim.data.modalities import MODALITIES, evaluation_preprocessing
from vim.files import folder_lock

from .inputs import resolve_inputs
from .loop import FeatureSettings, ShardPlan, extract_shards, trainer_devices
from .manifest import FORMATS, check_resumable
from .model import ExtractionModel, build_model

__all__ = ["LOCK", "extract", "launches_the_run"]

LOCK = ".extract.lock"
"""The output folder's lock file (:func:`vim.files.folder_lock`): one run at a time writes into a folder."""


def launches_the_run() -> bool:
    """Whether this process started the extraction, and so holds the output folder's lock for the run: not a process
    that a launcher started as another rank (Lightning reruns the command with ``LOCAL_RANK`` set; torchrun sets
    ``RANK``, SLURM ``SLURM_PROCID``: Lightning's ``rank_zero_only.rank`` reads them), nor the first process of
    another node (``NODE_RANK``, or torchrun's ``GROUP_RANK``, as Lightning reads them)."""
    node_rank = int(os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", 0)))
    # Lightning sets `rank` on the function, which lightning_utilities' signature does not declare
    return rank_zero_only.rank == 0 and node_rank == 0  # type: ignore[attr-defined]


def _check_output_options(format: str, shard_size: int, batch_size: int) -> None:
    """ValueError naming a storage format or a size that cannot be used."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"shard_size={shard_size} and batch_size={batch_size} must be positive")


def _check_modality(loaded: ExtractionModel, found: str, names: list[str]) -> None:
    """ValueError unless the model takes the inputs' modality, naming both and an input."""
    if found != loaded.modality:
        raise ValueError(f"model '{loaded.name}' takes {loaded.modality} but the inputs are {found} (e.g. '{names[0]}')")


def _run_settings(loaded: ExtractionModel, modality: str, keys: list[str], output: dict[str, Any], preprocessing: dict) -> dict:
    """The settings the manifest records, as it stores them (JSON: tuples as lists), so that a rerun's compare equal.

    Args:
        loaded: the model, its name, arguments and weights.
        modality: the inputs' modality.
        keys: the feature keys written.
        output: ``format`` and ``shard_size``.
        preprocessing: :func:`~vim.data.modalities.evaluation_preprocessing`'s settings.
    """
    settings = {
        "model": loaded.name, "model_kwargs": loaded.kwargs, "weights": loaded.weights, "modality": modality, "keys": keys,
        **output, "preprocessing": preprocessing,
    }  # fmt: skip
    return json.loads(json.dumps(settings))


def _resume_or_run(
    loaded: ExtractionModel, plan: ShardPlan, features: FeatureSettings, preprocessing: dict, launch: dict
) -> dict[str, Any]:
    """A complete run's manifest as it is; else the run (or the rest of it), under the output folder's lock when this
    process launched the run. The dataset is made only to run: an HDF5 dataset opens its files."""
    with folder_lock(plan.out, LOCK) if launches_the_run() else contextlib.nullcontext():
        previous = check_resumable(plan.out, plan.settings, plan.inputs)
        if previous is not None and previous.get("complete"):
            return previous
        dataset = MODALITIES[loaded.modality].dataset(loaded.network, plan.inputs, preprocessing)
        return extract_shards(loaded.network, dataset, plan, features, launch)


def extract(
    model: str | None,
    inputs: str | os.PathLike | Sequence[str],
    out: str | os.PathLike,
    checkpoint: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    modality: str | None = None,
    tokens: bool = False,
    layers: Sequence[int] | None = None,
    format: str = "npy",
    shard_size: int = 1024,
    batch_size: int = 32,
    num_workers: int = 0,
    device: str | None = None,
    num_points: int | None = None,
    progress: bool = True,
    random_weights: bool = False,
    seed: int = 0,
    devices: int = 1,
    num_nodes: int = 1,
    strategy: str = "auto",
) -> dict[str, Any]:
    """Extract features of every input with ``model`` into ``out``; see :mod:`vim.extraction`.

    Args:
        model: timm model name (may be None with a Lightning ``.ckpt`` checkpoint, which records it).
        inputs: folder, list file, HDF5 file, single file, or sequence of files.
        out: output folder (created; a rerun resumes it; locked while this runs: FolderInUseError for a second run).
        checkpoint: weights: ``.safetensors`` / ``.pth`` (e.g. from ``vimkit export``, or official) or a Lightning ``.ckpt``;
            None: the released weights of the model name's timm tag.
        model_kwargs: extra ``timm.create_model`` arguments (``img_size``, ``embed_dim``, ``num_frames``, ...).
        modality: "images", "video" or "points"; None detects it from the file extensions.
        tokens: also write the final tokens (rows, L, D).
        layers: also write the residual stream after these blocks (rows, L', D), keys ``layer<i>``.
        format: "npy" or "safetensors".
        shard_size: inputs per shard.
        batch_size: inputs per forward pass.
        num_workers: loader processes (of each process, with several).
        device: "cuda", "cpu", "cuda:1", "mps", ...; None: Lightning's choice of accelerator (a GPU where there is one).
        num_points: points per cloud (None: a Lightning checkpoint's ``data.num_points``, else the model's ``input_size``).
        progress: show a progress bar (with several processes: rank 0's shards).
        random_weights: without a checkpoint, use random weights (seeded by ``seed``) instead of the released ones.
        seed: seed of the random weights.
        devices: processes per node, one device each (Lightning's ``devices``).
        num_nodes: nodes (Lightning's ``num_nodes``); ``out`` must be a folder that every node sees.
        strategy: "auto" (one device, or DDP with launched processes), "ddp", "ddp_spawn", "ddp_fork" or "ddp_notebook".

    Returns:
        The manifest (also written to ``out/manifest.json``), on every process.
    """
    _check_output_options(format, shard_size, batch_size)
    launch = trainer_devices(device, devices, num_nodes, strategy)
    names, found = resolve_inputs(inputs, modality)
    loaded = build_model(model, checkpoint, model_kwargs, random_weights, seed)
    _check_modality(loaded, found, names)
    chosen = tuple(loaded.check_layers(layers or ()))
    features = FeatureSettings(tokens, chosen, batch_size, num_workers, MODALITIES[found].unit, progress)
    preprocessing = evaluation_preprocessing(loaded.network, loaded.data_hparams, num_points)
    settings = _run_settings(loaded, found, features.keys, {"format": format, "shard_size": shard_size}, preprocessing)
    Path(out).mkdir(parents=True, exist_ok=True)
    return _resume_or_run(loaded, ShardPlan(Path(out), settings, names), features, preprocessing, launch)
