"""AOTInductor packages of vim's backbones: a compiled ``.pt2`` that runs without vim (or, keeping vim's ops, with it)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from vim.files import atomic_write

from .program import checked_path, decompose_scan, export_program

__all__ = ["export_aoti"]


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
            program = decompose_scan(program)
        bar.update()
        bar.set_postfix_str("compile")

        def compile_into(tmp: Path) -> None:
            with tmp.open("wb+") as file:
                torch._inductor.aoti_compile_and_package(program, package_path=file)

        atomic_write(path, compile_into)
        bar.update()
    return path
