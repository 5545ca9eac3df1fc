"""The ONNX graph report end to end on a tiny exported Vim: each block's node histogram, the loop body's, a profile."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vim.deploy import export_onnx, load_model

from support.paths import REPO

pytest.importorskip("onnxruntime")


@pytest.mark.slow  # an ONNX export
def test_onnx_graph_report_prints_blocks_the_loop_body_and_a_profile(tmp_path):
    path = export_onnx(load_model("test_vim", img_size=32), tmp_path / "vim.onnx", progress=False)
    command = [sys.executable, str(REPO / "tools" / "onnx_graph_report.py"), str(path), "--profile", "1"]
    report = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    assert "layers.0" in report and "loop body (x" in report and "Scan" in report
    assert "onnxruntime kernel time per call, 1 thread(s)" in report and "(in Scan)" in report
