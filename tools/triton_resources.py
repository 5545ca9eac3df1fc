"""Registers, spills, shared memory and occupancy of every Triton scan kernel variant, compiled for GPUs without one.

Triton compiles for any NVIDIA target on a machine without a GPU: its wheel ships ``ptxas`` and
``cuobjdump``. Each variant is the launch that the kernels' own launchers build
(:func:`vim.kernels.scan_triton.forward_launch` / ``backward_launch``) for every tile they can pick
(:func:`~vim.kernels.scan_triton.tile_choices`), with Triton's own specialization of those arguments
(alignment, strides of 1): the code a GPU of that target would run. Nothing is timed; these are
facts about the code.

    python tools/triton_resources.py                        # sm_80 and sm_90, a table on stdout
    python tools/triton_resources.py --arch 90 --json resources.json

Variants per target: forward and backward kernels; N in {4, 8, 16, 32, 64}; every tile; each
with D, z, delta_bias and softplus in bf16 (Vim's GPU case) scanning in reverse, and bare in float32
scanning forward. Exit status 1 if a variant spills registers or exceeds the target's shared memory.
Run it without ``TRITON_INTERPRET`` (the interpreter replaces the kernels); variants compile in
parallel (``--jobs``) and Triton caches them (``~/.triton/cache``), so a second run takes seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import triton
from tqdm import tqdm
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from vim.kernels import scan_triton
from vim.kernels.scan_layout import num_chunks

STATE_SIZES = (4, 8, 16, 32, 64)
SM_LIMITS = {
    80: dict(smem_per_sm=164 * 1024, max_threads=2048, max_blocks=32),
    90: dict(smem_per_sm=228 * 1024, max_threads=2048, max_blocks=32),
}
"""Per-multiprocessor limits of each target (CUDA programming guide, compute capabilities 8.0 and 9.0)."""
REGISTERS_PER_SM = 65536
RESERVED_SMEM_PER_BLOCK = 1024
"""Shared memory the driver reserves for every block from sm_80 on."""


@dataclass
class Variant:
    """One compiled kernel variant and its resources per thread and per block."""

    arch: int
    kernel: str
    n_state: int
    block_t: int
    block_d: int
    block_n: int
    num_warps: int
    flags: str
    registers: int = 0
    stack_bytes: int = 0
    local_bytes: int = 0
    shared_bytes: int = 0
    blocks_per_sm: int = 0
    occupancy: float = 0.0
    compile_s: float = 0.0

    @property
    def spills(self) -> bool:
        """Registers spilled to local memory (a stack frame or local memory per thread)."""
        return self.stack_bytes > 0 or self.local_bytes > 0


def _meta_inputs(n_state: int, full: bool) -> tuple:
    """Canonical inputs (see vim.kernels.scan_layout) of a bidirectional Vim-S scan as meta tensors (no memory).

    ``full``: bf16 activations with D, z and delta_bias; else float32 without them.
    """
    directions, batch, dim, length = 2, 2, 768, 4096
    dtype = torch.bfloat16 if full else torch.float32

    def channels_last(*shape: int) -> torch.Tensor:
        return torch.empty(*shape[:-2], shape[-1], shape[-2], device="meta", dtype=dtype).transpose(-1, -2)

    def parameter(*shape: int) -> torch.Tensor | None:
        return torch.empty(*shape, device="meta") if full else None

    B, C = (torch.empty(directions, batch, length, 1, n_state, device="meta", dtype=dtype).permute(0, 1, 3, 4, 2) for _ in "BC")
    u, delta = channels_last(directions, batch, dim, length), channels_last(directions, batch, dim, length)
    A = torch.empty(directions, dim, n_state, device="meta")
    z = channels_last(batch, dim, length) if full else None
    return u, delta, A, B, C, parameter(directions, dim), z, parameter(directions, dim)


def _launch(kernel: str, n_state: int, tiles: scan_triton.Tiles, full: bool, limits) -> scan_triton.KernelLaunch:
    u, delta, A, B, C, D, z, bias = _meta_inputs(n_state, full)
    flags = (full, full)  # softplus with the bias; the reverse direction in the full variant
    if kernel == "forward":
        launch, _, _ = scan_triton.forward_launch(u, delta, A, B, C, D, z, bias, *flags, limits=limits, tiles=tiles)
        return launch
    checkpoints = torch.empty(2, u.shape[1], num_chunks(u.shape[-1]), u.shape[2], n_state, device="meta")
    launch, _ = scan_triton.backward_launch(u, u, delta, A, B, C, D, z, bias, *flags, checkpoints, limits=limits, tiles=tiles)
    return launch


def compile_for(launch: scan_triton.KernelLaunch, arch: int):
    """Compile ``launch`` for ``sm_<arch>`` as a launch on such a GPU would (Triton's binder specializes the arguments)."""
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kernel = launch.kernel
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = dict(launch.options, debug=False)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)


