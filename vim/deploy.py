"""Deploy vim backbones: ONNX models, ``torch.export`` programs and AOTInductor packages, for images, video and points.

API::

    from vim.deploy import load_model, export_onnx, export_program, export_aoti

    model = load_model("vim_tiny_patch16_224", checkpoint="vim_t_midclstok_76p1acc.pth", img_size=512)
    export_onnx(model, "vim_t.onnx")            # input "images" (batch, 3, 512, 512), output "logits"; batch dynamic
    program = export_program(model)             # torch.export; each block's scan stays one vim::selective_scan_fwd node
    export_aoti(model, "vim_t.pt2")             # AOTInductor package that runs without vim installed

    session = onnxruntime.InferenceSession("vim_t.onnx")
    logits = session.run(None, {"images": images.numpy()})[0]
    runner = torch._inductor.aoti_load_package("vim_t.pt2")
    logits = runner(images)

Command line: ``vimkit export --format onnx|torch_export|aoti --model NAME [--ckpt FILE] --out FILE`` (see
:mod:`vim.training.export`).

Families (:data:`FAMILIES`): :class:`~vim.models.VisionMamba` takes images ``(B, C, H, W)``,
:class:`~vim.models.video_mamba.VideoMamba` clips ``(B, C, T, H, W)`` and
:class:`~vim.models.point_mamba.PointMamba` clouds ``(B, N, 3)``. Every export has a fixed input size
(the model's nominal one unless ``input_size`` says otherwise) and a dynamic batch axis. A model keeps its
classifier (output ``logits``) or, loaded with ``head=False``, outputs its pooled pre-logits features
(``features``, timm's ``num_classes=0``).

How the selective scan is exported:

* ONNX: the ``vim::selective_scan_fwd`` op is replaced by
  :func:`vim.kernels.scan_decomposition.decomposed_scan_forward`, standard ops around one ONNX ``Scan``
  loop per block, and the fused conv + SiLU (``vim::conv1d_silu_fwd``) and add + norm
  (``vim::add_norm_fwd``) ops by their PyTorch references (:data:`VIM_OP_DECOMPOSITIONS`), so the file
  uses the default ONNX domain only. PointMamba's tokenizer is part of the
  same graph: farthest point sampling is unrolled over its G centres, the kNN distances are written as
  differences (ONNX has no ``cdist``) and the space-filling-curve sort is ONNX ``TopK``, whose ties keep
  index order as ``argsort(stable=True)`` does.
* ``torch.export``: the scan op stays one node per block (as do the fused conv + SiLU and add + norm
  ops); running or loading the program needs ``import vim`` (which registers the ops) in that process.
* AOTInductor: by default vim's ops are decomposed as for ONNX (Inductor lowers the scan loop to a
  ``while_loop`` in the generated C++), so the package loads and runs in a process that never imports
  vim. With ``keep_vim_ops=True`` the package calls the ops instead, with vim's fast kernels: PyTorch
  then serializes them as calls through its dispatcher, which finds a ``torch.library.custom_op`` only
  after ``import vim`` in a Python process (loading fails otherwise, and such a package cannot run
  from C++ alone).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from tqdm import tqdm

from vim.files import atomic_write
from vim.kernels import add_norm_ref, causal_conv1d_silu_ref
from vim.kernels.scan_decomposition import decomposed_scan_forward
from vim.models import loading
from vim.models.backbone import MambaBackbone
from vim.models.point_mamba import PointMamba, PointMambaScan
from vim.models.video_mamba import VideoMamba
from vim.models.vision_mamba import VisionMamba

__all__ = [
    "FAMILIES",
    "MODEL_FORMATS",
    "ONNX_OPSETS",
    "VIM_OP_DECOMPOSITIONS",
    "add_export_arguments",
    "decompose_scan",
    "export_aoti",
    "export_from_arguments",
    "export_model",
    "export_onnx",
    "export_program",
    "family_of",
    "load_model",
    "nominal_input_size",
    "save_program",
    "set_input_size",
]

ONNX_OPSETS = range(18, 24)
"""Opsets of the default ONNX domain that torch's exporter writes natively (it converts to others, not always successfully)."""

DEFAULT_OPSET = 20
MODEL_FORMATS = ("onnx", "torch_export", "aoti")
EXAMPLE_BATCH = 2
"""Batch size of the example input traced by torch.export (a batch of 1 would be specialised, not kept dynamic)."""

