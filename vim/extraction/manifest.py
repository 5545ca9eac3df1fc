"""What an extraction run records in its output folder, and reading it back.

The folder holds shards of inputs cut by index (:class:`Shards`), each ``shard-00000.<key>.npy`` (one file per
feature key) or ``shard-00000.safetensors`` (all keys) and its ``shard-00000.json`` (written last), and
``manifest.json`` (:data:`MANIFEST`): the run's settings, its inputs, and once complete each input's shard and row
and the failures. A rerun resumes a folder whose manifest has the same settings and inputs
(:func:`check_resumable`); :func:`read_features` reads a finished one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["FORMATS", "MANIFEST", "Shards", "check_resumable", "final_manifest", "read_features", "shard_files"]

MANIFEST = "manifest.json"
FORMATS = ("npy", "safetensors")
"""How a shard's arrays are stored: one ``.npy`` file per feature key, or one ``.safetensors`` file of all keys."""


@dataclass(frozen=True)
class Shards:
    """Inputs ``0 .. num_inputs - 1`` cut into shards of ``size`` consecutive inputs, named ``shard-00000``, ..."""

    num_inputs: int
    size: int

    def __len__(self) -> int:
        return -(-self.num_inputs // self.size)

    def name(self, shard: int) -> str:
        return f"shard-{shard:05d}"

    def inputs(self, shard: int) -> range:
        """The indices of the inputs of ``shard``."""
        return range(shard * self.size, min((shard + 1) * self.size, self.num_inputs))

    def finished(self, out: Path) -> list[bool]:
        """Whether each shard's json (written last) is in ``out``."""
        return [(out / f"{self.name(shard)}.json").is_file() for shard in range(len(self))]


def shard_files(name: str, keys: list[str], fmt: str) -> list[str]:
    """The files of feature ``keys`` of shard ``name``: one ``.npy`` file per key, or one ``.safetensors`` file of all."""
    return [f"{name}.safetensors"] if fmt == "safetensors" else [f"{name}.{key}.npy" for key in keys]


def final_manifest(out: Path, settings: dict, inputs: list[str], shards: Shards) -> dict[str, Any]:
    """The finished run's manifest, from the shards' jsons in ``out``: each shard's files and rows, each input's shard and
    row, and the failures, in input order."""
    records, entries, failed = [], [], []
    for shard in range(len(shards)):
        name = shards.name(shard)
        record = json.loads((out / f"{name}.json").read_text())
        files = shard_files(name, settings["keys"], settings["format"]) if record["inputs"] else []
        records.append({"name": name, "files": files, "rows": len(record["inputs"])})
        entries += [{"input": path, "shard": name, "row": row} for row, path in enumerate(record["inputs"])]
        failed += record["failed"]
    return {
        "settings": settings,
        "complete": True,
        "inputs": inputs,
        "num_rows": len(entries),
        "shards": records,
        "entries": entries,
        "failed": failed,
    }


# ---------------------------------------------------------------------------------------------- resuming
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


def check_resumable(out: Path, settings: dict[str, Any], inputs: list[str]) -> dict[str, Any] | None:
    """The existing manifest when ``out`` holds a run with the same settings and inputs (None when it holds none);
    ValueError naming what differs."""
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


# ---------------------------------------------------------------------------------------------- reading
def read_features(out: str | os.PathLike, key: str = "pooled") -> tuple[np.ndarray, list[str]]:
    """All rows of feature ``key`` of a finished extraction, concatenated over shards, and the input of each row."""
    out = Path(out)
    manifest = json.loads((out / MANIFEST).read_text())
    settings = manifest["settings"]
    if not manifest.get("complete"):
        raise ValueError(f"'{out}' holds an unfinished extraction; rerun vimkit extract to complete it")
    if key not in settings["keys"]:
        raise ValueError(f"key {key!r} was not extracted; available: {settings['keys']}")
    shards = [shard["name"] for shard in manifest["shards"] if shard["rows"]]  # a shard of failures only has no files
    arrays = [_read_array(out / shard_files(name, [key], settings["format"])[0], key) for name in shards]
    return (np.concatenate(arrays) if arrays else np.empty((0,))), [entry["input"] for entry in manifest["entries"]]


def _read_array(path: Path, key: str) -> np.ndarray:
    """Feature ``key`` of a shard file: a ``.npy`` file's array, or that key of a ``.safetensors`` file."""
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        return load_file(str(path))[key]
    return np.load(path)
