"""Deterministic, resumable sampling shared by every modality's training loader.

:class:`ResumableSampler` shuffles with a seed and the epoch (like ``DistributedSampler``, which it
extends, so Lightning keeps it under ``ddp``/``fsdp`` instead of wrapping it), can start an epoch part
way through (to resume a run killed mid-epoch) and yields :class:`SampleKey` pairs, so a dataset can
seed its random augmentation from the key: a sample's augmentation then depends only on (seed, epoch,
index), not on which worker loads it or how many samples that worker loaded before.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler


@dataclass(frozen=True, slots=True)
class SampleKey:
    """What the sampler hands a dataset: the sample's index and the seed for its augmentation."""

    index: int
    seed: int


def seed_everything_from(seed: int) -> None:
    """Seed Python's, NumPy's and PyTorch's global generators (what timm's transforms and Mixup draw from)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def mix_seed(*parts: int) -> int:
    """A 32-bit seed derived from non-negative integers (e.g. base seed, epoch, index); distinct inputs give unrelated seeds."""
    return int(np.random.SeedSequence(parts).generate_state(1)[0])


class ResumableSampler(DistributedSampler):
    """Seeded, per-epoch shuffled sampler over this rank's share of a dataset, able to skip ahead.

    Args:
        dataset: the dataset to sample (only its length is used).
        num_replicas: number of ranks (1 without distributed training).
        rank: this rank.
        shuffle: shuffle with ``seed + epoch`` (else sequential order).
        seed: base seed, the same on all ranks.
        drop_last: drop the tail that does not divide evenly across ranks.
    """

    def __init__(
        self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0, drop_last: bool = False
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self._skip = 0

    def skip_once(self, num_samples: int) -> None:
        """Start the next epoch's iteration ``num_samples`` into this rank's order (used once, then reset)."""
        if not 0 <= num_samples <= self.num_samples:
            raise ValueError(f"skip_once: num_samples={num_samples} is outside [0, {self.num_samples}] for this rank")
        self._skip = num_samples

    def __iter__(self) -> Iterator[SampleKey]:
        skip, self._skip = self._skip, 0
        indices = list(super().__iter__())[skip:]
        return iter(SampleKey(i, mix_seed(self.seed, self.epoch, i)) for i in indices)
