"""Point-cloud classification data: ModelNet40 / ScanObjectNN HDF5 files and folders of point files per class.

Sources (each split's ``*_path``):

* HDF5 files (``.h5`` / ``.hdf5``, a glob such as ``modelnet40_ply_hdf5_2048/ply_data_train*.h5`` or a
  list of files): datasets ``data`` (M, P, 3+) and ``label`` (M,) or (M, 1), as in ModelNet40's standard
  HDF5 release and ScanObjectNN's ``h5_files``. Class names come from ``class_names``, else from a
  ``shape_names.txt`` next to the files, else they are the label numbers.
* A folder ``root/<class>/<file>`` of ``.npy`` arrays (N, 3) or (N, 6) (xyz + normals), ``.ply`` point
  clouds (their vertices) or ``.off`` files (a mesh's surface is sampled, a vertex-only file read as points).

Each cloud is checked (shape, finite values, at least ``min_points`` points), resampled to ``num_points``
(farthest point sampling: deterministic for evaluation, from a random start and with a random subset for
training; points repeat when the cloud has fewer), centred and scaled into the unit sphere, and in training augmented by a
per-axis scale and a translation (PointMamba's ModelNet40 recipe) and/or a random rotation about the up
axis (its ScanObjectNN recipe). Unreadable or invalid clouds are skipped with a warning naming the file,
never a crash mid-epoch. Training order and augmentation are seeded per sample, so a resumed run sees the
same data as an uninterrupted one (the resumable loaders of :class:`~vim.data.images.ImageDataModule`).
"""

from __future__ import annotations

import contextlib
import glob
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from vim.data.images import UNLABELLED, ImageDataModule, find_classes, labelled_files, walk_files
from vim.data.sampling import SampleKey
from vim.models.point_ops import farthest_point_sample

POINT_EXTENSIONS = (".npy", ".ply", ".off")
HDF5_EXTENSIONS = (".h5", ".hdf5")
MESH_SURFACE_POINTS = 8192
"""Points sampled (uniformly by area, fixed seed) from the surface of a mesh file."""
TRAIN_OVERSAMPLING = 1.2
"""Training draws ``num_points`` at random from this many times as many farthest-point samples."""


