"""Feature extraction for images, video clips and point clouds: ``vimkit extract`` and :func:`extract`.

Command line::

    vimkit extract --model vim_small_patch16_224.in1k --input photos/ --out feats/       # released weights (timm tag)
    vimkit extract --checkpoint runs/points_quickstart/latest/checkpoints/last.ckpt --input clouds.h5 --out feats/ --tokens
    vimkit extract --model videomamba_tiny --checkpoint vm_t.pth --input clips.txt --out feats/ --layers 5 11 --format safetensors
    vimkit extract --model videomamba_small.k400_f8 --input k400.txt --out /shared/feats/ --devices 8 --num-nodes 4   # DDP

Python::

    manifest = vim.extract("pointmamba_small", "clouds/", "feats/", checkpoint="pm.safetensors")
    pooled, names = vim.read_features("feats/")          # (rows, D) and the input of each row

Weights: a ``checkpoint`` file, identified by the sha256 and size of its contents (read once per run to hash them), so
a file rewritten since (``last.ckpt`` after more training) is other weights, and the same bytes at another path the
same; else the released weights of the model name's timm tag (``vim_small_patch16_224.in1k``,
or the name's default tag), loaded by ``timm.create_model(name, pretrained=True)``, which downloads them once into its
cache (Hugging Face Hub or torch hub); a name without released weights, or no network and no cached file, is an
error naming the file looked for. Random weights only with ``random_weights=True`` (``--random-weights``), seeded
by ``seed``. The manifest records which.

Inputs: a folder (searched recursively), a list file (``.txt`` / ``.lst`` / ``.csv``: one path a line, relative to
the list's folder, spaces in it kept (``holiday photo.jpg``); a label or other fields after it follow a comma or tab
(``a.jpg,3``), or a space when the line does not end in the file's extension (``clips/a.mp4 3``); blank lines and
``#`` comments skipped), an HDF5 file of point clouds (``data`` (M, P, 3); inputs ``<file>[<row>]``; one that cannot
be opened is one input, ``<file>``, listed as failed) or a single file. The modality (images, video, points) follows
from the file extensions and must match the model; ``modality`` restricts it. Each input is prepared exactly as the
model's evaluation data (the datamodules' deterministic evaluation transforms), and features are computed in eval
mode, so runs are deterministic. The preprocessing
settings (image size, resize interpolation, crop fraction, mean and std; frames per clip; points per cloud) are the
model's, or with a Lightning ``.ckpt`` those its data module was trained with (``num_points=`` still wins); the
manifest's ``settings.preprocessing`` records them.

Outputs in ``out``: shards of ``shard_size`` inputs, ``shard-00000.<key>.npy`` (one file per feature
key) or ``shard-00000.safetensors`` (all keys), with keys ``pooled`` (rows, F): the model's pre-logits
feature; ``tokens`` (rows, L, D): the final tokens (``tokens=True``); ``layer<i>`` (rows, L', D): the
residual stream after block ``i`` (``layers=[i, ...]``). ``manifest.json`` records the settings, the
shards, and for each input (by absolute path) its shard and row, or the reason it failed (unreadable or invalid
inputs are listed, not fatal). Every file is written to a temporary name and moved into place, a shard's
``shard-00000.json`` last: a rerun with the same settings and inputs skips the finished shards and does the rest;
other settings or inputs are refused, naming what differs.

Processes: the shards go through Lightning's predict loop (:mod:`vim.extraction_loop`) on one device, or over
``devices`` x ``num_nodes`` DDP processes, each writing its own shards; rank 0 merges the manifest at the end. Shards
are fixed by input index, so the output is the same on any number of processes, and a run resumes on another number.
The process that starts the run (not those a launcher starts for the other ranks) locks ``out`` for the run (``fcntl``
lock on ``out/.extract.lock``, which the system releases when the process ends): a second run into the same folder
is refused, naming the process (pid, host, command) that holds it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch.utilities import rank_zero_only
from torch import nn
from torch.utils.data import Dataset

import vim.models  # noqa: F401  (registers the Vim backbones in timm)
from vim.data.folders import walk_files
from vim.data.images.dataset import IMAGE_EXTENSIONS, ImageFiles
from vim.data.images.transforms import create_image_transform
from vim.data.points.dataset import PointClouds
from vim.data.points.readers import POINT_EXTENSIONS
from vim.data.points.sources import HDF5_EXTENSIONS, HDF5Clouds, PointFiles, hdf5_cloud_names
from vim.data.samples import UNLABELLED, Unreadable
from vim.data.video.dataset import VideoClips
from vim.data.video.decoding import VIDEO_EXTENSIONS
from vim.data.video.transforms import create_video_transform
from vim.data.workers import default_num_workers
from vim.extraction_loop import MANIFEST, STRATEGIES, extract_shards, trainer_devices
from vim.files import file_identity, folder_lock
from vim.models.backbone import MambaBackbone
from vim.models.loading import load_model
from vim.models.point_mamba import PointMamba, trained_on_unit_sphere
from vim.models.video_mamba import VideoMamba

__all__ = ["MODALITIES", "extract", "main", "read_features", "resolve_inputs"]

LIST_EXTENSIONS = (".txt", ".lst", ".csv")
FORMATS = ("npy", "safetensors")
LOCK = ".extract.lock"
"""The output folder's lock file (:func:`vim.files.folder_lock`): one run at a time writes into a folder."""
UNITS = {"images": "image", "video": "clip", "points": "cloud"}


