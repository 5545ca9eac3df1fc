"""Export trained weights from a Lightning checkpoint as a ``.safetensors`` file that timm loads.

``vim export --ckpt runs/quickstart/latest/checkpoints/last.ckpt --out digits_vim.safetensors`` writes the EMA
weights (the trained weights with ``--no-ema`` or when the run had no EMA) under timm's own key names,
so the file loads with::

    timm.create_model(name, pretrained=True, num_classes=10,
                      pretrained_cfg_overlay=dict(file="digits_vim.safetensors", num_classes=10))

(plus the ``model_kwargs`` / ``img_size`` the run used; give ``num_classes`` in the overlay too, else timm
drops a classifier head whose size differs from the model's default). The model name and class names are kept in the
file's metadata.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from vim.files import atomic_write, check_weights_file

MODEL_PREFIX = "model."
EMA_PREFIX = "ema.module."


def checkpoint_weights(checkpoint: dict, use_ema: bool = True) -> dict[str, torch.Tensor]:
    """The backbone's state dict (timm key names) from a :class:`~vim.training.classifier.Classifier` checkpoint."""
    state = checkpoint["state_dict"]
    has_ema = any(key.startswith(EMA_PREFIX) for key in state)
    prefix = EMA_PREFIX if use_ema and has_ema else MODEL_PREFIX
    weights = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
    if not weights:
        raise ValueError(f"checkpoint has no '{MODEL_PREFIX}*' weights: not a vim Classifier checkpoint")
    return weights


def export_safetensors(ckpt: str | os.PathLike, out: str | os.PathLike, use_ema: bool = True) -> Path:
    """Write the (EMA) weights of checkpoint ``ckpt`` to ``out`` (``.safetensors``), atomically. Returns ``out``."""
    ckpt, out = check_weights_file(ckpt, "--ckpt"), Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out: '{out}' must end in .safetensors (timm picks the loader by extension)")
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    weights = {key: value.detach().contiguous().clone() for key, value in checkpoint_weights(checkpoint, use_ema).items()}
    metadata = {
        "model": str(checkpoint.get("hyper_parameters", {}).get("model", "")),
        "class_names": json.dumps(checkpoint.get("class_names", [])),
    }
    atomic_write(out, lambda tmp: save_file(weights, str(tmp), metadata=metadata))
    return out


def main(argv: list[str] | None = None) -> None:
    """``vim export --ckpt CKPT --out FILE.safetensors [--no-ema]``."""
    parser = argparse.ArgumentParser(prog="vim export", description="Export trained (EMA) weights as .safetensors for timm.")
    parser.add_argument("--ckpt", required=True, help="Lightning checkpoint, e.g. runs/quickstart/latest/checkpoints/last.ckpt")
    parser.add_argument("--out", required=True, help="output .safetensors file")
    parser.add_argument("--no-ema", action="store_true", help="export the trained weights instead of the EMA weights")
    args = parser.parse_args(argv)
    path = export_safetensors(args.ckpt, args.out, use_ema=not args.no_ema)
    print(f"Wrote {path}")
