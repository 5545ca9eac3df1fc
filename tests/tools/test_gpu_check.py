"""tools/gpu_check.sh end to end on CPU (--dry-run): every stage runs, writes its files, and the summary reads them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from support.paths import REPO

SCRIPT = REPO / "tools" / "gpu_check.sh"
STAGES = [
    "gpu_tests",
    "bench_scan",
    "bench_models_inference",
    "bench_models_training",
    "bench_hierarchical",
    "bench_cross_scan",
    "summary",
]


def run_check(out: Path, python: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": python}
    env.pop("TRITON_INTERPRET", None)  # as on a GPU machine: the script decides
    return subprocess.run(["bash", str(SCRIPT), str(out), "--dry-run"], env=env, capture_output=True, text=True, timeout=600)


def stage_statuses(out: Path) -> dict[str, int]:
    return {name: int(status) for name, status, _ in (line.split() for line in (out / "stages.txt").read_text().splitlines())}


@pytest.mark.slow
def test_dry_run_runs_every_stage_and_summarises_them(tmp_path):
    result = run_check(tmp_path, sys.executable)
    assert result.returncode == 0, result.stdout + result.stderr
    assert stage_statuses(tmp_path) == dict.fromkeys(STAGES, 0)
    summary = (tmp_path / "summary.txt").read_text().splitlines()
    assert summary[0].startswith("device: ") and summary[2].startswith("versions: torch ")
    assert "SKIP gpu_tests: 0 passed, 0 failed" in "\n".join(summary), "the GPU tests were collected and skipped on CPU"
    assert any(line.startswith("scan native L=20 batch 1: fwd ") for line in summary)
    assert any(line.startswith("RATIO test_vim vs test_vit at 32 px inference: ") for line in summary)
    assert any(line.startswith("RATIO test_vim vs test_vit training at 32 px: ") for line in summary)
    assert any(line.startswith("RATIO cross scan stage 3 (14x14, dim 384) native: one launch ") for line in summary)
    for ours in ("test_vmamba", "test_mambavision"):
        for mode in ("inference", "training"):
            assert any(line.startswith(f"RATIO {ours} vs test_vit {mode} at 32 px: ") for line in summary), (ours, mode)
    scan = json.loads((tmp_path / "scan_cpu.json").read_text())
    assert {(row["backend"], row["length"]) for row in scan["results"]} == {(b, L) for b in ("native", "torch") for L in (8, 20)}
    inference = json.loads((tmp_path / "models_inference.json").read_text())["results"]
    assert {(r["model"], r["status"]) for r in inference} == {("test_vim", "ok"), ("test_vit", "ok")}
    training = json.loads((tmp_path / "models_training.json").read_text())["results"]
    assert {(r["model"], r["batch"]) for r in training} == {("test_vim", 2), ("test_vit", 2)}
    assert (tmp_path / "gpu_tests.xml").exists() and (tmp_path / "gpu_tests.log").exists()


def test_a_failing_stage_is_recorded_and_the_next_ones_still_run(tmp_path):
    """A Python that fails every stage: each stage is still run and recorded, and the script says it failed."""
    result = run_check(tmp_path, "false")
    assert result.returncode == 1
    statuses = stage_statuses(tmp_path)
    assert list(statuses) == STAGES and all(statuses.values())
    assert (tmp_path / "summary.log").is_file()


def test_bad_arguments_are_refused_with_the_usage(tmp_path):
    result = subprocess.run(["bash", str(SCRIPT), str(tmp_path), "--dry"], capture_output=True, text=True)
    assert result.returncode == 2 and "usage: bash tools/gpu_check.sh OUTDIR [--dry-run]" in result.stderr
