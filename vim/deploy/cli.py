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

In Python, :func:`export_model` does what a model format does::

    export_model("onnx", "clips.onnx", ModelSource(checkpoint="last.ckpt", head=False), ExportOptions(opset=18))
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from .aoti import export_aoti
from .model import load_model, set_input_size
from .onnx import DEFAULT_OPSET, ONNX_OPSETS, export_onnx
from .program import save_program
from .safetensors import export_safetensors

__all__ = [
    "FORMATS",
    "MODEL_FORMATS",
    "ExportOptions",
    "ModelSource",
    "add_export_arguments",
    "export_from_arguments",
    "export_model",
    "main",
]

MODEL_FORMATS = ("onnx", "torch_export", "aoti")
FORMATS = ("safetensors", *MODEL_FORMATS)
FORMAT_OF_SUFFIX = {".safetensors": "safetensors", ".onnx": "onnx"}


@dataclass(frozen=True)
class ModelSource:
    """The model to export and its weights (the arguments of :func:`~vim.deploy.model.load_model`).

    Attributes:
        name: timm model name; None with a Lightning checkpoint, which records it.
        checkpoint: a Lightning ``.ckpt`` or a weights file (``.safetensors``, ``.pth``); None: random or ``pretrained``.
        pretrained: the timm tag's released weights.
        head: keep the classifier; False: the model outputs its pooled pre-logits features.
        num_classes: the classifier size of a weights file (default: the model's).
        use_ema: take a Lightning checkpoint's EMA weights when it has them.
    """

    name: str | None = None
    checkpoint: str | os.PathLike | None = None
    pretrained: bool = False
    head: bool = True
    num_classes: int | None = None
    use_ema: bool = True


@dataclass(frozen=True)
class ExportOptions:
    """The exported input's size (None: the model's nominal one) and the formats' options.

    Attributes:
        img_size: frame size, one value or (H, W) (images, video).
        num_frames: clip length (video).
        num_points: points per cloud (points; default: the cloud size a run trained on, else the pretrained config's).
        opset: ONNX opset, in :data:`~vim.deploy.onnx.ONNX_OPSETS`.
        keep_vim_ops: aoti: call vim's ops and kernels instead of compiling their decompositions.
        half: onnx: float16 weights and arithmetic inside, float32 input and output.
        progress: show a progress bar (onnx, aoti).
    """

    img_size: int | tuple[int, int] | None = None
    num_frames: int | None = None
    num_points: int | None = None
    opset: int = DEFAULT_OPSET
    keep_vim_ops: bool = False
    half: bool = False
    progress: bool = True


def export_model(format: str, out: str | os.PathLike, source: ModelSource, options: ExportOptions | None = None) -> Path:
    """Load ``source``, size it as ``options`` say and write it in ``format`` ("onnx", "torch_export" or "aoti") to
    ``out``; what ``vimkit export`` runs for a model format. Returns ``out``.

    Raises:
        ValueError: an unknown format, a size the model's family does not take, or what loading and exporting raise.
    """
    if format not in MODEL_FORMATS:
        raise ValueError(f"format must be one of {MODEL_FORMATS}, got {format!r}")
    options = options or ExportOptions()
    model = load_model(source.name, source.checkpoint, source.pretrained, source.head, source.num_classes, use_ema=source.use_ema)
    set_input_size(model, options.img_size, options.num_frames, options.num_points)
    if format == "onnx":
        return export_onnx(model, out, opset=options.opset, progress=options.progress, half=options.half)
    if format == "aoti":
        return export_aoti(model, out, keep_vim_ops=options.keep_vim_ops, progress=options.progress)
    return save_program(model, out)


def add_export_arguments(parser: argparse.ArgumentParser) -> list[str]:
    """The options of ``vimkit export`` for the model formats (:class:`ModelSource` and :class:`ExportOptions`); returns
    their destinations (a weights-only format takes none of them)."""
    group = parser.add_argument_group("model formats (onnx, torch_export, aoti)")
    group.add_argument("--model", help="timm model name; default: the one a Lightning --ckpt records")
    group.add_argument("--pretrained", action="store_true", help="load the timm tag's weights (e.g. vim_tiny_patch16_224.in1k)")
    group.add_argument(
        "--random-weights", action="store_true", help="export --model with random initial weights (no --ckpt or --pretrained)"
    )
    group.add_argument("--num-classes", type=int, help="classifier size of a weights file (default: the model's)")
    group.add_argument("--no-head", action="store_true", help="output the pooled pre-logits features instead of logits")
    group.add_argument("--img-size", type=int, nargs="+", metavar="PX", help="frame size: one value or H W (images, video)")
    group.add_argument("--num-frames", type=int, help="clip length (video)")
    group.add_argument("--num-points", type=int, help="points per cloud (points)")
    group.add_argument(
        "--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset, {ONNX_OPSETS.start}..{ONNX_OPSETS.stop - 1}"
    )
    group.add_argument(
        "--keep-vim-ops",
        action="store_true",
        help="aoti: call vim's ops and kernels (loading then needs `import vim`) instead of compiling them",
    )
    group.add_argument(
        "--half", action="store_true", help="onnx: float16 weights and arithmetic inside (input and output float32)"
    )
    return [action.dest for action in group._group_actions]


def export_from_arguments(format: str, args: argparse.Namespace) -> Path:
    """:func:`export_model` with the options of :func:`add_export_arguments` (and ``--ckpt``, ``--out``, ``--no-ema``)."""
    img_size = tuple(args.img_size) if args.img_size and len(args.img_size) > 1 else (args.img_size or [None])[0]
    source = ModelSource(args.model, args.ckpt, args.pretrained, not args.no_head, args.num_classes, not args.no_ema)
    options = ExportOptions(img_size, args.num_frames, args.num_points, args.opset, args.keep_vim_ops, args.half)
    return export_model(format, args.out, source, options)


def command_parser() -> tuple[argparse.ArgumentParser, list[str]]:
    """The argument parser of ``vimkit export`` and the destinations of its model-format options."""
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
    model_options = add_export_arguments(parser)
    return parser, model_options


def main(argv: list[str] | None = None) -> None:
    """``vimkit export [--format F] --ckpt CKPT --out FILE [--no-ema]``; the model formats take ``--model`` and more."""
    parser, model_options = command_parser()
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
        weights = [flag for flag, given in (("--ckpt", args.ckpt), ("--pretrained", args.pretrained)) if given]
        if not weights and not args.random_weights:
            parser.error(
                "no weights: give --ckpt FILE (a Lightning checkpoint or a weights file), --pretrained (the tag's "
                "released weights) or --random-weights (random initial weights, e.g. to try the export)"
            )
        if weights and args.random_weights:
            parser.error(f"--random-weights and {' and '.join(weights)} both choose the weights: give one")
        path = export_from_arguments(format, args)
    print(f"Wrote {path}")
