"""Registers, spills, shared memory and occupancy of every Triton kernel variant, compiled for GPUs without one.

Triton compiles for any NVIDIA target on a machine without a GPU: its wheel ships ``ptxas`` and
``cuobjdump``. Each variant is the launch that the kernels' own launchers build, with Triton's own
specialization of its arguments (alignment, strides of 1): the code a GPU of that target would run.
The sizes that are no compile-time constants are Vim-S's (2 x 4096 tokens, widths that are multiples
of 16 like every Vim, VideoMamba and PointMamba width). Nothing is timed; these are facts about the code.

    python tools/triton_resources.py                        # sm_80 and sm_90, a table on stdout
    python tools/triton_resources.py --arch 90 --json resources.json

Variants per target, forward and backward kernels each:

- selective scan (:func:`vim.kernels.scan_triton.forward_launch` / ``backward_launch``): N in
  {4, 8, 16, 32, 64}, every tile :func:`~vim.kernels.scan_triton.tile_choices` holds; each with D, z,
  delta_bias and softplus in bf16 (Vim's GPU case) scanning in reverse, and bare in float32 scanning forward.
- depthwise causal conv + SiLU (:mod:`vim.kernels.conv_silu_triton`, one tile for every call): W from 1
  to 8; both directions with their biases and one direction without a bias, each in bf16 and float32.
- residual add + norm (:mod:`vim.kernels.add_norm_triton`): every tile
  :func:`~vim.kernels.add_norm_triton.tile_choices` holds (rows up to 2048 wide); RMSNorm with a
  residual (Vim's blocks), LayerNorm with a residual and a bias, and RMSNorm without either (the first
  block), each in bf16 and float32.

Exit status 1 if a variant spills registers or exceeds the target's shared memory. Run it without
``TRITON_INTERPRET`` (the interpreter replaces the kernels); variants compile in parallel (``--jobs``)
and Triton caches them (``~/.triton/cache``), so a second run takes seconds.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import triton
from tqdm import tqdm
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from vim.kernels import add_norm_triton, conv_silu_triton, scan_triton
from vim.kernels.conv_silu_reference import MAX_WIDTH
from vim.kernels.scan_layout import num_chunks

STATE_SIZES = (4, 8, 16, 32, 64)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
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
    """One kernel variant: what picks it, how to build its launch, and once compiled its resources per thread and block."""

    arch: int
    kernel: str
    """"scan forward", "conv backward", "add_norm forward", ..."""
    size: str
    """The size that picks the variant: "N=16" (scan), "W=4" (conv), "D=768" (add_norm)."""
    flags: str
    dtype: str
    """The activations' dtype (a key of :data:`DTYPES`)."""
    build: Callable[[], scan_triton.KernelLaunch] = field(repr=False)
    """Builds the launch (a partial of a module function, so a worker process can build it)."""
    options: dict = field(default_factory=dict)
    """The launch's compile-time options: block sizes, switches, num_warps."""
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

    @property
    def num_warps(self) -> int:
        return self.options["num_warps"]

    @property
    def tile(self) -> str:
        """Block sizes: BLOCK_T x BLOCK_D x BLOCK_N (scan), BLOCK_L x BLOCK_C (conv), BLOCK_ROWS x BLOCK_D (add_norm)."""
        return " x ".join(str(value) for name, value in self.options.items() if name.startswith("BLOCK_") and name != "BLOCK_W")

    def record(self) -> dict:
        """The variant as JSON values (without its builder)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "build"}


def _meta(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A tensor without memory: the launchers need shapes, strides and dtypes only."""
    return torch.empty(*shape, device="meta", dtype=dtype)


def _kernel(family: str, backward: bool) -> str:
    return f"{family} {'backward' if backward else 'forward'}"


# ---------------------------------------------------------------------------------------------
# selective scan
# ---------------------------------------------------------------------------------------------