# ---------------------------------------------------------------------------------------------- modalities
@dataclass(frozen=True)
class Modality:
    """How one kind of input is recognised and turned into model inputs.

    Args:
        name: "images", "video" or "points".
        extensions: file name endings of this modality.
        dataset: ``(model, inputs, preprocessing) -> Dataset`` whose items are a loaded sample (tensor first)
            or a ``failure`` (with ``path`` and ``reason``); ``preprocessing`` is :func:`evaluation_preprocessing`'s.
        failure: the dataset's type for an input that could not be read.
    """

    name: str
    extensions: tuple[str, ...]
    dataset: Callable[[Any, list[str], dict[str, Any]], Dataset]  # the model of that modality (model_modality)
    failure: type[Unreadable]


TRANSFORM_KEYS = ("interpolation", "crop_pct", "mean", "std")
"""Evaluation transform settings that a data module records besides the sizes, which the model is created with."""


def _eval_transform_settings(model: nn.Module) -> dict[str, Any]:
    """The evaluation transform's settings of ``model``: its pretrained cfg's resize, crop and normalisation, at the
    input size the model was created with (which may differ from the cfg's)."""
    from timm.data import resolve_data_config

    config = resolve_data_config({}, model=model)
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None) or config["input_size"][1:]
    return {"img_size": tuple(img_size), **{key: config[key] for key in TRANSFORM_KEYS}}


def evaluation_preprocessing(
    model: nn.Module, data_hparams: dict[str, Any] | None = None, num_points: int | None = None
) -> dict[str, Any]:
    """How inputs are prepared for ``model``: ``{"num_points", "normalize"}`` for a PointMamba, else the evaluation transform's
    ``img_size``, ``interpolation``, ``crop_pct``, ``mean`` and ``std`` (and ``num_frames`` for a VideoMamba).

    Each setting is, first found: the explicit ``num_points``; the training data module's (``data_hparams``, the
    ``datamodule_hyper_parameters`` of a Lightning checkpoint); the model's (its size, its pretrained cfg).
    """
    data_hparams = data_hparams or {}
    if isinstance(model, PointMamba):
        return {
            "num_points": num_points or data_hparams.get("num_points") or model.pretrained_cfg["input_size"][-1],
            "normalize": data_hparams.get("normalize", trained_on_unit_sphere(model)),  # as the weights were trained
        }
    settings = _eval_transform_settings(model)
    settings.update({key: data_hparams[key] for key in TRANSFORM_KEYS if data_hparams.get(key) is not None})
    if isinstance(model, VideoMamba):
        settings["num_frames"] = model.patch_embed.num_frames
    return settings


def _image_dataset(model: nn.Module, inputs: list[str], preprocessing: dict[str, Any]) -> Dataset:
    """Images through the evaluation transform (resize, centre crop, normalise)."""
    return ImageFiles([(path, UNLABELLED) for path in inputs], create_image_transform(**preprocessing))


def _video_dataset(model: VideoMamba, inputs: list[str], preprocessing: dict[str, Any]) -> Dataset:
    """Clips of ``num_frames`` evenly spaced frames through the evaluation transform."""
    settings = {key: value for key, value in preprocessing.items() if key != "num_frames"}
    transform = create_video_transform(**{**settings, "img_size": settings["img_size"][0]})
    return VideoClips([(path, UNLABELLED) for path in inputs], preprocessing["num_frames"], transform)


