"""Convert a released checkpoint (.pth of Vim, VideoMamba or PointMamba) to a .safetensors file of its weights.

Usage::

    python tools/convert_checkpoint.py vim_t_midclstok_76p1acc.pth vim_tiny_patch16_224.safetensors \\
        [--model vim_tiny_patch16_224] [--ema]

The .pth is read without executing pickled code (see :func:`vim.models.load_official_checkpoint`);
the weights (``"model"`` or ``"base_model"``, the ones upstream evaluates and publishes accuracies for; with ``--ema``
``"model_ema"`` where the file has it) are
written unchanged, official key names included, so the result loads with
``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=...))``. With
``--model`` every key and shape is checked against that architecture first, after the family's
``checkpoint_filter_fn`` has mapped them (renamed, resampled or inflated).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file
from tqdm import tqdm

import vim.models  # noqa: F401  (registers the models)
from vim.models import load_official_checkpoint
from vim.models.backbone import MambaBackbone


def check_against_model(state_dict: dict[str, torch.Tensor], model_name: str) -> None:
    """Raise ValueError unless ``state_dict``, mapped by the family's filter, has the keys and shapes of ``model_name``."""
    model = timm.create_model(model_name, device="meta")
    if not isinstance(model, MambaBackbone):
        raise ValueError(f"{model_name} is not one of vim's backbones (a {type(model).__name__})")
    mapped = model.checkpoint_filter(state_dict)  # raises on a shape mismatch, naming the key
    expected, found = set(model.state_dict()), set(mapped)
    if expected != found:
        raise ValueError(
            f"the checkpoint does not match {model_name}: missing keys {sorted(expected - found)[:10]}, "
            f"unexpected keys {sorted(found - expected)[:10]}"
        )


def convert(source: Path, target: Path, model_name: str | None = None, use_ema: bool = False) -> int:
    """Write the weights of ``source`` to ``target`` (.safetensors); returns the number of tensors."""
    if target.suffix != ".safetensors":
        raise ValueError(f"the output file must end in .safetensors, got {str(target)!r}")
    state_dict = load_official_checkpoint(source, use_ema=use_ema)
    if model_name is not None:
        check_against_model(state_dict, model_name)
    tensors = {}
    for key, value in tqdm(state_dict.items(), desc=f"converting {source.name}", unit="tensor"):
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"checkpoint entry {key!r} is a {type(value).__name__}, not a tensor")
        tensors[key] = value.detach().contiguous().clone()  # safetensors refuses shared or strided storage
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(target), metadata={"format": "pt", "source": source.name})
    return len(tensors)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="official .pth checkpoint")
    parser.add_argument("target", type=Path, help="output .safetensors file")
    parser.add_argument("--model", help="check the keys and shapes against this registered model first")
    parser.add_argument("--ema", action="store_true", help="take 'model_ema' where the checkpoint has it instead of 'model'")
    args = parser.parse_args(argv)
    try:
        count = convert(args.source, args.target, args.model, use_ema=args.ema)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {count} tensors to {args.target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
