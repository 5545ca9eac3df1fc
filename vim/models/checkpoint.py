"""Official Vision Mamba checkpoints: safe loading and mapping onto our models.

API::

    state_dict = load_official_checkpoint("vim_t_midclstok_76p1acc.pth")    # or a .safetensors file
    state_dict = checkpoint_filter_fn(state_dict, model)                    # timm's pretrained_filter_fn

The released Vim files are training checkpoints: the weights sit under ``"model"`` (and
``"model_ema"`` when EMA was on) next to optimizer/scheduler state and an ``argparse.Namespace``
of the run's arguments. They are read with ``torch.load(weights_only=True)``, allowing only
:data:`SAFE_GLOBALS`, so no pickled code runs. Our parameter names equal the official ones, so the
filter only unwraps the weights, strips a DDP ``module.`` prefix, resamples ``pos_embed`` to the
model's token grid and checks the shapes.
"""

from __future__ import annotations

import argparse
import math
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .pos_embed import resample_middle_token_pos_embed

__all__ = ["SAFE_GLOBALS", "checkpoint_filter_fn", "load_official_checkpoint", "unwrap_state_dict"]

SAFE_GLOBALS: list = [argparse.Namespace]
"""Non-tensor types a released checkpoint may hold that ``torch.load(weights_only=True)`` accepts."""

CLASSIFIER_KEYS = ("head.weight", "head.bias")
"""Keys whose shapes follow ``num_classes``: timm's loader drops them when the class count differs."""


def unwrap_state_dict(checkpoint: Mapping, use_ema: bool = True) -> dict[str, torch.Tensor]:
    """The model weights of a training checkpoint, keys without a DDP ``module.`` prefix.

    Args:
        checkpoint: a state dict, or a dict holding one under ``"model_ema"``, ``"model"`` or ``"state_dict"``.
        use_ema: take ``"model_ema"`` when the checkpoint has it.
    """
    for key in (("model_ema",) if use_ema else ()) + ("model", "state_dict"):
        if isinstance(checkpoint.get(key), Mapping):
            checkpoint = checkpoint[key]
            break
    return {name.removeprefix("module."): value for name, value in checkpoint.items()}


def load_official_checkpoint(path: str | Path, use_ema: bool = True) -> dict[str, torch.Tensor]:
    """Read a released Vim ``.pth`` (or a ``.safetensors`` file) without executing pickled code.

    Args:
        path: the checkpoint file.
        use_ema: take the EMA weights when the checkpoint has them.

    Returns:
        The model's state dict (official parameter names).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file holds pickled objects outside :data:`SAFE_GLOBALS`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return unwrap_state_dict(load_file(path), use_ema)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"checkpoint {str(path)!r} holds objects that torch.load(weights_only=True) refuses: {error}\n"
            "If you trust the file, allow their types with torch.serialization.add_safe_globals([...]) "
            "(or append them to vim.models.checkpoint.SAFE_GLOBALS), or re-save only its weights."
        ) from error
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"checkpoint {str(path)!r} holds a {type(checkpoint).__name__}, expected a dict of tensors")
    return unwrap_state_dict(checkpoint, use_ema)


def _square_grid(num_patches: int, key: str) -> tuple[int, int]:
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f"checkpoint key {key!r}: {num_patches} patch positions do not form a square grid")
    return side, side


def checkpoint_filter_fn(state_dict: Mapping, model: nn.Module) -> dict[str, torch.Tensor]:
    """Map an official Vim state dict (or a whole training checkpoint) onto ``model``.

    ``pos_embed`` is resampled to the model's token grid when the image size or stride differs
    (the checkpoint's grid is taken to be square).

    Raises:
        ValueError: naming the key and both shapes, when a tensor cannot fit the model. The
            classifier and the patch embedding's input channels are left to timm's loader, which
            adapts them to ``num_classes`` / ``in_chans``.
    """
    state_dict = unwrap_state_dict(state_dict)
    expected = model.state_dict()
    out = {}
    for key, value in state_dict.items():
        if key == "pos_embed" and key in expected and value.shape != expected[key].shape:
            value = resample_middle_token_pos_embed(
                value, new_size=model.patch_embed.grid_size, old_size=_square_grid(value.shape[1] - 1, key)
            )
        out[key] = checked(key, value, expected)
    return out


def checked(key: str, value: torch.Tensor, expected: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``value`` for ``key`` once it fits the model's ``expected`` state dict (keys the model lacks pass).

    Raises:
        ValueError: naming the key and both shapes. The classifier is left to timm's loader, which drops or
            adapts it for another ``num_classes``; so are a 2-D patch kernel's input channels.
    """
    if key in expected and key not in CLASSIFIER_KEYS and not _fits(key, value, expected[key]):
        raise ValueError(f"checkpoint key {key!r} has shape {tuple(value.shape)}, the model expects {tuple(expected[key].shape)}")
    return value


def _fits(key: str, value: torch.Tensor, target: torch.Tensor) -> bool:
    if key == "patch_embed.proj.weight" and value.dim() == target.dim() == 4:
        # in_chans may differ: timm's loader adapts the input channels afterwards
        return value.shape[0] == target.shape[0] and value.shape[2:] == target.shape[2:]
    return value.shape == target.shape
