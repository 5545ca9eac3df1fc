"""The block-kernels benchmark tool end to end on tiny shapes: its files, not its timings."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from support.paths import REPO

TOOL = REPO / "tools" / "bench_block.py"


@pytest.mark.slow
def test_bench_block_writes_results_and_table(tmp_path):
    command = [sys.executable, str(TOOL), "--batch", "1", "--length", "6", "--dim", "8", "--depth", "3"]
    command += ["--min-seconds", "0", "--threads", "1", "--device", "cpu", "--out", str(tmp_path)]
    subprocess.run(command, check=True, capture_output=True)
    saved = json.loads((tmp_path / "block_cpu.json").read_text())
    assert {"date", "device", "torch", "triton", "dtype", "batch", "length", "dim", "d_inner", "depth"} <= saved["meta"].keys()
    assert saved["meta"]["d_inner"] == 16 and ", 1 thread," in saved["meta"]["device"]
    rows = {(row["operation"], row["implementation"]): row for row in saved["results"]}
    assert {("conv_silu", "pytorch"), ("add_norm", "pytorch")} <= rows.keys()
    fused = [row for (operation, name), row in rows.items() if operation == "conv_silu" and name.startswith("fused")]
    assert len(fused) == 1, "one fused conv row, named after the backend that ran"
    base = rows["conv_silu", "pytorch"]
    for phase in ("forward", "forward_backward"):
        assert fused[0][f"{phase}_ms"] > 0
        assert fused[0][f"{phase}_speedup"] == pytest.approx(base[f"{phase}_ms"] / fused[0][f"{phase}_ms"])
        saved_ms = 3 * (base[f"{phase}_ms"] - fused[0][f"{phase}_ms"])
        assert fused[0][f"{phase}_ms_saved_per_model"] == pytest.approx(saved_ms)
    table = (tmp_path / "block_cpu.md").read_text()
    assert "| conv_silu | pytorch |" in table and "| add_norm | pytorch |" in table
