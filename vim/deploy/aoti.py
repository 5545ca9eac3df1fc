"""AOTInductor packages of vim's backbones: a compiled ``.pt2`` that runs without vim (or, keeping vim's ops, with it)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from vim.files import atomic_write
from vim.models.hierarchical import window_rows_cols

from .program import checked_path, decompose_scan, export_program

__all__ = ["export_aoti"]


def refuse_several_windows(model: nn.Module, example: torch.Tensor) -> None:
    """ValueError when a windowed stage (MambaVision's) cuts several windows per image at the example's size.

    The windows go into the batch axis, so the scan's batch is the dynamic batch times the windows per image: the
    decomposed scan's loop then cannot read its size, which Inductor needs to compile it (torch.export and ONNX take
    such a program; AOTInductor fails inside Inductor). One window per stage, as at each released model's size, works.
    """
    stages = [getattr(stage, "window_size", None) for stage in getattr(model, "stages", [])]
    if not any(stages):
        return
    backbone: Any = model
    with torch.no_grad():
        maps = backbone.forward_intermediates(example[:1], output_fmt="NCHW", intermediates_only=True)
    for index, (window, features) in enumerate(zip(stages, maps)):
        height, width = features.shape[-2:]
        rows, cols = window_rows_cols((height, width), window) if window else (1, 1)
        windows = rows * cols
        if windows > 1:
            raise ValueError(
                f"AOTInductor cannot compile {type(model).__name__} at input size {tuple(example.shape[1:])}: stage {index} "
                f"cuts its {height}x{width} grid into {windows} windows of {window} per image; export at a size with one "
                f"window per stage (the model's nominal size) or as ONNX / torch.export, which take any size"
            )


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
    path = checked_path(path, ".pt2")
    with tqdm(total=2, desc=f"AOTInductor {path.name}", disable=not progress) as bar:
        bar.set_postfix_str("torch.export")
        program = export_program(model, input_size)
        if not keep_vim_ops:
            refuse_several_windows(model, program.example_inputs[0][0])
            program = decompose_scan(program)
        bar.update()
        bar.set_postfix_str("compile")

        def compile_into(tmp: Path) -> None:
            with tmp.open("wb+") as file:
                torch._inductor.aoti_compile_and_package(program, package_path=file)

        atomic_write(path, compile_into)
        bar.update()
    return path
