"""What every modality's dataset hands its loader, besides the sample itself.

A dataset item is either the loaded sample (a named tuple whose first two fields are the input and the class
index, then its ``path``) or :class:`Unreadable`, which the batch's collate function leaves out and lists in the
batch's ``skipped`` field. Unlabelled samples (``predict``) carry the class index :data:`UNLABELLED`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from torch.utils.data import Dataset

from vim.data.sampling import SampleKey, seed_everything_from

UNLABELLED = -1
"""The class index of a sample without a label (``predict``)."""


class Unreadable(NamedTuple):
    """A sample that could not be read, or failed its checks, and why."""

    path: str
    reason: str


class DataWarning(UserWarning):
    """Something in the data that the pipeline worked around: an unreadable sample skipped, an empty class folder,
    a small image upsampled, a truncated video used up to its last frame. The message names the file."""


class SampleFiles(Dataset):
    """``(path, class index)`` samples read from files, each loaded by :meth:`load` or returned as :class:`Unreadable`.

    Indexed by an int or a :class:`~vim.data.sampling.SampleKey`; a key seeds the global random generators (what the
    transforms draw from) first, so a sample's random augmentation depends only on its key, not on which loader
    worker reads it or what that worker read before.
    """

    def __init__(self, samples: Sequence[tuple[str, int]]) -> None:
        self.samples = list(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | SampleKey) -> Any:
        path, target = self.samples[key.index if isinstance(key, SampleKey) else key]
        if isinstance(key, SampleKey):
            seed_everything_from(key.seed)
        try:
            return self.load(path, target)
        except self.read_errors() as error:
            return Unreadable(path, f"{type(error).__name__}: {error}")

    def load(self, path: str, target: int) -> Any:
        """The loaded sample of the file (or folder) ``path``, a named tuple (input, target, path, ...)."""
        raise NotImplementedError

    def read_errors(self) -> tuple[type[Exception], ...]:
        """The exceptions that mean the file cannot be read: its sample comes back :class:`Unreadable`."""
        raise NotImplementedError
