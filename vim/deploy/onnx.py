"""ONNX files of vim's backbones: default domain only, the scan as an ONNX ``Scan`` loop, the preprocessing in the metadata."""

from __future__ import annotations

import importlib.util
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from vim.files import atomic_write

from .model import exportable, output_name
from .program import checked_path, decompose_scan, export_program

__all__ = ["DEFAULT_OPSET", "ONNX_DECOMPOSITIONS", "ONNX_OPSETS", "export_onnx"]

ONNX_OPSETS = range(18, 24)
"""Opsets of the default ONNX domain that torch's exporter writes natively (it converts to others, not always successfully)."""

DEFAULT_OPSET = 20


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
    half: bool = False,
) -> Path:
    """Write ``model`` as an ONNX file (default domain only; weights inside), atomically. Returns ``path``.

    The graph takes one input named after the model's ``modality`` (``images``, ``video`` or ``points``) of shape
    (batch, *input_size), batch dynamic, and gives ``logits`` (a model with a classifier or a segmentation model) or
    ``features``.
    The metadata records the model name and its preprocessing (``mean``, ``std``).

    Args:
        model: one of vim's backbones (a ``TimmBackbone`` of an exportable family) or segmentation models; put in eval
            mode.
        path: the ``.onnx`` file.
        input_size: one sample's input shape; default :func:`~vim.deploy.model.nominal_input_size`.
        opset: ONNX opset, in :data:`ONNX_OPSETS`.
        progress: show a progress bar over the export's stages.
        half: float16 weights and arithmetic inside (half the file), for runtimes that want it; input and output stay
            float32. Converted with onnxconverter-common (in the ``export`` extra). The metadata says ``precision``.
    """
    path = checked_path(path, ".onnx")
    _require_onnx_exporter(half)
    if opset not in ONNX_OPSETS:
        raise ValueError(
            f"opset={opset} is not supported: the exporter writes opsets {ONNX_OPSETS.start}..{ONNX_OPSETS.stop - 1}"
        )
    backbone = exportable(model)
    with tqdm(total=4 if half else 3, desc=f"ONNX {path.name}", disable=not progress) as bar:
        bar.set_postfix_str("torch.export")
        program = export_program(backbone, input_size)
        bar.update()
        bar.set_postfix_str("decompose the scan")
        program = decompose_scan(program, ONNX_DECOMPOSITIONS)
        bar.update()
        bar.set_postfix_str("translate to ONNX")
        with torch.no_grad():  # the exporter runs the scan loop's body; with grad it would trace a backward too
            onnx_program = torch.onnx.export(
                program,
                (program.example_inputs[0][0],),
                input_names=[backbone.modality],
                output_names=[output_name(backbone)],
                dynamic_shapes=({0: "batch"},),
                opset_version=opset,
                dynamo=True,
                verbose=False,
            )
        assert onnx_program is not None  # None comes from the legacy exporter only (dynamo=False)
        onnx_program.model.metadata_props.update(_onnx_metadata(backbone, half))
        bar.update()
        if not half:
            atomic_write(path, lambda tmp: onnx_program.save(tmp, external_data=False))
            return path
        bar.set_postfix_str("convert to float16")
        halved = _float16(onnx_program.model_proto)
        atomic_write(path, lambda tmp: _save_proto(halved, tmp))
        bar.update()
    return path


def _float16(model: Any) -> Any:
    """The ModelProto with float16 weights and arithmetic, float32 input and output (casts at the edges)."""
    from onnxconverter_common import float16

    with warnings.catch_warnings():  # one warning per constant below float16's range, which becomes its smallest value
        warnings.filterwarnings("ignore", message="the float32 number", category=UserWarning)
        return float16.convert_float_to_float16(model, keep_io_types=True)


def _save_proto(model: Any, path: Path) -> None:
    import onnx

    onnx.save(model, path)


def _require_onnx_exporter(half: bool = False) -> None:
    """ImportError naming the extra to install when torch's ONNX exporter (or the float16 converter) is missing."""
    needed = ("onnx", "onnxscript", *(("onnxconverter_common",) if half else ()))
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"ONNX export needs {' and '.join(missing)}: pip install 'vim-toolkit[export]'")


def _onnx_metadata(model: nn.Module, half: bool = False) -> dict[str, str]:
    """The model's name, its preprocessing (``mean``, ``std`` of its pretrained config) and the arithmetic's
    ``precision`` (float32 or float16), as ONNX metadata."""
    cfg = getattr(model, "pretrained_cfg", {})
    metadata = {"model": cfg.get("architecture", type(model).__name__), "precision": "float16" if half else "float32"}
    metadata.update({key: str(list(cfg[key])) for key in ("mean", "std") if key in cfg})
    return metadata