SCAN_OP = torch.ops.vim.selective_scan_fwd.default


def _conv_silu_in_standard_ops(x, weight, bias, weight_b, bias_b, backend: str) -> torch.Tensor:
    """``vim::conv1d_silu_fwd`` (each block's fused conv + SiLU) as ``F.conv1d`` + SiLU: (K, B, L, C)."""
    return causal_conv1d_silu_ref(x, weight, bias, weight_b, bias_b).contiguous()


def _add_norm_in_standard_ops(hidden, residual, weight, bias, eps: float, is_rms: bool):
    """``vim::add_norm_fwd`` (a block's fused residual add + norm, in graphs exported on CUDA) as PyTorch ops."""
    return add_norm_ref(hidden, residual, weight, bias, eps, "rms" if is_rms else "layer")


VIM_OP_DECOMPOSITIONS: dict[Any, Callable] = {
    SCAN_OP: decomposed_scan_forward,
    torch.ops.vim.conv1d_silu_fwd.default: _conv_silu_in_standard_ops,
    torch.ops.vim.add_norm_fwd.default: _add_norm_in_standard_ops,
}
"""vim's custom ops (the kernels' inference forwards) in standard ops: what ONNX and a vim-free AOTI package run."""


# ---------------------------------------------------------------------------------------------- families
@dataclass(frozen=True)
class Family:
    """What one kind of backbone takes.

    Args:
        name: "images", "video" or "points" (also the name of the ONNX input).
        model_type: the backbone class.
        sample_shape: ``model -> (C, H, W)``, ``(C, T, H, W)`` or ``(N, 3)``: the nominal input of one sample.
    """

    name: str
    model_type: type[nn.Module]
    sample_shape: Callable[[Any], tuple[int, ...]]


def _num_points(model: PointMamba) -> int:
    """The cloud size of the model's pretrained config (``input_size[-1]``), at least ``min_points``."""
    input_size = getattr(model, "pretrained_cfg", {}).get("input_size")
    return max(input_size[-1] if input_size else 0, model.min_points)


FAMILIES = (
    Family("images", VisionMamba, lambda m: (m.in_chans, *m.patch_embed.img_size)),
    Family("video", VideoMamba, lambda m: (m.in_chans, m.patch_embed.num_frames, *m.patch_embed.img_size)),
    Family("points", PointMamba, lambda m: (_num_points(m), 3)),
)


NOT_EXPORTABLE: dict[type[nn.Module], str] = {
    PointMambaScan: (
        "its serialisation takes the space-filling curve's depth from each cloud's extent, as upstream PointMamba "
        "does: a size that depends on the data, which torch.export (and so ONNX and AOTInductor) cannot trace. "
        "Run it in PyTorch, or export a pointmamba_small model"
    ),
}
"""Backbones that cannot be exported yet, with the reason."""


def family_of(model: nn.Module) -> Family:
    """The :class:`Family` of ``model``; ValueError saying why for any other model."""
    for model_type, reason in NOT_EXPORTABLE.items():
        if isinstance(model, model_type):
            raise ValueError(f"cannot export a {type(model).__name__}: {reason}")
    for family in FAMILIES:
        if isinstance(model, family.model_type):
            return family
    known = ", ".join(f.model_type.__name__ for f in FAMILIES)
    raise ValueError(
        f"cannot export a {type(model).__name__}: vim.deploy knows the inputs of {known} backbones only "
        "(a features_only wrapper or another timm model has no input size and output that it knows)"
    )


def backbone_of(model: nn.Module) -> MambaBackbone:
    """``model``, once :func:`family_of` knows it (ValueError otherwise)."""
    family_of(model)
    return cast(MambaBackbone, model)


def nominal_input_size(model: nn.Module) -> tuple[int, ...]:
    """The model's nominal input for one sample: (C, H, W), (C, T, H, W) or (N, 3)."""
    return tuple(family_of(model).sample_shape(model))