SCAN_CASES = {"D z bias softplus reverse": ("bf16", True), "bare": ("fp32", False)}
"""The scan's flags: (dtype, with D, z and delta_bias + softplus, the reversed direction first)."""


def _scan_inputs(n_state: int, full: bool) -> tuple:
    """Canonical inputs (see vim.kernels.scan_layout) of a bidirectional Vim-S scan as meta tensors.

    ``full``: bf16 activations with D, z and delta_bias; else float32 without them.
    """
    directions, batch, dim, length = 2, 2, 768, 4096
    dtype = torch.bfloat16 if full else torch.float32

    def channels_last(*shape: int) -> torch.Tensor:
        return _meta(*shape[:-2], shape[-1], shape[-2], dtype=dtype).transpose(-1, -2)

    def parameter(*shape: int) -> torch.Tensor | None:
        return _meta(*shape) if full else None

    B, C = (_meta(directions, batch, length, 1, n_state, dtype=dtype).permute(0, 1, 3, 4, 2) for _ in "BC")
    u, delta = channels_last(directions, batch, dim, length), channels_last(directions, batch, dim, length)
    A = _meta(directions, dim, n_state)
    z = channels_last(batch, dim, length) if full else None
    return u, delta, A, B, C, parameter(directions, dim), z, parameter(directions, dim)


def _scan_launch(backward: bool, n_state: int, tiles: scan_triton.Tiles, full: bool, arch: int) -> scan_triton.KernelLaunch:
    u, delta, A, B, C, D, z, bias = _scan_inputs(n_state, full)
    flags = (full, full)  # softplus with the bias; the reverse direction in the full variant
    limits = scan_triton.GPU_LIMITS[arch]
    if not backward:
        launch, _, _ = scan_triton.forward_launch(u, delta, A, B, C, D, z, bias, *flags, limits=limits, tiles=tiles)
        return launch
    checkpoints = _meta(2, u.shape[1], num_chunks(u.shape[-1]), u.shape[2], n_state)
    launch, _ = scan_triton.backward_launch(u, u, delta, A, B, C, D, z, bias, *flags, checkpoints, limits=limits, tiles=tiles)
    return launch


def scan_variants(arch: int) -> list[Variant]:
    """Every tile of the scan's launchers for each state size, with each of :data:`SCAN_CASES`."""
    return [
        Variant(
            arch,
            _kernel("scan", backward),
            f"N={n_state}",
            flags,
            dtype,
            functools.partial(_scan_launch, backward, n_state, tiles, full, arch),
        )
        for backward in (False, True)
        for n_state in STATE_SIZES
        for tiles in scan_triton.tile_choices(n_state, backward)
        for flags, (dtype, full) in SCAN_CASES.items()
    ]


# ---------------------------------------------------------------------------------------------
# depthwise causal conv + SiLU
# ---------------------------------------------------------------------------------------------

CONV_CASES = {"both directions, biases": (True, True), "one direction, no bias": (False, False)}
"""The conv's flags: (both directions, a bias for each)."""


def _conv_launch(backward: bool, width: int, both_directions: bool, biases: bool, dtype: str) -> scan_triton.KernelLaunch:
    """The conv of a Vim-S mixer (C 768, L 4096): x the first half of the input projection, rows 2C apart."""
    batch, length, channels = 2, 4096, 768
    x = _meta(batch, length, 2 * channels, dtype=DTYPES[dtype])[..., :channels]
    weight, bias = _meta(channels, width), _meta(channels) if biases else None
    weight_b, bias_b = (_meta(channels, width), bias) if both_directions else (None, None)
    if not backward:
        return conv_silu_triton.forward_launch(x, weight, bias, weight_b, bias_b)[0]
    dout = _meta(2 if both_directions else 1, batch, length, channels, dtype=DTYPES[dtype])
    return conv_silu_triton.backward_launch(dout, x, weight, bias, weight_b, bias_b)[0]