# ---------------------------------------------------------------------------------------------- reading
def check_point_array(array: np.ndarray, source: str, min_points: int = 1) -> np.ndarray:
    """The (N, 3) float32 xyz of an (N, 3) or (N, 6) array; ValueError naming ``source`` when it is not a usable cloud."""
    array = np.asarray(array)
    if array.ndim != 2 or array.shape[1] not in (3, 6):
        raise ValueError(f"{source}: expected an (N, 3) array of xyz points (or (N, 6) with normals), got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"{source}: expected numeric coordinates, got dtype {array.dtype}")
    xyz = array[:, :3].astype(np.float32)
    bad = int((~np.isfinite(xyz)).any(axis=1).sum())
    if bad:
        raise ValueError(f"{source}: {bad} of {len(xyz)} points have NaN or infinite coordinates")
    if len(xyz) < min_points:
        raise ValueError(
            f"{source}: {len(xyz)} points, fewer than the {min_points} the model needs (its group size / group count)"
        )
    return xyz


def read_point_file(path: str | os.PathLike) -> np.ndarray:
    """Read a ``.npy``, ``.ply`` or ``.off`` file as an (N, C) array (meshes: :data:`MESH_SURFACE_POINTS` surface points)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return np.load(path, allow_pickle=False)
    if suffix == ".ply":
        return read_ply_vertices(path)
    if suffix == ".off":
        vertices, faces = read_off(path)
        return sample_mesh_surface(vertices, faces, MESH_SURFACE_POINTS) if len(faces) else vertices
    raise ValueError(f"{path}: not a point-cloud file (expected one of {', '.join(POINT_EXTENSIONS)})")


_PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2", "ushort": "u2", "uint16": "u2",
    "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4", "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}  # fmt: skip


def read_ply_vertices(path: str | os.PathLike) -> np.ndarray:
    """The x, y, z of the ``vertex`` element of an ASCII or binary PLY file, (N, 3). Faces are ignored.

    The vertex element must come first, or after elements without list properties.
    """
    with open(path, "rb") as file:
        if file.readline().strip() != b"ply":
            raise ValueError(f"{path}: not a PLY file (no 'ply' magic line)")
        fmt, elements = None, []  # elements: [name, count, [(property, type)]]
        while (line := file.readline()) and line.strip() != b"end_header":
            words = line.decode("ascii", "replace").split()
            if words[:1] == ["format"]:
                fmt = words[1]
            elif words[:1] == ["element"]:
                elements.append([words[1], int(words[2]), []])
            elif words[:1] == ["property"] and elements:
                elements[-1][2].append((words[-1], "list" if words[1] == "list" else _PLY_TYPES.get(words[1], "?")))
        if not line:
            raise ValueError(f"{path}: PLY header has no 'end_header' line")
        if fmt not in ("ascii", "binary_little_endian", "binary_big_endian"):
            raise ValueError(f"{path}: unsupported PLY format {fmt!r}")
        endian = ">" if fmt == "binary_big_endian" else "<"
        for name, count, properties in elements:
            if any(kind in ("list", "?") for _, kind in properties):
                raise ValueError(f"{path}: PLY element '{name}' before 'vertex' has list or unknown properties; cannot skip it")
            dtype = np.dtype([(prop, endian + kind) for prop, kind in properties])
            if fmt == "ascii":
                rows = [file.readline().split() for _ in range(count)]
                table = np.array([tuple(row[: len(properties)]) for row in rows], dtype=dtype) if count else np.empty(0, dtype)
            else:
                table = np.frombuffer(file.read(dtype.itemsize * count), dtype=dtype, count=count)
            if name == "vertex":
                missing = {"x", "y", "z"} - set(table.dtype.names)
                if missing:
                    raise ValueError(f"{path}: PLY vertices have no {sorted(missing)} properties")
                return np.stack([table["x"], table["y"], table["z"]], axis=1).astype(np.float32)
    raise ValueError(f"{path}: PLY file has no 'vertex' element")


def read_off(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Vertices (V, 3) and triangles (F, 3) of an ASCII OFF file (polygons are fanned into triangles)."""
    with open(path) as file:
        tokens = [word for line in file for word in line.split("#")[0].split()]
    if not tokens or not tokens[0].startswith("OFF"):
        raise ValueError(f"{path}: not an OFF file (no 'OFF' header)")
    head = tokens[0][3:]  # ModelNet writes "OFF490 518 0" without a line break
    tokens = ([head] if head else []) + tokens[1:]
    try:
        num_vertices, num_faces = int(tokens[0]), int(tokens[1])
        vertices = np.array(tokens[3 : 3 + 3 * num_vertices], dtype=np.float64).reshape(num_vertices, 3)
        triangles, position = [], 3 + 3 * num_vertices
        for _ in range(num_faces):
            size = int(tokens[position])
            corners = [int(t) for t in tokens[position + 1 : position + 1 + size]]
            triangles += [(corners[0], corners[i], corners[i + 1]) for i in range(1, size - 1)]
            position += 1 + size
    except (IndexError, ValueError) as err:
        raise ValueError(f"{path}: truncated or malformed OFF file ({err})") from None
    faces = np.array(triangles, dtype=np.int64).reshape(-1, 3)
    if faces.size and (faces.min() < 0 or faces.max() >= num_vertices):
        raise ValueError(f"{path}: OFF faces refer to vertices outside 0..{num_vertices - 1}")
    return vertices.astype(np.float32), faces


def sample_mesh_surface(vertices: np.ndarray, faces: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """``count`` points uniformly distributed over a triangle mesh's surface (by area), (count, 3) float32."""
    corners = vertices[faces].astype(np.float64)  # (F, 3, 3)
    areas = 0.5 * np.linalg.norm(np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]), axis=1)
    if not areas.sum() > 0:
        return vertices
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(faces), size=count, p=areas / areas.sum())
    u, v = rng.random((2, count, 1))
    flip = (u + v) > 1
    u, v = np.where(flip, 1 - u, u), np.where(flip, 1 - v, v)
    a, b, c = corners[chosen, 0], corners[chosen, 1], corners[chosen, 2]
    return (a + u * (b - a) + v * (c - a)).astype(np.float32)


# ---------------------------------------------------------------------------------------------- transforms
def normalize_unit_sphere(points: np.ndarray) -> np.ndarray:
    """Centre (N, 3) points at their centroid and scale the farthest one to distance 1."""
    centred = points - points.mean(axis=0, keepdims=True)
    radius = float(np.sqrt((centred**2).sum(axis=1)).max())
    return centred / radius if radius > 0 else centred


def farthest_points(points: np.ndarray, count: int, start: int = 0) -> np.ndarray:
    """``count`` of (N, 3) ``points`` chosen by farthest point sampling from point ``start``."""
    rolled = torch.from_numpy(np.roll(points, -start, axis=0))
    return rolled[farthest_point_sample(rolled[None], count)[0]].numpy()


