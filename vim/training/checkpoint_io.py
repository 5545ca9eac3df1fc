"""Lightning checkpoints written atomically (:func:`vim.files.atomic_write`): a crash while saving never leaves a
truncated ``last.ckpt``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from vim.files import atomic_write


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through :func:`~vim.files.atomic_write`."""

    def write(tmp: Path) -> None:
        with tmp.open("wb") as file:
            torch.save(obj, file)

    atomic_write(path, write)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO (local paths) that saves through :func:`atomic_torch_save`."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"AtomicCheckpointIO.save_checkpoint takes no storage_options, got {storage_options!r}")
        atomic_torch_save(checkpoint, path)
