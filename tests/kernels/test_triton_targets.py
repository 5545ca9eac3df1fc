"""Every Triton kernel variant the launchers can pick, compiled for A100 (sm_80) and H100 (sm_90) without a GPU.

The selective scan, the depthwise causal conv + SiLU and the residual add + norm, forward and backward.
tools/triton_resources.py compiles them with the ptxas that ships in Triton's wheel (in a process without
TRITON_INTERPRET, which would replace the kernels by the interpreter) and reports each one's registers, spills
and shared memory. Here: the launchers pick their tiles only from the sets that are compiled; every one of them
is there, with each kernel's switches both ways in bf16 and float32; none spills, each fits its target.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict

import pytest
import torch

from support.paths import REPO

triton = pytest.importorskip("triton")

from vim.kernels import add_norm_triton, conv_silu_triton, scan_triton  # noqa: E402  (after the skip without Triton)
from vim.kernels.add_norm import MAX_DIM  # noqa: E402
from vim.kernels.conv_silu_reference import MAX_WIDTH  # noqa: E402

TOOL = REPO / "tools" / "triton_resources.py"
STATE_SIZES = (4, 8, 16, 32, 64)
SCAN_TILE = ("BLOCK_T", "BLOCK_D", "BLOCK_N", "num_warps")
CONV_TILE = ("BLOCK_L", "BLOCK_C", "num_warps")
NORM_TILE = ("BLOCK_ROWS", "BLOCK_D", "num_warps")


def _ptxas_missing() -> str | None:
    """Why Triton's ptxas cannot run here, or None."""
    try:
        path = triton.knobs.nvidia.ptxas.path
    except (AttributeError, RuntimeError, FileNotFoundError) as error:
        return f"Triton finds no ptxas ({error})"
    return None if os.access(path, os.X_OK) else f"Triton's ptxas at {path} is not executable"


def _meta(*shape: int, dtype=torch.float32) -> torch.Tensor:
    return torch.empty(*shape, device="meta", dtype=dtype)


def _picked(options: dict, names: tuple[str, ...]) -> tuple:
    return tuple(options[name] for name in names)


def test_the_scan_launchers_choose_only_tiles_that_are_checked():
    """_choose_tiles picks one of tile_choices (the set compiled below) for any grid and GPU."""
    for limits in (*scan_triton.GPU_LIMITS.values(), scan_triton.GpuLimits(86, 28, 99 * 1024)):
        for n_state in (1, 3, 4, 5, 8, 13, 16, 17, 32, 33, 64):
            for backward in (False, True):
                choices = scan_triton.tile_choices(n_state, backward)
                for dim_per_group in (1, 7, 16, 48, 192, 768, 1536):
                    for programs_per_block in (1, 2, 16, 256):
                        chosen = scan_triton._choose_tiles(dim_per_group, n_state, backward, programs_per_block, limits)
                        assert chosen in choices, (limits, n_state, backward, dim_per_group, programs_per_block)
                        assert 64 % chosen.block_t == 0, "checkpoints fall on tile ends"


@pytest.mark.parametrize("length, channels", [(1, 1), (5, 20), (197, 384), (4099, 1536)])
def test_the_conv_launchers_use_one_tile_whatever_the_shape(length, channels):
    """Only the width, the directions, the biases and the dtypes vary between the conv's compiled variants."""
    x = _meta(2, length, channels, dtype=torch.bfloat16)
    weight, bias = _meta(channels, 4), _meta(channels)
    forward, _ = conv_silu_triton.forward_launch(x, weight, bias, weight, bias)
    backward, _, _ = conv_silu_triton.backward_launch(_meta(2, 2, length, channels), x, weight, bias, weight, bias)
    for launch in (forward, backward):
        assert _picked(launch.options, CONV_TILE) == (
            conv_silu_triton.BLOCK_L,
            conv_silu_triton.BLOCK_C,
            conv_silu_triton.NUM_WARPS,
        )
    assert backward.options["TILES"] == conv_silu_triton.BACKWARD_TILES


def test_the_add_norm_launchers_choose_only_tiles_that_are_checked():
    """Every row width up to MAX_DIM gets one of tile_choices (the set compiled below), forward and backward."""
    choices = add_norm_triton.tile_choices()
    for dim in range(1, MAX_DIM + 1):
        assert add_norm_triton._tile(dim) in choices, dim
    for dim in (1, 48, 192, 384, 1000, MAX_DIM):
        hidden, weight = _meta(2, 3, dim), _meta(dim)
        forward, _, _ = add_norm_triton.forward_launch(hidden, None, weight, None, 1e-5, True)
        backward, _ = add_norm_triton.backward_launch(hidden, None, hidden, weight, None, 1e-5, True, True, None)
        for launch in (forward, backward):
            assert _picked(launch.options, NORM_TILE) in choices, dim
    with pytest.raises(ValueError, match="at most 2048"):
        add_norm_triton._tile(MAX_DIM + 1)