# ---------------------------------------------------------------------------------------------- models
def load_model(
    name: str | None = None,
    checkpoint: str | os.PathLike | None = None,
    pretrained: bool = False,
    head: bool = True,
    num_classes: int | None = None,
    img_size: int | tuple[int, int] | None = None,
    num_frames: int | None = None,
    use_ema: bool = True,
    **model_kwargs: Any,
) -> MambaBackbone:
    """A registered backbone with its weights (:func:`vim.models.loading.load_model`), in eval mode, ready to export.

    Args:
        name: timm model name, with a pretrained tag for ``pretrained`` (e.g. ``vim_tiny_patch16_224.in1k``);
            may be left out with a Lightning checkpoint, which records it.
        checkpoint: a Lightning ``.ckpt`` of a vim Classifier (its model settings, class count and (EMA)
            weights), or a weights file (``.safetensors`` from ``vimkit export``, an official ``.pth``) loaded
            through timm's pretrained path (position embeddings resampled, shapes checked).
        pretrained: load the timm tag's weights (timm downloads them).
        head: keep the classifier; False: the model outputs its pooled pre-logits features.
        num_classes: size of the classifier in a weights file (default: the model's default).
        img_size: frame size to export at; the position embeddings are resampled (images and video).
        num_frames: clip length to export at (video).
        use_ema: take a Lightning checkpoint's EMA weights when it has them.
        model_kwargs: more ``timm.create_model`` arguments.
    """
    loaded = loading.load_model(
        name, checkpoint, pretrained=pretrained, num_classes=num_classes, head=head, use_ema=use_ema, argument="checkpoint",
        **model_kwargs,
    )  # fmt: skip
    model = backbone_of(loaded.model)
    trained_points = loaded.checkpoint.data_settings.get("num_points") if loaded.checkpoint is not None else None
    if isinstance(model, PointMamba) and trained_points:  # the cloud size the run trained and validated on
        model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, 1, trained_points)}
    set_input_size(model, img_size, num_frames)
    return model.eval()


def set_input_size(model: nn.Module, img_size: int | tuple[int, int] | None = None, num_frames: int | None = None) -> None:
    """Change the nominal frame size (images, video) and clip length (video), resampling the position embeddings."""
    family = family_of(model)
    if num_frames is not None and family.name != "video":
        raise ValueError(f"num_frames={num_frames}: a {type(model).__name__} takes no clips")
    if img_size is not None and family.name == "points":
        raise ValueError(f"img_size={img_size}: a {type(model).__name__} takes point clouds; give their size as num_points")
    if isinstance(model, VideoMamba) and (img_size is not None or num_frames is not None):
        model.set_input_size(num_frames=num_frames, img_size=img_size)
    elif isinstance(model, VisionMamba) and img_size is not None:
        model.set_input_size(img_size=img_size)


# ---------------------------------------------------------------------------------------------- torch.export
def example_input(model: nn.Module, input_size: tuple[int, ...] | None = None) -> torch.Tensor:
    """A random batch of :data:`EXAMPLE_BATCH` inputs of ``input_size`` (default: nominal), checked to run through ``model``.

    Raises:
        ValueError: naming the model, the size and the model's complaint, if it cannot take that size.
    """
    family = family_of(model)
    shape = tuple(input_size) if input_size is not None else nominal_input_size(model)
    parameter = next(model.parameters())
    example = torch.randn(EXAMPLE_BATCH, *shape, generator=torch.Generator().manual_seed(0)).to(parameter)
    try:
        with torch.no_grad():
            model(example)
    except (ValueError, RuntimeError) as error:
        raise ValueError(
            f"input size {shape} does not fit {type(model).__name__} (it takes {family.name} of nominal size "
            f"{nominal_input_size(model)}): {error}"
        ) from error
    return example


def export_program(model: nn.Module, input_size: tuple[int, ...] | None = None) -> torch.export.ExportedProgram:
    """``torch.export`` of ``model`` (put in eval mode) for inputs (batch, *input_size) with a dynamic batch axis.

    Each Mamba block's scan stays one ``vim::selective_scan_fwd`` node (its backend chosen for the
    model's device when exporting). Save it with :func:`save_program`; load it with
    ``torch.export.load`` after ``import vim``.
    """
    model.eval()
    example = example_input(model, input_size)
    batch = torch.export.Dim("batch", min=1)
    return torch.export.export(model, (example,), dynamic_shapes=({0: batch},))


def decompose_scan(
    program: torch.export.ExportedProgram, extra: dict[Any, Callable] | None = None
) -> torch.export.ExportedProgram:
    """``program`` in core ATen ops, vim's custom ops replaced by standard ops (the scan by a scan loop)."""
    table = torch.export.default_decompositions()
    table.update(VIM_OP_DECOMPOSITIONS)
    table.update(extra or {})
    return program.run_decompositions(table)


