"""The video decoding memory benchmark end to end on a tiny video: its files, not its numbers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from support.paths import REPO

TOOL = REPO / "tools" / "bench_video_decode.py"


@pytest.mark.slow
def test_bench_video_decode_compares_before_and_after(tmp_path):
    command = [sys.executable, str(TOOL), "--frames", "30", "--width", "64", "--height", "48", "--modes", "eval"]
    subprocess.run([*command, "--out", str(tmp_path / "decode")], check=True, capture_output=True, text=True)
    saved = json.loads((tmp_path / "decode.json").read_text())
    assert {"date", "machine", "pyav", "torch", "frames", "width", "height", "codec", "before"} <= saved["meta"].keys()
    assert (saved["meta"]["frames"], saved["meta"]["width"], saved["meta"]["height"]) == (30, 64, 48)
    rows = {(row["version"], row["mode"]): row for row in saved["results"]}
    assert rows.keys() == {("before", "eval"), ("after", "eval")}
    for row in rows.values():
        assert "error" not in row, row
        assert row["clip_shape"] == [3, 8, 48, 64] and row["added_peak_mib"] >= 0 and row["seconds"] > 0
    assert "| eval | " in (tmp_path / "decode.md").read_text()
