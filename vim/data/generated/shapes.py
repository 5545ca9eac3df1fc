"""A generated point-cloud dataset of geometric solids, the point-cloud quickstart's data.

Six classes (:data:`SHAPE_CLASSES`: sphere, cube, cylinder, cone, torus, pyramid). Every sample is its
solid's surface sampled uniformly, stretched by a random per-axis factor, turned by a random angle
about the up axis (y) and jittered with Gaussian noise. The set is written once as ``.npy`` files under ``$VIM_CACHE/shapes``
(default ``~/.cache/vim/shapes``), ``train/<class>/<n>.npy`` and ``val/<class>/<n>.npy``, so training
on it runs exactly the class-folder code path of :class:`~vim.data.points.PointCloudDataModule`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tqdm import tqdm

from vim.data.generated.cache import cache_dir, write_once
from vim.data.points import PointCloudDataModule, sample_mesh_surface, up_axis_rotation

SHAPE_CLASSES = ["cone", "cube", "cylinder", "pyramid", "sphere", "torus"]


def _unit_vectors(rng: np.random.Generator, count: int) -> np.ndarray:
    vectors = rng.normal(size=(count, 3))
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _disk(rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Uniform points (x, z) in the unit disk."""
    radius, angle = np.sqrt(rng.random(count)), rng.uniform(0, 2 * np.pi, count)
    return radius * np.cos(angle), radius * np.sin(angle)


def sphere(rng: np.random.Generator, count: int) -> np.ndarray:
    return _unit_vectors(rng, count)


def cylinder(rng: np.random.Generator, count: int) -> np.ndarray:
    """Radius 1, height 2 along y; side and caps in proportion to their areas (4 pi : 2 pi)."""
    on_side = rng.random(count) < 2 / 3
    angle = rng.uniform(0, 2 * np.pi, count)
    x, z = _disk(rng, count)
    x, z = np.where(on_side, np.cos(angle), x), np.where(on_side, np.sin(angle), z)
    y = np.where(on_side, rng.uniform(-1, 1, count), rng.choice([-1.0, 1.0], count))
    return np.stack([x, y, z], axis=1)


def cone(rng: np.random.Generator, count: int) -> np.ndarray:
    """Apex at y = 1, base of radius 1 at y = -1; side and base in proportion to their areas (sqrt 5 : 1)."""
    on_side = rng.random(count) < np.sqrt(5) / (np.sqrt(5) + 1)
    reach = np.sqrt(rng.random(count))  # distance from the apex, as a fraction: density grows linearly
    angle = rng.uniform(0, 2 * np.pi, count)
    x, z = _disk(rng, count)
    x, z = np.where(on_side, reach * np.cos(angle), x), np.where(on_side, reach * np.sin(angle), z)
    y = np.where(on_side, 1 - 2 * reach, -1.0)
    return np.stack([x, y, z], axis=1)


def torus(rng: np.random.Generator, count: int, major: float = 0.7, minor: float = 0.3) -> np.ndarray:
    """Ring about the y axis; the tube angle is drawn by rejection so that the density is uniform on the surface."""
    tube = np.empty(0)
    while len(tube) < count:
        candidates = rng.uniform(0, 2 * np.pi, 2 * count)
        keep = rng.random(2 * count) < (major + minor * np.cos(candidates)) / (major + minor)
        tube = np.concatenate([tube, candidates[keep]])
    tube, ring = tube[:count], rng.uniform(0, 2 * np.pi, count)
    radius = major + minor * np.cos(tube)
    return np.stack([radius * np.cos(ring), minor * np.sin(tube), radius * np.sin(ring)], axis=1)


_CUBE_VERTICES = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], dtype=np.float32)
_CUBE_FACES = np.array([[0, 1, 3], [0, 3, 2], [4, 6, 7], [4, 7, 5], [0, 4, 5], [0, 5, 1],
                        [2, 3, 7], [2, 7, 6], [0, 2, 6], [0, 6, 4], [1, 5, 7], [1, 7, 3]])  # fmt: skip
_PYRAMID_VERTICES = np.array([[-1, -1, -1], [1, -1, -1], [1, -1, 1], [-1, -1, 1], [0, 1, 0]], dtype=np.float32)
_PYRAMID_FACES = np.array([[0, 1, 2], [0, 2, 3], [0, 1, 4], [1, 2, 4], [2, 3, 4], [3, 0, 4]])


def cube(rng: np.random.Generator, count: int) -> np.ndarray:
    return sample_mesh_surface(_CUBE_VERTICES, _CUBE_FACES, count, seed=int(rng.integers(2**31)))


def pyramid(rng: np.random.Generator, count: int) -> np.ndarray:
    return sample_mesh_surface(_PYRAMID_VERTICES, _PYRAMID_FACES, count, seed=int(rng.integers(2**31)))


SAMPLERS: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "cone": cone, "cube": cube, "cylinder": cylinder, "pyramid": pyramid, "sphere": sphere, "torus": torus,
}  # fmt: skip


def make_shape(name: str, rng: np.random.Generator, count: int = 1024, noise: float = 0.02) -> np.ndarray:
    """One noisy sample (count, 3) float32 of the solid ``name``: stretched 0.6-1.4x per axis, turned about y, jittered."""
    points = SAMPLERS[name](rng, count) * rng.uniform(0.6, 1.4, size=3)
    points = points @ up_axis_rotation(rng.uniform(0, 2 * np.pi), "y").T + rng.normal(scale=noise, size=points.shape)
    return points.astype(np.float32)


def write_shapes_tree(
    root: str | os.PathLike, train_per_class: int = 120, val_per_class: int = 30, points_per_shape: int = 1024, seed: int = 0
) -> Path:
    """Write ``root/{train,val}/<class>/<n>.npy`` once (:func:`~vim.data.generated.cache.write_once`). Returns ``root``."""

    def write(root: Path) -> None:
        rng = np.random.default_rng(seed)
        for split, per_class in (("train", train_per_class), ("val", val_per_class)):
            for name in tqdm(SHAPE_CLASSES, desc=f"writing shapes/{split}", leave=False):
                folder = root / split / name
                folder.mkdir(parents=True, exist_ok=True)
                for i in range(per_class):
                    np.save(folder / f"{i:04d}.npy", make_shape(name, rng, points_per_shape))

    return write_once(root, write)


class ShapesDataModule(PointCloudDataModule):
    """:class:`PointCloudDataModule` on the generated solids, written under ``root`` (default ``$VIM_CACHE/shapes``) if missing.

    Args:
        root: where the tree lives; None for the cache directory.
        train_per_class: training samples per class written on first use.
        val_per_class: validation samples per class written on first use.
        **kwargs: any :class:`PointCloudDataModule` argument except the paths (num_points, batch size, augmentation, ...).
    """

    def __init__(
        self,
        root: str | None = None,
        train_per_class: int = 120,
        val_per_class: int = 30,
        predict_path: str | None = None,
        **kwargs,
    ) -> None:
        folder = Path(root) if root is not None else cache_dir() / "shapes"
        super().__init__(train_path=str(folder / "train"), val_path=str(folder / "val"), predict_path=predict_path, **kwargs)
        self.root, self.per_class = folder, (train_per_class, val_per_class)

    def prepare_data(self) -> None:
        write_shapes_tree(self.root, *self.per_class)

    def read_classes(self) -> list[str]:
        return SHAPE_CLASSES