def save_program(model: nn.Module, path: str | os.PathLike, input_size: tuple[int, ...] | None = None) -> Path:
    """Write :func:`export_program` of ``model`` to ``path`` (``.pt2``), atomically. Returns ``path``."""
    path = _checked_path(path, ".pt2")
    program = export_program(model, input_size)

    def save_into(tmp: Path) -> None:
        with tmp.open("wb") as file:  # a file object: torch.export.save expects a path to end in .pt2
            torch.export.save(program, file)

    atomic_write(path, save_into)
    return path


# ---------------------------------------------------------------------------------------------- ONNX
def _euclidean_cdist(x1: torch.Tensor, x2: torch.Tensor, p: float, compute_mode: int | None = None) -> torch.Tensor:
    """``aten._cdist_forward`` for p = 2 as differences: (B, P, 3), (B, R, 3) -> (B, P, R) distances."""
    if p != 2:
        raise ValueError(f"cdist with p={p} has no ONNX form here (only p=2)")
    return (x1.unsqueeze(-2) - x2.unsqueeze(-3)).square().sum(-1).sqrt()


def _sort_by_topk(x: torch.Tensor, *, stable: bool | None = None, dim: int = -1, descending: bool = False):
    """``aten.sort.stable`` as a full ``topk``: ONNX TopK breaks ties by the lower index, i.e. it is stable."""
    return torch.topk(x, x.shape[dim], dim=dim, largest=descending, sorted=True)


ONNX_DECOMPOSITIONS: dict[Any, Callable] = {
    torch.ops.aten._cdist_forward.default: _euclidean_cdist,
    torch.ops.aten.sort.stable: _sort_by_topk,
}
"""Ops the ONNX exporter has no translation for (PointMamba's tokenizer uses them), in ops it has."""


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    input_size: tuple[int, ...] | None = None,
    opset: int = DEFAULT_OPSET,
    progress: bool = True,
) -> Path:
    """Write ``model`` as an ONNX file (default domain only; weights inside), atomically. Returns ``path``.

    The graph takes one input named after the family (``images``, ``video`` or ``points``) of shape
    (batch, *input_size), batch dynamic, and gives ``logits`` (a model with a classifier) or ``features``.
    The metadata records the model name and its preprocessing (``mean``, ``std``).

    Args:
        model: a backbone of :data:`FAMILIES` (put in eval mode).
        path: the ``.onnx`` file.
        input_size: one sample's input shape; default :func:`nominal_input_size`.
        opset: ONNX opset, in :data:`ONNX_OPSETS`.
        progress: show a progress bar over the export's stages.
    """
    path = _checked_path(path, ".onnx")
    _require_onnx_exporter()
    if opset not in ONNX_OPSETS:
        raise ValueError(
            f"opset={opset} is not supported: the exporter writes opsets {ONNX_OPSETS.start}..{ONNX_OPSETS.stop - 1}"
        )
    family = family_of(model)
    with tqdm(total=3, desc=f"ONNX {path.name}", disable=not progress) as bar:
        bar.set_postfix_str("torch.export")
        program = export_program(model, input_size)
        bar.update()
        bar.set_postfix_str("decompose the scan")
        program = decompose_scan(program, ONNX_DECOMPOSITIONS)
        bar.update()
        bar.set_postfix_str("translate to ONNX")
        has_head = not isinstance(backbone_of(model).get_classifier(), nn.Identity)
        onnx_program = torch.onnx.export(
            program,
            (program.example_inputs[0][0],),
            input_names=[family.name],
            output_names=["logits" if has_head else "features"],
            dynamic_shapes=({0: "batch"},),
            opset_version=opset,
            dynamo=True,
            verbose=False,
        )
        assert onnx_program is not None  # None comes from the legacy exporter only (dynamo=False)
        onnx_program.model.metadata_props.update(_onnx_metadata(model))
        atomic_write(path, lambda tmp: onnx_program.save(tmp, external_data=False))
        bar.update()
    return path


def _require_onnx_exporter() -> None:
    """ImportError naming the extra to install when torch's ONNX exporter lacks its packages."""
    import importlib.util

    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"ONNX export needs {' and '.join(missing)}: pip install 'vim-toolkit[export]'")


def _onnx_metadata(model: nn.Module) -> dict[str, str]:
    cfg = getattr(model, "pretrained_cfg", {})
    metadata = {"model": cfg.get("architecture", type(model).__name__)}
    metadata.update({key: str(list(cfg[key])) for key in ("mean", "std") if key in cfg})
    return metadata


