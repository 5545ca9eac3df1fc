"""Lightning checkpoints written atomically (:func:`vim.files.atomic_write`): a crash while saving never leaves a
truncated ``last.ckpt``; and read, from a path or a URL, by :func:`vim.models.checkpoint.read_checkpoint`, so no pickled
code runs (Lightning's own loader unpickles anything from a URL)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from vim.files import atomic_write
from vim.models.checkpoint import read_checkpoint


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through :func:`~vim.files.atomic_write`."""

    def write(tmp: Path) -> None:
        with tmp.open("wb") as file:
            torch.save(obj, file)

    atomic_write(path, write)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO that saves local paths through :func:`atomic_torch_save` and loads local paths and URLs
    through :func:`~vim.models.checkpoint.read_checkpoint`."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"AtomicCheckpointIO.save_checkpoint takes no storage_options, got {storage_options!r}")
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(
        self, path: str | os.PathLike, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """The checkpoint at ``path`` (a file or a URL), read without executing pickled code.

        ``weights_only`` is ignored: Lightning passes None, which its loader takes as False for a URL; a checkpoint that
        needs more than :data:`~vim.models.checkpoint.SAFE_GLOBALS` is refused with
        :class:`~vim.models.checkpoint.CheckpointError` whatever is asked.
        """
        return read_checkpoint(path, map_location="cpu" if map_location is None else map_location)
