"""Checkpoint files: written atomically (a crash while saving never leaves a truncated ``last.ckpt``, export or feature
shard), and checked before reading (a missing or empty file is named)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Replace ``path`` all at once: ``write(tmp)`` fills a temporary file beside it, which is fsynced and then
    ``os.replace``-d into place.

    ``os.replace`` is atomic on one filesystem, so ``path`` holds either its previous content or the complete
    new one; the temporary file is removed if writing fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as file:
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_weights_file(path: str | os.PathLike, argument: str) -> Path:
    """``path`` once it names a file with content; ValueError naming ``argument`` and the file otherwise (a missing or
    zero-byte file would otherwise end in torch.load's FileNotFoundError or bare ``EOFError: Ran out of input``)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{argument}: '{path}' does not exist or is not a file")
    if path.stat().st_size == 0:
        raise ValueError(f"{argument}: '{path}' is empty (0 bytes), e.g. an interrupted download or copy")
    return path


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through :func:`atomic_write`."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as file:
            torch.save(obj, file)

    atomic_write(path, write)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO (local paths) that saves through :func:`atomic_torch_save`."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"AtomicCheckpointIO.save_checkpoint takes no storage_options, got {storage_options!r}")
        atomic_torch_save(checkpoint, path)
