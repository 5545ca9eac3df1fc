"""The scan benchmark tool end to end on tiny shapes: its files, not its timings."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from support.paths import REPO

TOOL = REPO / "tools" / "bench_scan.py"


@pytest.mark.slow
def test_bench_scan_writes_results_table_and_plot(tmp_path):
    command = [sys.executable, str(TOOL), "--lengths", "8", "20", "--dim", "16", "--state", "4"]
    command += ["--backends", "torch", "reference", "--out", str(tmp_path)]
    subprocess.run(command, check=True, capture_output=True, text=True)
    saved = json.loads((tmp_path / "scan_cpu.json").read_text())
    assert {"date", "device", "torch", "dtype", "batch", "dim", "state"} <= saved["meta"].keys()
    rows = {(row["backend"], row["length"]): row for row in saved["results"]}
    assert rows.keys() == {(b, L) for b in ("torch", "reference") for L in (8, 20)}
    for (_, length), row in rows.items():
        reference = rows["reference", length]
        for phase in ("forward", "forward_backward"):
            assert row[f"{phase}_ms"] > 0
            assert row[f"{phase}_x_reference"] == pytest.approx(reference[f"{phase}_ms"] / row[f"{phase}_ms"])
    table = (tmp_path / "scan_cpu.md").read_text()
    assert "| torch | 20 |" in table and "| reference | 8 |" in table
    plot = tmp_path / "scan_cpu.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plot.unlink()
    subprocess.run([sys.executable, str(TOOL), "--replot", str(tmp_path / "scan_cpu.json")], check=True, capture_output=True)
    assert plot.exists(), "--replot redraws the plot from the JSON"
