"""``vimkit export``: trained weights from a Lightning checkpoint as a ``.safetensors`` file that timm loads, or a whole model.

``vimkit export --ckpt runs/quickstart/latest/checkpoints/last.ckpt --out digits_vim.safetensors`` writes the EMA
weights (the trained weights with ``--no-ema`` or when the run had no EMA) under timm's own key names,
so the file loads with::

    timm.create_model(name, pretrained=True, num_classes=10,
                      pretrained_cfg_overlay=dict(file="digits_vim.safetensors", num_classes=10))

(plus the ``model_kwargs`` / ``img_size`` the run used; give ``num_classes`` in the overlay too, else timm
drops a classifier head whose size differs from the model's default). The model name and class names are kept in the
file's metadata.

``--format onnx|torch_export|aoti`` exports the whole model instead (:mod:`vim.deploy`)::

    vimkit export --ckpt runs/quickstart/checkpoints/last.ckpt --out digits_vim.onnx
    vimkit export --format aoti --model vim_tiny_patch16_224 --ckpt vim_t_midclstok_76p1acc.pth --out vim_t.pt2
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from safetensors.torch import save_file

from vim.files import atomic_write
from vim.models.loading import read_training_checkpoint


def export_safetensors(ckpt: str | os.PathLike, out: str | os.PathLike, use_ema: bool = True) -> Path:
    """Write the (EMA) weights of checkpoint ``ckpt`` to ``out`` (``.safetensors``), atomically. Returns ``out``."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out: '{out}' must end in .safetensors (timm picks the loader by extension)")
    checkpoint = read_training_checkpoint(ckpt, "--ckpt")
    weights = {key: value.detach().contiguous().clone() for key, value in checkpoint.weights(use_ema).items()}
    metadata = {"model": str(checkpoint.model or ""), "class_names": json.dumps(checkpoint.class_names)}
    atomic_write(out, lambda tmp: save_file(weights, str(tmp), metadata=metadata))
    return out


FORMATS = ("safetensors", "onnx", "torch_export", "aoti")
FORMAT_OF_SUFFIX = {".safetensors": "safetensors", ".onnx": "onnx"}


def main(argv: list[str] | None = None) -> None:
    """``vimkit export [--format F] --ckpt CKPT --out FILE [--no-ema]``; the model formats take ``--model`` and more."""
    parser = argparse.ArgumentParser(
        prog="vimkit export",
        description="Export trained (EMA) weights as .safetensors for timm, or a whole model (see vim.deploy) as ONNX, "
        "a torch.export program or an AOTInductor package.",
    )
    parser.add_argument("--format", choices=FORMATS, help="default: from --out (.safetensors, .onnx)")
    parser.add_argument(
        "--ckpt", "--checkpoint", dest="ckpt",
        help="Lightning checkpoint, e.g. runs/quickstart/latest/checkpoints/last.ckpt; model formats also take a weights file",
    )  # fmt: skip
    parser.add_argument("--out", required=True, help="output file: .safetensors, .onnx or .pt2")
    parser.add_argument("--no-ema", action="store_true", help="export the trained weights instead of the EMA weights")
    from vim import deploy

    model_options = deploy.add_export_arguments(parser)
    args = parser.parse_args(argv)
    format = args.format or FORMAT_OF_SUFFIX.get(Path(args.out).suffix)
    if format is None:
        parser.error(f"--format: give one of {', '.join(FORMATS)} for --out '{args.out}'")
    if format == "safetensors":
        if args.ckpt is None:
            parser.error("--ckpt: the safetensors format exports a Lightning checkpoint's weights")
        given = [dest for dest in model_options if getattr(args, dest) != parser.get_default(dest)]
        if given:
            options = ", ".join("--" + dest.replace("_", "-") for dest in given)
            parser.error(f"{options}: the safetensors format writes the checkpoint's weights as they are (model formats only)")
        path = export_safetensors(args.ckpt, args.out, use_ema=not args.no_ema)
    else:
        path = deploy.export_from_arguments(format, args)
    print(f"Wrote {path}")