def _hdf5_file_of(name: str) -> str | None:
    """The HDF5 file of input ``name``: that of a cloud ``<file>[<row>]``, or the name itself for an HDF5 file whose
    clouds could not be counted (:func:`~vim.data.points.sources.hdf5_cloud_names`); None for a point file."""
    if name.endswith("]"):
        return name.rpartition("[")[0]
    return name if name.lower().endswith(HDF5_EXTENSIONS) else None


def _point_dataset(model: PointMamba, inputs: list[str], preprocessing: dict[str, Any]) -> Dataset:
    """Clouds resampled by farthest point sampling to ``num_points`` and (``normalize``) scaled into the unit sphere."""
    h5_files = list(dict.fromkeys(file for file in map(_hdf5_file_of, inputs) if file is not None))
    source: HDF5Clouds | PointFiles
    if h5_files:
        source = HDF5Clouds(h5_files, skip_unreadable=True)  # listed in the manifest, as any unreadable input
        if source.names != inputs:
            raise ValueError("point inputs mix HDF5 rows and point files; extract them in separate runs")
    else:
        source = PointFiles([(path, UNLABELLED) for path in inputs])
    return PointClouds(source, preprocessing["num_points"], model.min_points, normalize=preprocessing["normalize"])


MODALITIES: dict[str, Modality] = {
    "images": Modality("images", IMAGE_EXTENSIONS, _image_dataset, Unreadable),
    "points": Modality("points", POINT_EXTENSIONS + HDF5_EXTENSIONS, _point_dataset, Unreadable),
    "video": Modality("video", VIDEO_EXTENSIONS, _video_dataset, Unreadable),
}


def modality_of(path: str) -> str | None:
    """The modality whose extension ``path`` has, or None."""
    lower = path.lower()
    return next((m.name for m in MODALITIES.values() if lower.endswith(m.extensions)), None)


def model_modality(model: nn.Module) -> str:
    """What ``model`` takes: "points" (PointMamba), "video" (VideoMamba) or "images" (any other)."""
    if isinstance(model, PointMamba):
        return "points"
    if isinstance(model, VideoMamba):
        return "video"
    return "images"


# ---------------------------------------------------------------------------------------------- inputs
def _list_entry(line: str) -> str:
    """The path of a list line: the part before the first comma or tab; else the whole line (spaces included), less a
    space-separated label when the whole line does not end in a known extension (``clips/a.mp4 3``)."""
    for separator in (",", "\t"):
        line = line.split(separator, 1)[0]
    line = line.strip()
    if modality_of(line) is None and len(parts := line.rsplit(None, 1)) == 2 and modality_of(parts[0]) is not None:
        return parts[0]
    return line


def _read_list(path: Path) -> list[str]:
    """The paths of list file ``path`` (see :func:`_list_entry`), relative ones under its folder."""
    entries = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            first = _list_entry(line)
            entries.append(first if Path(first).is_absolute() else str(path.parent / first))
    if not entries:
        raise ValueError(f"input list '{path}' names no files")
    return entries


def _walk(root: Path) -> list[str]:
    found = [str(f) for f in walk_files(root, lambda name: not name.startswith(".") and modality_of(name) is not None)]
    if not found:
        known = ", ".join(ext for m in MODALITIES.values() for ext in m.extensions)
        raise ValueError(f"input folder '{root}' holds no image, video or point files ({known})")
    return found


def _expand_hdf5(paths: list[str]) -> list[str]:
    """Replace each HDF5 file by its clouds ``<file>[<row>]`` (an unreadable one stays, to be listed with the reason)."""
    expanded = []
    for path in paths:
        expanded += hdf5_cloud_names(path) if path.lower().endswith(HDF5_EXTENSIONS) else [path]
    return expanded


