"""Plot a run's loss, score and learning-rate curves from its Lightning ``metrics.csv`` into a PNG.

    python tools/plot_metrics.py runs/quickstart/latest/metrics.csv [--out curves.png]

Panels: every ``*loss`` column against the step; every score column (:data:`SCORES`: classification's ``acc1`` /
``acc5``, segmentation's ``mIoU`` / ``mAcc`` / ``aAcc``, detection's ``map`` / ``map_50`` / ``map_75`` /
``mask_map``) against the epoch, in percent; and, when the run logged it (``LearningRateMonitor``: ``lr-<optimizer>``
columns), the learning rate against the step. The PNG goes next to the CSV unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.figure import Figure

SCORES = ("acc1", "acc5", "mIoU", "mAcc", "aAcc", "/map", "map_50", "map_75", "mask_map")
"""The endings of the score columns a task logs (``val/acc1``, ``val_ema/mIoU``, ``val/map``, ...); a segmentation run's
per-class ``val/IoU/<class>`` columns are left out."""


def read_series(csv_path: Path) -> dict[str, list[tuple[float, float, float]]]:
    """``column -> [(step, epoch, value), ...]`` for every metric column with values (rows are sparse)."""
    with csv_path.open(newline="") as file:
        rows = list(csv.DictReader(file))
    if not rows or "step" not in rows[0]:
        raise ValueError(f"{csv_path}: not a Lightning metrics.csv (needs a header with a 'step' column and rows)")
    series = defaultdict(list)
    for row in rows:
        for column, value in row.items():
            if column not in ("step", "epoch") and value not in ("", None):
                series[column].append((float(row["step"]), float(row.get("epoch") or 0), float(value)))
    return dict(series)


def draw(series: dict[str, list[tuple[float, float, float]]]) -> Figure:
    """The figure of :func:`read_series`' columns: loss, accuracy and, when logged, learning-rate panels."""
    losses = {k: v for k, v in series.items() if k.endswith("loss")}
    accuracies = {k: v for k, v in series.items() if k.endswith(SCORES)}
    rates = {k: v for k, v in series.items() if k.startswith("lr-")}
    figure, panels = plt.subplots(1, 3 if rates else 2, figsize=(16 if rates else 11, 4))
    for name, points in sorted(losses.items()):
        panels[0].plot([p[0] for p in points], [p[2] for p in points], label=name)
    panels[0].set(xlabel="step", ylabel="loss", title="loss")
    for name, points in sorted(accuracies.items()):
        panels[1].plot([p[1] + 1 for p in points], [100 * p[2] for p in points], marker="o", label=name)
    panels[1].set(xlabel="epoch", ylabel="score (%)", title="validation scores")
    for name, points in sorted(rates.items()):
        panels[2].plot([p[0] for p in points], [p[2] for p in points], label=name)
    if rates:
        panels[2].set(xlabel="step", ylabel="learning rate", title="learning rate")
    for axes in panels:
        axes.grid(alpha=0.3)
        if axes.lines:
            axes.legend()
    figure.tight_layout()
    return figure


def plot_metrics(csv_path: str | Path, out: str | Path | None = None) -> Path:
    """Write the PNG of ``csv_path``'s curves and return its path."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise ValueError(f"metrics file '{csv_path}' does not exist")
    series = read_series(csv_path)
    if not any(k.endswith(("loss", *SCORES)) for k in series):
        raise ValueError(f"{csv_path}: no '*loss' or score ({', '.join(SCORES)}) columns; found {sorted(series)}")
    figure = draw(series)
    out = Path(out) if out is not None else csv_path.with_suffix(".png")
    figure.savefig(out, dpi=120)
    plt.close(figure)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Plot loss, score and learning-rate curves from a Lightning metrics.csv.")
    parser.add_argument("metrics_csv", help="e.g. runs/quickstart/latest/metrics.csv")
    parser.add_argument("--out", help="PNG path (default: next to the CSV)")
    args = parser.parse_args(argv)
    print(f"Wrote {plot_metrics(args.metrics_csv, args.out)}")


if __name__ == "__main__":
    main()