def conv_variants(arch: int) -> list[Variant]:
    """Every width up to MAX_WIDTH, with each of :data:`CONV_CASES`, in each of :data:`DTYPES`."""
    return [
        Variant(
            arch,
            _kernel("conv", backward),
            f"W={width}",
            flags,
            dtype,
            functools.partial(_conv_launch, backward, width, *CONV_CASES[flags], dtype),
        )
        for backward in (False, True)
        for width in range(1, MAX_WIDTH + 1)
        for flags in CONV_CASES
        for dtype in DTYPES
    ]


# ---------------------------------------------------------------------------------------------
# residual add + norm
# ---------------------------------------------------------------------------------------------

NORM_CASES = {"rms residual": (True, True, False), "layer residual bias": (False, True, True), "rms": (True, False, False)}
"""The add + norm's flags: (RMSNorm, a residual, a bias)."""


def _norm_launch(backward: bool, dim: int, is_rms: bool, residual: bool, with_bias: bool, dtype: str) -> scan_triton.KernelLaunch:
    """The add + norm of (2, 4096, D) tokens, activations and norm parameters in ``dtype``.

    The backward gets the stream's gradient where there is a residual (a block inside the trunk), and
    writes the gradients that vim.kernels.add_norm asks for: the float32 stream's for a residual or a
    float32 hidden, hidden's own for another dtype.
    """
    shape, activations = (2, 4096, dim), DTYPES[dtype]
    weight, bias = _meta(dim, dtype=activations), _meta(dim, dtype=activations) if with_bias else None
    if not backward:
        hidden, residual_in = _meta(*shape, dtype=activations), _meta(*shape) if residual else None
        return add_norm_triton.forward_launch(hidden, residual_in, weight, bias, 1e-5, is_rms)[0]
    store_sum, hidden_dtype = residual or activations == torch.float32, None if activations == torch.float32 else activations
    dnormed, dresidual_out = _meta(*shape, dtype=activations), _meta(*shape) if residual else None
    inputs = (dnormed, dresidual_out, _meta(*shape), weight, bias, 1e-5, is_rms, store_sum, hidden_dtype)
    return add_norm_triton.backward_launch(*inputs)[0]


def norm_variants(arch: int) -> list[Variant]:
    """Every tile of the add + norm's launchers, with each of :data:`NORM_CASES`, in each of :data:`DTYPES`.

    Rows are 3/4 of their tile wide, like Vim's (192, 384, 768).
    """
    return [
        Variant(
            arch,
            _kernel("add_norm", backward),
            f"D={block_d * 3 // 4}",
            flags,
            dtype,
            functools.partial(_norm_launch, backward, block_d * 3 // 4, *NORM_CASES[flags], dtype),
        )
        for backward in (False, True)
        for _, block_d, _ in add_norm_triton.tile_choices()
        for flags in NORM_CASES
        for dtype in DTYPES
    ]


def variants(arch: int) -> list[Variant]:
    """Every variant the launchers can pick for ``arch``, not yet compiled."""
    return scan_variants(arch) + conv_variants(arch) + norm_variants(arch)


# ---------------------------------------------------------------------------------------------
# compiling and measuring
# ---------------------------------------------------------------------------------------------


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


def measure(variant: Variant) -> Variant:
    """Build and compile ``variant``; fill in its options and resources."""
    launch = variant.build()
    variant.options = dict(launch.options)
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
    return f"sm_{v.arch} {v.kernel} {v.size} {v.tile} {v.num_warps} warps, {v.flags} {v.dtype}"


def table(rows: list[Variant]) -> str:
    header = "| sm | kernel | size | tile | warps | flags | dtype | regs/thread | spills | smem KiB | blocks/SM | occupancy |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for v in rows:
        lines.append(
            f"| {v.arch} | {v.kernel} | {v.size} | {v.tile} | {v.num_warps} | {v.flags} | {v.dtype} "
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
        args.json.write_text(json.dumps(dict(meta=meta, variants=[v.record() for v in rows]), indent=1))
    for line in bad:
        print("PROBLEM:", line, file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