def resolve_inputs(inputs: str | os.PathLike | Sequence[str], modality: str | None = None) -> tuple[list[str], str]:
    """The input names (absolute paths), in order, and their modality.

    Args:
        inputs: a folder, a list file, an HDF5 file, a single file, or a sequence of files.
        modality: expected modality; None detects it.

    Raises:
        ValueError: no inputs, unknown extensions, or more than one modality (naming a file of each).
    """
    if modality is not None and modality not in MODALITIES:
        raise ValueError(f"modality must be one of {sorted(MODALITIES)}, got {modality!r}")
    if isinstance(inputs, (str, os.PathLike)):
        path = Path(inputs)
        if path.is_dir():
            paths = _walk(path)
        elif not path.exists():
            raise ValueError(f"input '{path}' does not exist")
        elif path.suffix.lower() in LIST_EXTENSIONS:
            paths = _read_list(path)
        else:
            paths = [str(path)]
    else:
        paths = [str(p) for p in inputs]
        if not paths:
            raise ValueError("inputs: the list of files is empty")
    names = [os.path.normpath(Path(p).absolute()) for p in paths]  # one name per input, whatever the working directory
    by_modality: dict[str | None, str] = {}
    for name in names:
        by_modality.setdefault(modality_of(name), name)
    if None in by_modality:
        raise ValueError(f"input '{by_modality[None]}' is not an image, video or point file (unknown extension)")
    found = sorted(m for m in by_modality if m is not None)
    if len(found) > 1 or (modality is not None and found != [modality]):
        examples = ", ".join(f"{name} (e.g. '{by_modality[name]}')" for name in found)
        wanted = f"; modality={modality!r} was asked for" if modality is not None else ""
        raise ValueError(f"inputs mix modalities: {examples}{wanted}; extract one modality per run")
    return _expand_hdf5(names), found[0]


# ---------------------------------------------------------------------------------------------- model
@dataclass
class ExtractionModel:
    """The headless model in eval mode and what the manifest records of it.

    Args:
        network: the model.
        name: its timm name.
        kwargs: the ``create_model`` arguments it was created with.
        weights: where its weights came from: ``{"checkpoint": {"path", "sha256", "size"}}``, ``{"random": {"seed"}}``
            or ``{"released": {"tag", "source"}}``.
        data_hparams: the training data module's settings (a Lightning checkpoint's ``datamodule_hyper_parameters``;
            empty otherwise).
    """

    network: nn.Module
    name: str
    kwargs: dict[str, Any]
    weights: dict[str, Any]
    data_hparams: dict[str, Any]


def build_model(
    model: str | None, checkpoint: str | None, model_kwargs: dict[str, Any] | None, random_weights: bool = False, seed: int = 0
) -> ExtractionModel:
    """The headless model in eval mode, its name, the kwargs it was created with, and where its weights came from
    (:func:`vim.models.loading.load_model`).

    Weights: ``checkpoint`` (identified by its contents' sha256 and size, so that the same path rewritten is other
    weights); else, with ``random_weights``, a random initialisation seeded by ``seed``; else the released weights of
    the name's timm tag. ValueError when the name has none or they cannot be had.
    """
    if random_weights and checkpoint is not None:
        raise ValueError("random_weights (--random-weights) and a checkpoint exclude each other: pass one")
    loaded = load_model(
        model, checkpoint, pretrained=checkpoint is None and not random_weights, random_weights=random_weights,
        seed=seed if random_weights else None, head=False, argument="checkpoint", **(model_kwargs or {}),
    )  # fmt: skip
    weights = loaded.weights
    if checkpoint is not None:
        path = Path(weights["checkpoint"]["path"])
        weights = {"checkpoint": {"path": str(path), **file_identity(path)}}
    data_settings = loaded.checkpoint.data_settings if loaded.checkpoint is not None else {}
    return ExtractionModel(loaded.model.eval(), loaded.name, loaded.kwargs, weights, data_settings)


# ---------------------------------------------------------------------------------------------- running
def _differences(old: list[str], new: list[str]) -> str:
    """What differs between two input lists, naming an input of each kind."""
    old_set, new_set = set(old), set(new)
    added, removed = [n for n in new if n not in old_set], [n for n in old if n not in new_set]
    parts = [f"{len(added)} new, e.g. '{added[0]}'"] if added else []
    parts += [f"{len(removed)} no longer given, e.g. '{removed[0]}'"] if removed else []
    return "; ".join(parts) or "the same inputs in another order"


class _NotSet:
    """A setting one of two runs has not: shown as ``not set``."""

    def __repr__(self) -> str:
        return "not set"


NOT_SET = _NotSet()
RECORDED_ONLY = ("weights.checkpoint.path",)
"""Settings the manifest records but a rerun need not repeat: the same checkpoint bytes at another path are the same."""


