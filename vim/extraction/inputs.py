"""Which inputs an extraction reads: a folder walked, a list file read, HDF5 files expanded into their clouds, and
their one modality (:mod:`vim.data.modalities`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from vim.data.folders import walk_files
from vim.data.modalities import MODALITIES, modality_of
from vim.data.points.sources import HDF5_EXTENSIONS, hdf5_cloud_names

__all__ = ["LIST_EXTENSIONS", "resolve_inputs"]

LIST_EXTENSIONS = (".txt", ".lst", ".csv")


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
    """The files of every modality below ``root``, in walk order, hidden ones left out."""
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


def _paths(inputs: str | os.PathLike | Sequence[str]) -> list[str]:
    """The files ``inputs`` names: a folder's (walked), a list file's, the one file, or the sequence given."""
    if not isinstance(inputs, (str, os.PathLike)):
        if not inputs:
            raise ValueError("inputs: the list of files is empty")
        return [str(p) for p in inputs]
    path = Path(inputs)
    if path.is_dir():
        return _walk(path)
    if not path.exists():
        raise ValueError(f"input '{path}' does not exist")
    return _read_list(path) if path.suffix.lower() in LIST_EXTENSIONS else [str(path)]


def _one_modality(names: list[str], modality: str | None) -> str:
    """The one modality of ``names`` (``modality`` when given); ValueError naming an input of each one found, or one of
    no modality."""
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
    return found[0]


def resolve_inputs(inputs: str | os.PathLike | Sequence[str], modality: str | None = None) -> tuple[list[str], str]:
    """The input names (absolute paths; an HDF5 file's clouds as ``<file>[<row>]``), in order, and their modality.

    Args:
        inputs: a folder, a list file, an HDF5 file, a single file, or a sequence of files.
        modality: expected modality; None detects it.

    Raises:
        ValueError: no inputs, unknown extensions, or more than one modality (naming a file of each).
    """
    if modality is not None and modality not in MODALITIES:
        raise ValueError(f"modality must be one of {sorted(MODALITIES)}, got {modality!r}")
    names = [os.path.normpath(Path(p).absolute()) for p in _paths(inputs)]  # one name per input, whatever the working directory
    found = _one_modality(names, modality)  # before opening any HDF5 file
    return _expand_hdf5(names), found
