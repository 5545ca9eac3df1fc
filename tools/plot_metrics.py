"""Plot a run's loss and accuracy curves from its Lightning ``metrics.csv`` into a PNG.

    python tools/plot_metrics.py runs/quickstart/latest/metrics.csv [--out curves.png]

Left panel: every ``*loss`` column against the step; right panel: every ``*acc1`` / ``*acc5`` column
against the epoch (in percent). The PNG goes next to the CSV unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_series(csv_path: Path) -> dict[str, list[tuple[float, float, float]]]:
    """``column -> [(step, epoch, value), ...]`` for every metric column with values (rows are sparse)."""
    with open(csv_path, newline="") as file:
        rows = list(csv.DictReader(file))
    if not rows or "step" not in rows[0]:
        raise ValueError(f"{csv_path}: not a Lightning metrics.csv (needs a header with a 'step' column and rows)")
    series = defaultdict(list)
    for row in rows:
        for column, value in row.items():
            if column not in ("step", "epoch") and value not in ("", None):
                series[column].append((float(row["step"]), float(row.get("epoch") or 0), float(value)))
    return dict(series)


def plot_metrics(csv_path: str | Path, out: str | Path | None = None) -> Path:
    """Write the loss / accuracy PNG for ``csv_path`` and return its path."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise ValueError(f"metrics file '{csv_path}' does not exist")
    series = read_series(csv_path)
    losses = {k: v for k, v in series.items() if k.endswith("loss")}
    accuracies = {k: v for k, v in series.items() if k.endswith(("acc1", "acc5"))}
    if not losses and not accuracies:
        raise ValueError(f"{csv_path}: no '*loss' or '*acc1'/'*acc5' columns; found {sorted(series)}")
    figure, (loss_axes, acc_axes) = plt.subplots(1, 2, figsize=(11, 4))
    for name, points in sorted(losses.items()):
        loss_axes.plot([p[0] for p in points], [p[2] for p in points], label=name)
    loss_axes.set(xlabel="step", ylabel="loss", title="loss")
    for name, points in sorted(accuracies.items()):
        acc_axes.plot([p[1] + 1 for p in points], [100 * p[2] for p in points], marker="o", label=name)
    acc_axes.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for axes in (loss_axes, acc_axes):
        axes.grid(alpha=0.3)
        if axes.lines:
            axes.legend()
    out = Path(out) if out is not None else csv_path.with_suffix(".png")
    figure.tight_layout()
    figure.savefig(out, dpi=120)
    plt.close(figure)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Plot loss and accuracy curves from a Lightning metrics.csv.")
    parser.add_argument("metrics_csv", help="e.g. runs/quickstart/latest/metrics.csv")
    parser.add_argument("--out", help="PNG path (default: next to the CSV)")
    args = parser.parse_args(argv)
    print(f"Wrote {plot_metrics(args.metrics_csv, args.out)}")


if __name__ == "__main__":
    main()