def _changed_settings(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """``key: old -> new`` for each setting that differs, inside nested settings by dotted key (``weights.checkpoint.sha256``)."""
    changed = []
    for key in dict.fromkeys([*new, *old]):
        name, before, after = f"{prefix}{key}", old.get(key, NOT_SET), new.get(key, NOT_SET)
        if name in RECORDED_ONLY:
            continue
        if isinstance(before, dict) and isinstance(after, dict):
            changed += _changed_settings(before, after, f"{name}.")
        elif before != after:
            changed.append(f"{name}: {before!r} -> {after!r}")
    return changed


def _check_resumable(out: Path, settings: dict[str, Any], inputs: list[str]) -> dict[str, Any] | None:
    """The existing manifest when ``out`` holds a run with the same settings and inputs; ValueError naming what differs."""
    path = out / MANIFEST
    if not path.is_file():
        return None
    previous = json.loads(path.read_text())
    changed = _changed_settings(previous.get("settings", {}), settings)
    if changed:
        checkpoint = settings["weights"].get("checkpoint")
        rewritten = any(change.startswith("weights.checkpoint.") for change in changed) and checkpoint is not None
        hint = f"; the checkpoint '{checkpoint['path']}' holds other weights than those extracted" if rewritten else ""
        raise ValueError(
            f"'{out}' holds features extracted with other settings ({'; '.join(changed)}){hint}; use another output folder"
        )
    if previous.get("inputs") != inputs:
        raise ValueError(
            f"'{out}' holds features of other inputs ({_differences(previous.get('inputs') or [], inputs)}); "
            "use another output folder"
        )
    return previous


def launches_the_run() -> bool:
    """Whether this process started the extraction, and so holds the output folder's lock for the run: not a process
    that a launcher started as another rank (Lightning reruns the command with ``LOCAL_RANK`` set; torchrun sets
    ``RANK``, SLURM ``SLURM_PROCID``: Lightning's ``rank_zero_only.rank`` reads them), nor the first process of
    another node (``NODE_RANK``, or torchrun's ``GROUP_RANK``, as Lightning reads them)."""
    node_rank = int(os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", 0)))
    # Lightning sets `rank` on the function, which lightning_utilities' signature does not declare
    return rank_zero_only.rank == 0 and node_rank == 0  # type: ignore[attr-defined]


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
    """Extract features of every input with ``model`` into ``out``; see the module docstring.

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
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"shard_size={shard_size} and batch_size={batch_size} must be positive")
    launch = trainer_devices(device, devices, num_nodes, strategy)
    names, found = resolve_inputs(inputs, modality)
    loaded = build_model(model, checkpoint, model_kwargs, random_weights, seed)
    network, name = loaded.network, loaded.name
    expected = model_modality(network)
    if found != expected:
        raise ValueError(f"model '{name}' takes {expected} but the inputs are {found} (e.g. '{names[0]}')")
    layers = sorted(set(int(i) for i in layers or ()))
    if layers:
        if not isinstance(network, MambaBackbone):
            raise ValueError(f"layers={layers}: model '{name}' is not a vim backbone, whose blocks the layers number")
        if not all(0 <= i < len(network.blocks) for i in layers):
            raise ValueError(f"layers={layers}: model '{name}' has blocks 0..{len(network.blocks) - 1}")
    keys = ["pooled"] + (["tokens"] if tokens else []) + [f"layer{i}" for i in layers]
    preprocessing = evaluation_preprocessing(network, loaded.data_hparams, num_points)
    settings = {
        "model": name, "model_kwargs": loaded.kwargs, "weights": loaded.weights, "modality": found, "keys": keys,
        "format": format, "shard_size": shard_size,
        "preprocessing": preprocessing,
    }  # fmt: skip
    settings = json.loads(json.dumps(settings))  # as the manifest stores them (tuples as lists), to compare with it

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with folder_lock(out, LOCK) if launches_the_run() else contextlib.nullcontext():
        previous = _check_resumable(out, settings, names)
        if previous is not None and previous.get("complete"):
            return previous
        spec = MODALITIES[found]
        dataset = spec.dataset(network, names, preprocessing)
        return extract_shards(
            network,
            dataset,
            spec.failure,
            out,
            settings,
            names,
            tokens,
            layers,
            batch_size,
            num_workers,
            UNITS[found],
            progress,
            launch,
        )


def read_features(out: str | os.PathLike, key: str = "pooled") -> tuple[np.ndarray, list[str]]:
    """All rows of feature ``key`` of a finished extraction, concatenated over shards, and the input of each row."""
    out = Path(out)
    manifest = json.loads((out / MANIFEST).read_text())
    if not manifest.get("complete"):
        raise ValueError(f"'{out}' holds an unfinished extraction; rerun vimkit extract to complete it")
    if key not in manifest["settings"]["keys"]:
        raise ValueError(f"key {key!r} was not extracted; available: {manifest['settings']['keys']}")
    arrays = []
    for shard in manifest["shards"]:
        if not shard["rows"]:
            continue
        if manifest["settings"]["format"] == "safetensors":
            from safetensors.numpy import load_file

            arrays.append(load_file(str(out / f"{shard['name']}.safetensors"))[key])
        else:
            arrays.append(np.load(out / f"{shard['name']}.{key}.npy"))
    return (np.concatenate(arrays) if arrays else np.empty((0,))), [entry["input"] for entry in manifest["entries"]]


# ---------------------------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> None:
    """``vimkit extract --model NAME [--checkpoint FILE] --input PATH --out DIR [options]``."""
    parser = argparse.ArgumentParser(
        prog="vimkit extract", description="Extract features of images, video clips or point clouds."
    )
    parser.add_argument("--model", help="timm model name (optional with a Lightning .ckpt, which records it)")
    parser.add_argument(
        "--checkpoint",
        help="weights: .safetensors / .pth, or a Lightning .ckpt from vimkit fit (default: the model tag's released weights)",
    )
    parser.add_argument("--random-weights", action="store_true", help="without --checkpoint: seeded random weights")
    parser.add_argument("--seed", type=int, default=0, help="seed of --random-weights")
    parser.add_argument("--model-kwargs", type=json.loads, default=None, help="JSON timm arguments, e.g. '{\"img_size\": 32}'")
    parser.add_argument(
        "--input", required=True, help="folder, list file (.txt/.lst/.csv), HDF5 file of point clouds, or one file"
    )
    parser.add_argument("--out", required=True, help="output folder (a rerun resumes it)")
    parser.add_argument("--modality", choices=sorted(MODALITIES), help="expected modality (default: from the file extensions)")
    parser.add_argument("--tokens", action="store_true", help="also write the final per-token features")
    parser.add_argument(
        "--layers", type=int, nargs="+", default=None, help="also write the per-token features after these blocks"
    )
    parser.add_argument("--format", choices=FORMATS, default="npy")
    parser.add_argument("--shard-size", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--num-workers", type=int, default=None,
        help="loader processes of each device's process (default: one per core they leave free, at most 8)",
    )  # fmt: skip
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps, ... (default: a GPU if there is one)")
    parser.add_argument("--devices", type=int, default=1, help="processes per node, one device each (DDP when more than 1)")
    parser.add_argument("--num-nodes", "--num_nodes", type=int, default=1, help="nodes (each runs this command; see README)")
    parser.add_argument("--strategy", choices=STRATEGIES, default="auto", help="Lightning strategy (default: DDP for several)")
    parser.add_argument(
        "--num-points", type=int, default=None, help="points per cloud (default: a .ckpt's data.num_points, else the model's)"
    )
    args = parser.parse_args(argv)
    num_workers = default_num_workers(processes=args.devices) if args.num_workers is None else args.num_workers
    manifest = extract(
        args.model, args.input, args.out, checkpoint=args.checkpoint, model_kwargs=args.model_kwargs, modality=args.modality,
        tokens=args.tokens, layers=args.layers, format=args.format, shard_size=args.shard_size, batch_size=args.batch_size,
        num_workers=num_workers, device=args.device, num_points=args.num_points, random_weights=args.random_weights,
        seed=args.seed, devices=args.devices, num_nodes=args.num_nodes, strategy=args.strategy,
    )  # fmt: skip
    _report(manifest, args.out)


@rank_zero_only
def _report(manifest: dict[str, Any], out: str) -> None:
    """What ``vimkit extract`` prints (once, by rank 0)."""
    failed = manifest["failed"]
    print(f"Features of {manifest['num_rows']} inputs in {out} ({len(manifest['shards'])} shards, manifest {MANIFEST})")
    if failed:
        print(f"{len(failed)} inputs failed (listed in the manifest), e.g. {failed[0]['input']}: {failed[0]['reason']}")
