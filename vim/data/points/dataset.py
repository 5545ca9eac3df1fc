"""Clouds as a dataset: checked, prepared and augmented per sample; a bad cloud returned, never raised."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from vim.data.points.readers import check_point_array
from vim.data.points.sources import HDF5Clouds, PointFiles
from vim.data.points.transforms import PointAugment, prepare_points
from vim.data.samples import Unreadable
from vim.data.sampling import SampleKey


class LoadedCloud(NamedTuple):
    """One prepared cloud: ``points`` (num_points, 3), its class index (``UNLABELLED`` for predict) and name."""

    points: torch.Tensor
    target: int
    path: str


class PointBatch(NamedTuple):
    """A collated batch: ``points`` (B, N, 3), ``targets`` (B,), the B names and the clouds left out."""

    points: torch.Tensor
    targets: torch.Tensor
    paths: list[str]
    skipped: list[Unreadable]


class PointClouds(Dataset):
    """Clouds of a source (:class:`~vim.data.points.sources.PointFiles` or :class:`~vim.data.points.sources.HDF5Clouds`),
    checked and prepared by :func:`~vim.data.points.transforms.prepare_points`.

    Indexed by an int (deterministic preparation) or a :class:`~vim.data.sampling.SampleKey` (random resampling and
    ``augment``, seeded from ``key.seed``). Bad clouds come back as :class:`~vim.data.samples.Unreadable`.
    """

    def __init__(
        self,
        source: PointFiles | HDF5Clouds,
        num_points: int,
        min_points: int = 1,
        augment: PointAugment | None = None,
        normalize: bool = True,
    ):
        self.source, self.num_points, self.min_points, self.augment = source, num_points, min_points, augment
        self.normalize = normalize

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: int | SampleKey) -> LoadedCloud | Unreadable:
        index = key.index if isinstance(key, SampleKey) else key
        name = self.source.name(index)
        try:
            xyz = check_point_array(self.source.read(index), name, self.min_points)
        except (OSError, ValueError, EOFError) as err:  # numpy raises all of these for damaged files
            return Unreadable(name, str(err).removeprefix(f"{name}: "))
        rng = np.random.default_rng(key.seed) if isinstance(key, SampleKey) else None
        points = prepare_points(xyz, self.num_points, rng, self.augment, self.normalize)
        return LoadedCloud(torch.from_numpy(np.ascontiguousarray(points)), self.source.target(index), name)


def collate_clouds(samples: Sequence[LoadedCloud | Unreadable]) -> PointBatch:
    """Stack the readable clouds into a :class:`PointBatch`; the others are listed in ``skipped``."""
    loaded = [s for s in samples if isinstance(s, LoadedCloud)]
    points = torch.stack([s.points for s in loaded]) if loaded else torch.empty(0, 0, 3)
    targets = torch.tensor([s.target for s in loaded], dtype=torch.long)
    return PointBatch(points, targets, [s.path for s in loaded], [s for s in samples if isinstance(s, Unreadable)])
