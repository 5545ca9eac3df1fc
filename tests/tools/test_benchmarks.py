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


@pytest.mark.slow
def test_bench_models_interleaves_rounds_and_reports_ratios(tmp_path):
    """Two rounds over a hierarchical family, one on the sequential scan, and a CNN without ``img_size``: each
    configuration's median round, every round's figure, and images/s over the baseline."""
    tool = REPO / "tools" / "bench_models.py"
    models = ["test_mambavision", "test_vmamba", "test_vmamba:reference", "resnet10t"]
    command = [sys.executable, str(tool), "--models", *models, "--sizes", "64", "--batch", "2", "--iters", "1"]
    command += ["--rounds", "2", "--baseline", "test_vmamba", "--same-process", "--out-dir", str(tmp_path), "--tag", "t"]
    subprocess.run(command, check=True, capture_output=True, text=True)
    saved = json.loads((tmp_path / "models_t.json").read_text())
    assert saved["environment"]["rounds"] == 2
    rows = {(r["model"], r["mode"]): r for r in saved["results"]}
    assert rows.keys() == {(m, mode) for m in models for mode in ("inference", "training")}
    for (_, mode), row in rows.items():
        assert row["status"] == "ok" and len(row["rounds_images_per_s"]) == 2
        assert row["images_per_s"] in row["rounds_images_per_s"]
        assert row["vs_baseline"] == pytest.approx(row["images_per_s"] / rows["test_vmamba", mode]["images_per_s"])
    assert "| vs test_vmamba |" in (tmp_path / "models_t.md").read_text().replace("  ", " ")


def test_bench_segmentation_times_both_upernets_in_interleaved_rounds(tmp_path):
    """Our UperNet on a Vim against smp's on a timm backbone (here a small Vim and a ResNet at 64 px, a narrow
    decoder): every round of each, and the ratio of their median images per second."""
    tool = REPO / "tools" / "bench_segmentation.py"
    command = [sys.executable, str(tool), "--vim", "test_vim", "--layers", "0", "1", "2", "3", "--other", "resnet18"]
    command += ["--vim-kwargs", '{"patch_size": 16, "stride": 16}']
    command += ["--size", "64", "--decoder-channels", "16", "--rounds", "2", "--min-seconds", "0", "--out", str(tmp_path)]
    subprocess.run(command, check=True, capture_output=True, text=True)
    saved = json.loads((tmp_path / "segmentation_cpu.json").read_text())
    vim_row, other_row = saved["results"]
    assert [vim_row["model"], other_row["model"]] == ["test_vim + UperNet", "resnet18 + UperNet (smp)"]
    assert len(vim_row["rounds"]) == len(other_row["rounds"]) == 2
    assert saved["vim_over_other"] == pytest.approx(vim_row["images_per_second"] / other_row["images_per_second"])
    assert "test_vim + UperNet runs at" in (tmp_path / "segmentation_cpu.md").read_text()


def test_check_quickstarts_reads_the_readme_table_and_checks_printed_scores():
    """The README's own table parses into its quickstarts, and a stated score is met only when each of its
    percentages is printed in the run's final line."""
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import check_quickstarts as tool
    finally:
        sys.path.remove(str(REPO / "tools"))
    rows = tool.readme_quickstarts((REPO / "README.md").read_text())
    assert rows[0].command == "vimkit fit --config configs/quickstart.yaml" and len(rows) >= 3
    assert all((REPO / config_of(row.command)).is_file() for row in rows)
    line = tool.final_score_line(
        "Finished 8 epochs.\nFinal validation accuracy of the EMA weights (...): top-1 94.2% top-5 99.7% "
        "(trained weights: top-1 95.0% top-5 99.7%)\n"
    )
    assert tool.score_met("95.0%, EMA 94.2%", line) and not tool.score_met("95.1%, EMA 94.2%", line)
    assert tool.score_met("mIoU 88.2%", "Final validation mIoU 88.2% (mAcc 95.9%, aAcc 98.1%) of the EMA weights")
    assert not tool.score_met("mIoU 88.2%", None) and not tool.score_met("no figure", line)
    assert tool.score_met("95.6%, EMA 94.2%", line, tolerance=1.0) and not tool.score_met("96.5%", line, tolerance=1.0)
    assert tool.minutes(62.4) == "1 min 2 s" and tool.minutes(41) == "41 s"


def config_of(command: str) -> str:
    words = command.split()
    return words[words.index("--config") + 1]


def test_profile_model_sums_categories_and_keeps_each_labelled_run(tmp_path):
    """A Vim and a CNN profiled under two labels: each step's time is split into the categories (the scan's and the
    conv's share present for the Vim only), and the second run's rows join the first's in one table and plot."""
    tool = REPO / "tools" / "profile_model.py"
    command = [sys.executable, str(tool), "--models", "test_vim", "resnet10t", "--size", "32", "--batch", "2"]
    command += ["--modes", "inference", "training", "--warmup", "1", "--steps", "1", "--out-dir", str(tmp_path)]
    for label in ("before", "after", "after"):  # a label run again replaces its rows
        subprocess.run([*command, "--label", label], check=True, capture_output=True, text=True)
    saved = json.loads((tmp_path / "profile_cpu.json").read_text())
    assert [run["label"] for run in saved["runs"]] == ["before", "after"]
    rows = {(r["label"], r["model"], r["mode"]): r["ms"] for r in saved["records"]}
    assert len(rows) == len(saved["records"]) == 8
    for (_, model, _), ms in rows.items():
        assert ms.keys() == {"selective scan", "conv + SiLU", "attention", "matrix products", "other"}
        assert (ms["selective scan"] > 0) == (model == "test_vim") and (ms["conv + SiLU"] > 0) == (model == "test_vim")
        assert ms["other"] > 0
    assert "| after | test_vim | training |" in (tmp_path / "profile_cpu.md").read_text()
    assert (tmp_path / "profile_cpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
