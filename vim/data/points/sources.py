"""Where a split's clouds come from: HDF5 files (ModelNet40's and ScanObjectNN's releases), or point files."""

from __future__ import annotations

import contextlib
import glob
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vim.data.folders import walk_files
from vim.data.points.readers import POINT_EXTENSIONS, read_point_file
from vim.data.samples import UNLABELLED

HDF5_EXTENSIONS = (".h5", ".hdf5")


def list_point_files(root: str | os.PathLike) -> list[Path]:
    """All point files (by extension) under ``root``, recursively, in sorted order."""
    return walk_files(root, lambda name: name.lower().endswith(POINT_EXTENSIONS))


def expand_hdf5_paths(path: str | Sequence[str], argument: str) -> list[Path] | Path:
    """The HDF5 files named by ``path`` (a file, a glob or a list), or the folder when ``path`` names one folder tree."""
    patterns = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if len(patterns) == 1 and Path(patterns[0]).is_dir():
        return Path(patterns[0])
    # a shell pattern as the user typed it, absolute or relative: glob.glob's rules (Path.glob wants a relative
    # pattern under a folder, and its "*" also matches hidden files)
    files = sorted({Path(match) for pattern in patterns for match in glob.glob(str(pattern))})  # noqa: PTH207
    if not files:
        raise ValueError(f"{argument}: no file or folder matches {patterns}")
    wrong = [str(f) for f in files if f.suffix.lower() not in HDF5_EXTENSIONS]
    if wrong:
        raise ValueError(
            f"{argument}: expected HDF5 files ({', '.join(HDF5_EXTENSIONS)}) or one class-folder tree, got {wrong[:3]}"
        )
    return files


class PointFiles:
    """Point files with class indices: ``name(i)``, ``target(i)``, ``read(i)`` -> (N, C) array."""

    def __init__(self, samples: Sequence[tuple[str, int]]) -> None:
        self.samples = list(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def name(self, index: int) -> str:
        return self.samples[index][0]

    def target(self, index: int) -> int:
        return self.samples[index][1]

    def read(self, index: int) -> np.ndarray:
        return read_point_file(self.samples[index][0])


@contextlib.contextmanager
def open_point_hdf5(path: str | os.PathLike) -> Iterator[Any]:
    """An HDF5 file of point clouds (a ``data`` dataset, ``label`` optional), open for reading.

    Raises:
        ValueError: the file is unreadable (also part-way through reading it) or has no ``data`` dataset.
    """
    import h5py

    try:
        with h5py.File(path, "r") as file:
            if "data" not in file:
                raise ValueError(f"{path}: HDF5 file has no 'data' dataset (found {sorted(file.keys())})")
            yield file
    except OSError as err:
        raise ValueError(f"{path}: unreadable HDF5 file ({err})") from None


def read_point_hdf5(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """The clouds ``data`` (M, P, C) of an HDF5 file and their class indices (M,) (``UNLABELLED`` without ``label``).

    Raises:
        ValueError: naming the file: unreadable (:func:`open_point_hdf5`), or ``data`` or ``label`` of the wrong shape.
    """
    with open_point_hdf5(path) as file:
        data = np.asarray(file["data"])
        label = np.asarray(file["label"]).reshape(-1).astype(np.int64) if "label" in file else None
    if data.ndim != 3:
        raise ValueError(f"{path}: 'data' must have shape (clouds, points, 3+), got {data.shape}")
    label = np.full(len(data), UNLABELLED) if label is None else label
    if len(label) != len(data):
        raise ValueError(f"{path}: 'label' has {len(label)} entries for {len(data)} clouds")
    return data, label


def _cloud_names(path: str | os.PathLike, count: int) -> list[str]:
    return [f"{path}[{row}]" for row in range(count)]


def hdf5_cloud_names(path: str | os.PathLike) -> list[str]:
    """The names of the clouds of HDF5 file ``path``, ``<file>[<row>]``; the file's own name alone when not even their
    number can be read (a file that is not HDF5, or truncated), so that it stands for its clouds as one unreadable input."""
    try:
        with open_point_hdf5(path) as file:
            count = len(file["data"])
    except ValueError:
        return [str(path)]
    return _cloud_names(path, count)


class HDF5Clouds:
    """The clouds of HDF5 files with ``data`` (M, P, C) and ``label`` datasets, read into memory once.

    Samples are named ``<file>[<row>]``.

    Args:
        files: the HDF5 files.
        skip_unreadable: keep a file that cannot be read (:func:`read_point_hdf5`'s ValueError) instead of raising:
            its samples (named as :func:`hdf5_cloud_names` does) raise that error when read, which
            :class:`~vim.data.points.dataset.PointClouds` returns as an unreadable sample with the reason.
    """

    def __init__(self, files: Sequence[str | os.PathLike], skip_unreadable: bool = False) -> None:
        clouds: list[np.ndarray] = []  # (M, P, C) of each readable file
        labels: list[np.ndarray] = []  # (M,) of each file
        self.names: list[str] = []
        self._rows: list[int | str] = []  # each sample's row in self.clouds, or why its file cannot be read
        for path in files:
            try:
                data, label = read_point_hdf5(path)
            except ValueError as error:
                if not skip_unreadable:
                    raise
                names = hdf5_cloud_names(path)
                self._rows += [str(error)] * len(names)
                label = np.full(len(names), UNLABELLED)
            else:
                names = _cloud_names(path, len(data))
                start = sum(len(block) for block in clouds)
                self._rows += range(start, start + len(data))
                clouds.append(data)
            labels.append(label)
            self.names += names
        self.clouds = np.concatenate(clouds) if clouds else np.empty((0, 0, 3), np.float32)
        self.labels = np.concatenate(labels) if labels else np.empty(0, np.int64)

    def __len__(self) -> int:
        return len(self.names)

    def name(self, index: int) -> str:
        return self.names[index]

    def target(self, index: int) -> int:
        return int(self.labels[index])

    def read(self, index: int) -> np.ndarray:
        """The cloud ``index`` (P, C); ValueError with the reason when its file could not be read."""
        row = self._rows[index]
        if isinstance(row, str):
            raise ValueError(row)
        return self.clouds[row]
