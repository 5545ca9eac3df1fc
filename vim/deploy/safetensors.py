"""A ``vimkit fit`` checkpoint's trained (EMA) weights as a ``.safetensors`` file that timm loads."""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors.torch import save_file

from vim.files import atomic_write
from vim.models.loading import read_training_checkpoint

from .program import checked_path

__all__ = ["export_safetensors"]


def export_safetensors(ckpt: str | os.PathLike, out: str | os.PathLike, use_ema: bool = True) -> Path:
    """Write the (EMA) weights of checkpoint ``ckpt`` to ``out`` (``.safetensors``), atomically. Returns ``out``.

    The weights keep timm's key names; the file's metadata holds the model name and the class names.
    """
    out = checked_path(out, ".safetensors", why="timm picks the loader by extension")
    checkpoint = read_training_checkpoint(ckpt, "--ckpt")
    weights = {key: value.detach().contiguous().clone() for key, value in checkpoint.weights(use_ema).items()}
    metadata = {"model": str(checkpoint.model or ""), "class_names": json.dumps(checkpoint.class_names)}
    atomic_write(out, lambda tmp: save_file(weights, str(tmp), metadata=metadata))
    return out