def _check_scan(compiled: dict[str, list[dict]]) -> None:
    """Every tile of every state size, each with D, z, bias, softplus, reverse in bf16 and bare in float32."""
    for backward in (False, True):
        rows = compiled["scan backward" if backward else "scan forward"]
        expected = {
            (tiles.block_t, tiles.block_d, tiles.block_n, tiles.num_warps)
            for n_state in STATE_SIZES
            for tiles in scan_triton.tile_choices(n_state, backward)
        }
        cases = defaultdict(set)
        for v in rows:
            cases[_picked(v["options"], SCAN_TILE)].add((v["flags"], v["dtype"]))
        assert set(cases) == expected, "every tile the scan's launchers can pick is compiled"
        for tile, flags in cases.items():
            assert flags == {("D z bias softplus reverse", "bf16"), ("bare", "fp32")}, tile
        full = [v["options"] for v in rows if v["dtype"] == "bf16"]
        assert all(o["HAS_D"] and o["HAS_Z"] and o["HAS_BIAS"] and o["SOFTPLUS"] and o["REVERSE"] for o in full)


def _check_conv(compiled: dict[str, list[dict]]) -> None:
    """Every width, both directions with their biases and one direction without, each in bf16 and float32."""
    one_tile = (conv_silu_triton.BLOCK_L, conv_silu_triton.BLOCK_C, conv_silu_triton.NUM_WARPS)
    for kernel in ("conv forward", "conv backward"):
        rows = compiled[kernel]
        assert {_picked(v["options"], CONV_TILE) for v in rows} == {one_tile}
        switches = ("WIDTH", "TWO_DIRECTIONS", "HAS_BIAS0", "HAS_BIAS1")
        found = {(*_picked(v["options"], switches), v["dtype"]) for v in rows}
        expected = {
            (width, both, both, both, dtype)
            for width in range(1, MAX_WIDTH + 1)
            for both in (True, False)
            for dtype in ("bf16", "fp32")
        }
        assert found == expected, kernel


def _check_add_norm(compiled: dict[str, list[dict]]) -> None:
    """Every tile, RMSNorm with a residual, LayerNorm with a residual and a bias, RMSNorm bare; bf16 and float32."""
    for kernel, residual in (("add_norm forward", "HAS_RESIDUAL"), ("add_norm backward", "HAS_DRESIDUAL")):
        cases = defaultdict(set)
        for v in compiled[kernel]:
            options = v["options"]
            cases[_picked(options, NORM_TILE)].add((options["IS_RMS"], options[residual], options["HAS_BIAS"], v["dtype"]))
        assert set(cases) == set(add_norm_triton.tile_choices()), f"{kernel}: every tile is compiled"
        expected = {(True, True, False), (False, True, True), (True, False, False)}
        for tile, found in cases.items():
            assert found == {(*case, dtype) for case in expected for dtype in ("bf16", "fp32")}, (kernel, tile)


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(scan_triton.GPU_LIMITS))
def test_every_variant_compiles_without_spills_within_shared_memory(arch: int, tmp_path):
    if reason := _ptxas_missing():
        pytest.skip(reason)
    report = tmp_path / "resources.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, str(TOOL), "--arch", str(arch), "--jobs", "1", "--json", str(report)]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    print(result.stdout)  # registers per thread and occupancy per variant (shown with -s or -rA)
    assert report.exists(), result.stderr[-3000:]
    variants = json.loads(report.read_text())["variants"]

    compiled = defaultdict(list)
    for v in variants:
        compiled[v["kernel"]].append(v)
    families = ("scan", "conv", "add_norm")
    assert set(compiled) == {f"{family} {direction}" for family in families for direction in ("forward", "backward")}
    _check_scan(compiled)
    _check_conv(compiled)
    _check_add_norm(compiled)

    limit = scan_triton.GPU_LIMITS[arch].smem_per_block
    for v in variants:
        what = f"sm_{arch} {v['kernel']} {v['size']} {v['options']} {v['flags']} {v['dtype']}"
        assert 0 < v["registers"] <= 255, what
        assert v["stack_bytes"] == 0 and v["local_bytes"] == 0, f"{what} spills: {v}"
        assert v["shared_bytes"] <= limit, f"{what} uses {v['shared_bytes']} B of shared memory, more than {limit}"
        assert v["blocks_per_sm"] >= 1, what
    assert result.returncode == 0, result.stderr[-3000:]
