"""Every Triton scan kernel variant the launchers can pick, compiled for A100 (sm_80) and H100 (sm_90) without a GPU.

tools/triton_resources.py compiles them with the ptxas that ships in Triton's wheel (in a process without
TRITON_INTERPRET, which would replace the kernels by the interpreter) and reports each one's registers, spills
and shared memory. Here: every tile the launchers can choose is there, none spills, each fits its target.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

from vim.kernels import scan_triton  # noqa: E402  (after the skip without Triton)

TOOL = Path(__file__).resolve().parents[1] / "tools" / "triton_resources.py"
STATE_SIZES = (4, 8, 16, 32, 64)


def _ptxas_missing() -> str | None:
    """Why Triton's ptxas cannot run here, or None."""
    try:
        path = triton.knobs.nvidia.ptxas.path
    except (AttributeError, RuntimeError, FileNotFoundError) as error:
        return f"Triton finds no ptxas ({error})"
    return None if os.access(path, os.X_OK) else f"Triton's ptxas at {path} is not executable"


def test_the_launchers_choose_only_tiles_that_are_checked():
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

    expected = {
        (kernel, n_state, tiles.block_t, tiles.block_d, tiles.block_n, tiles.num_warps)
        for kernel in ("forward", "backward")
        for n_state in STATE_SIZES
        for tiles in scan_triton.tile_choices(n_state, kernel == "backward")
    }
    compiled = {(v["kernel"], v["n_state"], v["block_t"], v["block_d"], v["block_n"], v["num_warps"]) for v in variants}
    assert compiled == expected, "every tile the launchers can pick is compiled"
    assert {v["flags"] for v in variants} == {"D z bias softplus reverse bf16", "bare fp32"}
    limit = scan_triton.GPU_LIMITS[arch].smem_per_block
    for v in variants:
        what = f"sm_{arch} {v['kernel']} N={v['n_state']} {v['block_t']}x{v['block_d']}x{v['block_n']} {v['flags']}"
        assert 0 < v["registers"] <= 255, what
        assert v["stack_bytes"] == 0 and v["local_bytes"] == 0, f"{what} spills: {v}"
        assert v["shared_bytes"] <= limit, f"{what} uses {v['shared_bytes']} B of shared memory, more than {limit}"
        assert v["blocks_per_sm"] >= 1, what
    assert result.returncode == 0, result.stderr[-3000:]
