"""``torch.export`` programs of vim's backbones: the example input, the program, vim's ops decomposed, the ``.pt2`` file."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vim.files import atomic_write
from vim.kernels import add_norm_ref, causal_conv1d_silu_ref
from vim.kernels.scan_decomposition import decomposed_scan_forward

from .model import exportable, nominal_input_size

__all__ = [
    "EXAMPLE_BATCH",
    "SCAN_OP",
    "VIM_OP_DECOMPOSITIONS",
    "checked_path",
    "decompose_scan",
    "example_input",
    "export_program",
    "save_program",
]

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


def checked_path(path: str | os.PathLike, suffix: str, why: str = "") -> Path:
    """``path`` as a Path; ValueError naming it (and ``why``, if given) unless it ends in ``suffix``."""
    path = Path(path)
    if path.suffix != suffix:
        raise ValueError(f"output file '{path}' must end in {suffix}{f' ({why})' if why else ''}")
    return path


def example_input(model: nn.Module, input_size: tuple[int, ...] | None = None) -> torch.Tensor:
    """A random batch (:data:`EXAMPLE_BATCH`, *input_size) (default: nominal), checked to run through ``model``.

    Raises:
        ValueError: naming the model, the size and the model's complaint, if it cannot take that size.
    """
    backbone = exportable(model)
    shape = tuple(input_size) if input_size is not None else nominal_input_size(backbone)
    parameter = next(backbone.parameters())
    example = torch.randn(EXAMPLE_BATCH, *shape, generator=torch.Generator().manual_seed(0)).to(parameter)
    try:
        with torch.no_grad():
            backbone(example)
    except (ValueError, RuntimeError) as error:
        raise ValueError(
            f"input size {shape} does not fit {type(model).__name__} (it takes {backbone.modality} of nominal size "
            f"{nominal_input_size(backbone)}): {error}"
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
    path = checked_path(path, ".pt2")
    program = export_program(model, input_size)

    def save_into(tmp: Path) -> None:
        with tmp.open("wb") as file:  # a file object: torch.export.save expects a path to end in .pt2
            torch.export.save(program, file)

    atomic_write(path, save_into)
    return path
