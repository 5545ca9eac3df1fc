"""Preparing a cloud for the model, for training, evaluation, prediction and feature extraction alike
(:func:`prepare_points`): resampled to ``num_points`` by farthest point sampling, centred and scaled into the unit
sphere, and in training augmented by :class:`PointAugment` (PointMamba's recipes)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from vim.models.point_ops import farthest_point_sample

TRAIN_OVERSAMPLING = 1.2
"""Training draws ``num_points`` at random from this many times as many farthest-point samples."""


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
    xyz: np.ndarray,
    num_points: int,
    rng: np.random.Generator | None = None,
    augment: PointAugment | None = None,
    normalize: bool = True,
) -> np.ndarray:
    """Resample to ``num_points``, normalise into the unit sphere (unless ``normalize`` is off: ScanObjectNN's
    recipes keep the scans' own scale), then augment (with ``rng`` and ``augment``)."""
    points = resample_points(xyz, num_points, rng)
    points = (normalize_unit_sphere(points) if normalize else points).astype(np.float32)
    return augment(points, rng) if augment is not None and rng is not None else points