def resample_points(points: np.ndarray, num_points: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """Exactly ``num_points`` of (N, 3) ``points``, evenly spread over the cloud.

    Without ``rng`` (evaluation): farthest point sampling from point 0. With ``rng`` (training), as in
    Point-MAE / PointMamba fine-tuning: farthest point sampling of :data:`TRAIN_OVERSAMPLING` x
    ``num_points`` from a random start, then a random ``num_points`` of those. Clouds with fewer points
    are filled up by repeating points (cyclically for evaluation, drawn at random for training).
    """
    count = len(points)
    if count < num_points:
        if rng is None:
            return points[np.resize(np.arange(count), num_points)]
        extra = rng.choice(count, num_points - count, replace=True)
        return points[rng.permutation(np.concatenate([np.arange(count), extra]))]
    if rng is None:
        return farthest_points(points, num_points)
    pool = farthest_points(points, min(count, math.ceil(TRAIN_OVERSAMPLING * num_points)), start=int(rng.integers(count)))
    return pool[rng.choice(len(pool), num_points, replace=False)]


@dataclass(frozen=True)
class PointAugment:
    """Training augmentation of normalised (N, 3) points.

    Args:
        scale: per-axis scale factors drawn from this range (None: no scaling).
        translate: translation per axis drawn from [-translate, translate].
        rotate: rotate by a random angle about ``up_axis``.
        up_axis: "x", "y" (ModelNet40, ScanObjectNN) or "z".
    """

    scale: tuple[float, float] | None = (2.0 / 3.0, 1.5)
    translate: float = 0.2
    rotate: bool = False
    up_axis: str = "y"

    def __post_init__(self) -> None:
        if self.up_axis not in ("x", "y", "z"):
            raise ValueError(f"up_axis must be 'x', 'y' or 'z', got {self.up_axis!r}")

    def __call__(self, points: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if self.rotate:
            points = points @ up_axis_rotation(rng.uniform(0, 2 * np.pi), self.up_axis).T
        if self.scale is not None:
            points = points * rng.uniform(self.scale[0], self.scale[1], size=3)
        return (points + rng.uniform(-self.translate, self.translate, size=3)).astype(np.float32)


def up_axis_rotation(angle: float, axis: str) -> np.ndarray:
    """(3, 3) rotation by ``angle`` (radians, right-handed) about ``axis``."""
    c, s = np.cos(angle), np.sin(angle)
    i, j = [(1, 2), (2, 0), (0, 1)]["xyz".index(axis)]
    rotation = np.eye(3)
    rotation[i, i], rotation[i, j], rotation[j, i], rotation[j, j] = c, -s, s, c
    return rotation.astype(np.float32)


def prepare_points(
    xyz: np.ndarray, num_points: int, rng: np.random.Generator | None = None, augment: PointAugment | None = None
) -> np.ndarray:
    """Resample to ``num_points``, normalise into the unit sphere, then augment (with ``rng`` and ``augment``)."""
    points = normalize_unit_sphere(resample_points(xyz, num_points, rng)).astype(np.float32)
    return augment(points, rng) if augment is not None and rng is not None else points


# ---------------------------------------------------------------------------------------------- sources
def list_point_files(root: str | os.PathLike) -> list[Path]:
    """All point files (by extension) under ``root``, recursively, in sorted order."""
    return walk_files(root, lambda name: name.lower().endswith(POINT_EXTENSIONS))


def expand_hdf5_paths(path: str | Sequence[str], argument: str) -> list[Path] | None:
    """The HDF5 files named by ``path`` (a file, a glob or a list), or None when ``path`` is a folder tree."""
    patterns = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if len(patterns) == 1 and Path(patterns[0]).is_dir():
        return None
    files = sorted({Path(match) for pattern in patterns for match in glob.glob(str(pattern))})
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


class HDF5Clouds:
    """The clouds of HDF5 files with ``data`` (M, P, C) and ``label`` datasets, read into memory once.

    Samples are named ``<file>[<row>]``.
    """

    def __init__(self, files: Sequence[str | os.PathLike]) -> None:
        clouds, labels, self.names = [], [], []
        for path in files:
            with open_point_hdf5(path) as file:
                data = np.asarray(file["data"])
                label = np.asarray(file["label"]).reshape(-1).astype(np.int64) if "label" in file else None
            if data.ndim != 3:
                raise ValueError(f"{path}: 'data' must have shape (clouds, points, 3+), got {data.shape}")
            label = np.full(len(data), UNLABELLED) if label is None else label
            if len(label) != len(data):
                raise ValueError(f"{path}: 'label' has {len(label)} entries for {len(data)} clouds")
            clouds.append(data)
            labels.append(label)
            self.names += [f"{path}[{row}]" for row in range(len(data))]
        self.clouds = np.concatenate(clouds) if clouds else np.empty((0, 0, 3), np.float32)
        self.labels = np.concatenate(labels) if labels else np.empty(0, np.int64)

    def __len__(self) -> int:
        return len(self.clouds)

    def name(self, index: int) -> str:
        return self.names[index]

    def target(self, index: int) -> int:
        return int(self.labels[index])

    def read(self, index: int) -> np.ndarray:
        return self.clouds[index]


# ---------------------------------------------------------------------------------------------- dataset
class LoadedCloud(NamedTuple):
    """One prepared cloud: ``points`` (num_points, 3), its class index (``UNLABELLED`` for predict) and name."""

    points: torch.Tensor
    target: int
    path: str


class UnreadableCloud(NamedTuple):
    """A cloud that could not be read or failed the checks, and why."""

    path: str
    reason: str


class PointBatch(NamedTuple):
    """A collated batch: ``points`` (B, N, 3), ``targets`` (B,), the B names and the clouds left out."""

    points: torch.Tensor
    targets: torch.Tensor
    paths: list[str]
    skipped: list[UnreadableCloud]


class PointClouds(Dataset):
    """Clouds of a source (:class:`PointFiles` or :class:`HDF5Clouds`), checked and prepared by :func:`prepare_points`.

    Indexed by an int (deterministic preparation) or a :class:`SampleKey` (random resampling and
    ``augment``, seeded from ``key.seed``). Bad clouds come back as :class:`UnreadableCloud`.
    """

    def __init__(
        self, source: PointFiles | HDF5Clouds, num_points: int, min_points: int = 1, augment: PointAugment | None = None
    ):
        self.source, self.num_points, self.min_points, self.augment = source, num_points, min_points, augment

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: int | SampleKey) -> LoadedCloud | UnreadableCloud:
        index = key.index if isinstance(key, SampleKey) else key
        name = self.source.name(index)
        try:
            xyz = check_point_array(self.source.read(index), name, self.min_points)
        except (OSError, ValueError, EOFError) as err:  # numpy raises all of these for damaged files
            return UnreadableCloud(name, str(err).removeprefix(f"{name}: "))
        rng = np.random.default_rng(key.seed) if isinstance(key, SampleKey) else None
        points = prepare_points(xyz, self.num_points, rng, self.augment)
        return LoadedCloud(torch.from_numpy(np.ascontiguousarray(points)), self.source.target(index), name)


def collate_clouds(samples: Sequence[LoadedCloud | UnreadableCloud]) -> PointBatch:
    """Stack the readable clouds into a :class:`PointBatch`; the others are listed in ``skipped``."""
    loaded = [s for s in samples if isinstance(s, LoadedCloud)]
    points = torch.stack([s.points for s in loaded]) if loaded else torch.empty(0, 0, 3)
    targets = torch.tensor([s.target for s in loaded], dtype=torch.long)
    return PointBatch(points, targets, [s.path for s in loaded], [s for s in samples if isinstance(s, UnreadableCloud)])


# ---------------------------------------------------------------------------------------------- datamodule
class PointCloudDataModule(ImageDataModule):
    """Point-cloud classification data (HDF5 or class folders) with PointMamba's sampling and augmentation.

    The resumable, seeded training loader and the val/test/predict loaders are those of
    :class:`~vim.data.images.ImageDataModule`; this class supplies the point-cloud datasets.

    Args:
        train_path: HDF5 file(s) / glob, or a ``<class>/<file>`` folder tree, for ``fit``.
        val_path: same classes, for validation (and ``test`` unless ``test_path`` is given).
        test_path: data for ``test``.
        predict_path: a folder of point files (any nesting) or HDF5 file(s) to classify with ``predict``.
        num_points: points per cloud fed to the model (1024 for ModelNet40, 2048 for ScanObjectNN).
        min_points: clouds with fewer points are skipped (use the model's group size).
        class_names: class names in label order (HDF5 data); None reads ``shape_names.txt`` or numbers the labels.
        batch_size: clouds per device and step.
        num_workers: loader processes per device.
        pin_memory: page-locked host memory for faster copies to the GPU.
        seed: seed of the shuffling and of each sample's resampling and augmentation.
        scale: training per-axis scale range (None: off).
        translate: training translation range (0: off).
        rotate: training rotation about ``up_axis``.
        up_axis: the up axis of the data ("y" for ModelNet40 and ScanObjectNN).
    """

    collate_fn = staticmethod(collate_clouds)

    def __init__(
        self,
        train_path: str | list[str] | None = None,
        val_path: str | list[str] | None = None,
        test_path: str | list[str] | None = None,
        predict_path: str | list[str] | None = None,
        num_points: int = 1024,
        min_points: int = 32,
        class_names: list[str] | None = None,
        batch_size: int = 32,
        num_workers: int = 4,
        pin_memory: bool = True,
        seed: int = 0,
        scale: tuple[float, float] | None = (2.0 / 3.0, 1.5),
        translate: float = 0.2,
        rotate: bool = False,
        up_axis: str = "y",
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory, seed=seed)
        if num_points < min_points:
            raise ValueError(f"num_points={num_points} is smaller than min_points={min_points}")
        self.paths = {"train_path": train_path, "val_path": val_path, "test_path": test_path, "predict_path": predict_path}
        self.num_points, self.min_points, self.class_names = num_points, min_points, class_names
        self.augment = PointAugment(
            scale=None if scale is None else tuple(scale), translate=translate, rotate=rotate, up_axis=up_axis
        )
        self._sources: dict[str, PointFiles | HDF5Clouds] = {}

    # --------------------------------------------------------------------------------------- sources
    def source(self, argument: str) -> PointFiles | HDF5Clouds:
        """The (cached) labelled source of a split argument, e.g. ``"train_path"``."""
        if argument not in self._sources:
            path = self.paths[argument]
            files = expand_hdf5_paths(path, argument)
            if files is not None:
                self._sources[argument] = HDF5Clouds(files)
            else:
                classes = find_classes(path, argument)
                samples = labelled_files(path, classes, argument, list_point_files, "point", POINT_EXTENSIONS)
                self._sources[argument] = PointFiles(samples)
        return self._sources[argument]

    def labelled_argument(self) -> str:
        for argument in ("train_path", "val_path", "test_path"):
            if self.paths[argument] is not None:
                return argument
        raise ValueError("no labelled data: set data.train_path, data.val_path or data.test_path")

    @property
    def classes(self) -> list[str]:
        """Class names: ``class_names``, the class folders, ``shape_names.txt`` beside the HDF5 files, or label numbers."""
        if self.class_names is not None:
            return list(self.class_names)
        argument = self.labelled_argument()
        files = expand_hdf5_paths(self.paths[argument], argument)
        if files is None:
            return find_classes(self.paths[argument], argument)
        names_file = files[0].parent / "shape_names.txt"
        if names_file.is_file():
            return [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
        labels = self.source(argument).labels
        return [str(i) for i in range(int(labels.max()) + 1)] if len(labels) else []

    def check_labels(self, argument: str) -> None:
        """ValueError when a split's labels fall outside the class list (e.g. HDF5 labels vs ``class_names``)."""
        source, num_classes = self.source(argument), len(self.classes)
        labels = source.labels if isinstance(source, HDF5Clouds) else np.array([t for _, t in source.samples])
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"{argument}: labels span {labels.min()}..{labels.max()} but there are {num_classes} classes")

    def labelled_dataset(self, argument: str, augment: PointAugment | None) -> PointClouds:
        if self.paths[argument] is None:
            raise ValueError(f"this stage needs data.{argument}")
        self.check_labels(argument)
        return PointClouds(self.source(argument), self.num_points, self.min_points, augment)

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self.datasets["train"] = self.labelled_dataset("train_path", self.augment)
        if stage in ("fit", "validate") and (stage == "validate" or self.paths["val_path"] is not None):
            self.datasets["val"] = self.labelled_dataset("val_path", None)
        if stage == "test":
            self.datasets["test"] = self.labelled_dataset(
                "test_path" if self.paths["test_path"] is not None else "val_path", None
            )
        if stage == "predict":
            self.datasets["predict"] = PointClouds(self.unlabelled_source(), self.num_points, self.min_points)

    def unlabelled_source(self) -> PointFiles | HDF5Clouds:
        path = self.paths["predict_path"]
        if path is None:
            raise ValueError("predict needs data.predict_path, a folder of point files or HDF5 file(s)")
        files = expand_hdf5_paths(path, "predict_path")
        if files is not None:
            return HDF5Clouds(files)
        found = list_point_files(path)
        if not found:
            raise ValueError(f"predict_path: no point files ({', '.join(POINT_EXTENSIONS)}) under '{path}'")
        return PointFiles([(str(f), UNLABELLED) for f in found])

    def on_before_batch_transfer(self, batch: PointBatch, dataloader_idx: int) -> PointBatch:
        """Warn about each skipped cloud as it occurs, with a running count."""
        self.report_skipped(batch.skipped, "point cloud")
        return batch