def _resource_usage(cubin: bytes) -> dict[str, int]:
    """REG, STACK, SHARED and LOCAL of the one kernel in ``cubin``, as cuobjdump reports them."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        report = subprocess.run(
            [triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage", file.name], capture_output=True, text=True, check=True
        ).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", report)
    if found is None:
        raise RuntimeError(f"no resource usage in cuobjdump's report:\n{report}")
    return dict(zip(("REG", "STACK", "SHARED", "LOCAL"), map(int, found.groups())))


def _occupancy(variant: Variant) -> tuple[int, float]:
    """Blocks per multiprocessor and the fraction of its warp slots they fill, from registers, shared memory and threads."""
    limits = SM_LIMITS[variant.arch]
    registers_per_warp = math.ceil(variant.registers * 32 / 256) * 256  # allocated per warp in units of 256
    warps_by_registers = (REGISTERS_PER_SM // 4 // registers_per_warp) * 4  # four sub-partitions, each its own file
    blocks = min(
        warps_by_registers // variant.num_warps,
        limits["smem_per_sm"] // (variant.shared_bytes + RESERVED_SMEM_PER_BLOCK),
        limits["max_threads"] // (32 * variant.num_warps),
        limits["max_blocks"],
    )
    return blocks, blocks * variant.num_warps / (limits["max_threads"] // 32)


FULL, BARE = "D z bias softplus reverse bf16", "bare fp32"


def variants(arch: int) -> list[Variant]:
    """Every variant the launchers can pick for ``arch``, not yet compiled."""
    return [
        Variant(arch, kernel, n_state, tiles.block_t, tiles.block_d, tiles.block_n, tiles.num_warps, flags)
        for kernel in ("forward", "backward")
        for n_state in STATE_SIZES
        for tiles in scan_triton.tile_choices(n_state, kernel == "backward")
        for flags in (FULL, BARE)
    ]


def measure(variant: Variant) -> Variant:
    """Compile ``variant`` and fill in its resources."""
    tiles = scan_triton.Tiles(variant.block_t, variant.block_d, variant.block_n, variant.num_warps)
    launch = _launch(variant.kernel, variant.n_state, tiles, variant.flags == FULL, scan_triton.GPU_LIMITS[variant.arch])
    start = time.perf_counter()
    compiled = compile_for(launch, variant.arch)
    variant.compile_s = round(time.perf_counter() - start, 2)
    usage = _resource_usage(compiled.asm["cubin"])
    variant.registers, variant.stack_bytes, variant.local_bytes = usage["REG"], usage["STACK"], usage["LOCAL"]
    variant.shared_bytes = compiled.metadata.shared + usage["SHARED"]
    variant.blocks_per_sm, variant.occupancy = _occupancy(variant)
    return variant


def problems(variant: Variant) -> list[str]:
    """What is wrong with a compiled variant: spills, or more shared memory than a block of its target may use."""
    found = []
    if variant.spills:
        found.append(f"spills ({variant.stack_bytes} B stack, {variant.local_bytes} B local per thread)")
    limit = scan_triton.GPU_LIMITS[variant.arch].smem_per_block
    if variant.shared_bytes > limit:
        found.append(f"{variant.shared_bytes} B shared memory > {limit} B per block")
    return found


def describe(v: Variant) -> str:
    return f"sm_{v.arch} {v.kernel} N={v.n_state} {v.block_t}x{v.block_d}x{v.block_n} {v.num_warps} warps, {v.flags}"


def table(rows: list[Variant]) -> str:
    header = "| sm | kernel | N | BLOCK_T x D x N | warps | flags | regs/thread | spills | smem KiB | blocks/SM | occupancy |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for v in rows:
        lines.append(
            f"| {v.arch} | {v.kernel} | {v.n_state} | {v.block_t} x {v.block_d} x {v.block_n} | {v.num_warps} | {v.flags} "
            f"| {v.registers} | {'yes' if v.spills else 'no'} | {v.shared_bytes / 1024:.1f} | {v.blocks_per_sm} "
            f"| {v.occupancy:.0%} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    targets = sorted(scan_triton.GPU_LIMITS)
    parser.add_argument("--arch", type=int, nargs="+", default=targets, choices=targets, help="compute capabilities")
    parser.add_argument("--json", type=Path, help="also write the variants and their resources here")
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="variants compiled at once (default: the CPUs)")
    args = parser.parse_args(argv)
    todo = [variant for arch in args.arch for variant in variants(arch)]
    # forked workers: each compile is its own process's work (ptxas, LLVM), nothing to share
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        rows = list(tqdm(pool.map(measure, todo), total=len(todo), desc="compiling", file=sys.stderr))
    print(f"triton {triton.__version__}, ptxas {triton.knobs.nvidia.ptxas.path}")
    print(table(rows))
    bad = [f"{describe(v)}: {problem}" for v in rows for problem in problems(v)]
    if args.json:
        meta = dict(triton=triton.__version__, torch=torch.__version__)
        args.json.write_text(json.dumps(dict(meta=meta, variants=[asdict(v) for v in rows]), indent=1))
    for line in bad:
        print("PROBLEM:", line, file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