# ---------------------------------------------------------------------------------------------- AOTInductor
def export_aoti(
    model: nn.Module,
    path: str | os.PathLike,
    input_size: tuple[int, ...] | None = None,
    keep_vim_ops: bool = False,
    progress: bool = True,
) -> Path:
    """Compile ``model`` with AOTInductor into a ``.pt2`` package, atomically (this runs a C++ compiler). Returns ``path``.

    Load it with ``torch._inductor.aoti_load_package(path)``; it takes (batch, *input_size), batch dynamic.

    Args:
        keep_vim_ops: call vim's ops (the scan, conv + SiLU and add + norm: their Triton / native kernels) from the
            package instead of compiling their decompositions; loading the package then needs ``import vim`` first.
    """
    path = _checked_path(path, ".pt2")
    with tqdm(total=2, desc=f"AOTInductor {path.name}", disable=not progress) as bar:
        bar.set_postfix_str("torch.export")
        program = export_program(model, input_size)
        if not keep_vim_ops:
            program = decompose_scan(program)
        bar.update()
        bar.set_postfix_str("compile")

        def compile_into(tmp: Path) -> None:
            with tmp.open("wb+") as file:
                torch._inductor.aoti_compile_and_package(program, package_path=file)

        atomic_write(path, compile_into)
        bar.update()
    return path


def _checked_path(path: str | os.PathLike, suffix: str) -> Path:
    path = Path(path)
    if path.suffix != suffix:
        raise ValueError(f"output file '{path}' must end in {suffix}")
    return path


# ---------------------------------------------------------------------------------------------- vimkit export
def export_model(
    format: str,
    out: str | os.PathLike,
    name: str | None = None,
    checkpoint: str | os.PathLike | None = None,
    pretrained: bool = False,
    head: bool = True,
    num_classes: int | None = None,
    img_size: int | tuple[int, int] | None = None,
    num_frames: int | None = None,
    num_points: int | None = None,
    opset: int = DEFAULT_OPSET,
    keep_vim_ops: bool = False,
    use_ema: bool = True,
    progress: bool = True,
) -> Path:
    """:func:`load_model` then write it in ``format`` ("onnx", "torch_export" or "aoti") to ``out``; what ``vimkit export`` runs.

    ``num_points`` is the cloud size of a point model's input (default: its pretrained config's); the other
    arguments are those of :func:`load_model`, :func:`export_onnx` and :func:`export_aoti`. Returns ``out``.
    """
    if format not in MODEL_FORMATS:
        raise ValueError(f"format must be one of {MODEL_FORMATS}, got {format!r}")
    model = load_model(name, checkpoint, pretrained, head, num_classes, img_size, num_frames, use_ema)
    input_size = None
    if num_points is not None:
        if family_of(model).name != "points":
            raise ValueError(f"num_points={num_points}: a {type(model).__name__} takes no point clouds")
        input_size = (num_points, 3)
    if format == "onnx":
        return export_onnx(model, out, input_size, opset=opset, progress=progress)
    if format == "aoti":
        return export_aoti(model, out, input_size, keep_vim_ops=keep_vim_ops, progress=progress)
    return save_program(model, out, input_size)


def add_export_arguments(parser: argparse.ArgumentParser) -> list[str]:
    """The options of ``vimkit export`` for the model formats (:func:`export_model`'s arguments); returns their
    destinations (a weights-only format takes none of them)."""
    group = parser.add_argument_group("model formats (onnx, torch_export, aoti)")
    group.add_argument("--model", help="timm model name; default: the one a Lightning --ckpt records")
    group.add_argument("--pretrained", action="store_true", help="load the timm tag's weights (e.g. vim_tiny_patch16_224.in1k)")
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
    return [action.dest for action in group._group_actions]


def export_from_arguments(format: str, args: argparse.Namespace) -> Path:
    """:func:`export_model` with the options of :func:`add_export_arguments` (and ``--ckpt``, ``--out``, ``--no-ema``)."""
    img_size = tuple(args.img_size) if args.img_size and len(args.img_size) > 1 else (args.img_size or [None])[0]
    return export_model(
        format, args.out, args.model, args.ckpt, args.pretrained, not args.no_head, args.num_classes,
        img_size, args.num_frames, args.num_points, args.opset, args.keep_vim_ops, not args.no_ema,
    )  # fmt: skip
