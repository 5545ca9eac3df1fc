"""Where a model's CPU time goes: the selective scan, the conv + SiLU, matrix products, attention and the rest.

Profiles steps of each model with ``torch.profiler`` (after warm-up steps) and sums the operators' self time into
those categories, per step. Run it again with another ``--label`` (another version of the kernels, another machine)
and the new rows join the file's earlier ones, so one table and one plot hold a before and an after::

    python tools/profile_model.py --models vim_tiny_patch16_224 deit_tiny_patch16_224 --modes inference training \\
        --batch 8 --threads 2 --label "after"

Writes ``benchmarks/profile_<tag>.{json,md,png}`` (``--out-dir``, ``--tag``; default tag ``cpu``), each run with its
machine, versions, date and load. The step times here are under the profiler; ``tools/bench_models.py`` measures
throughput.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from benchmark_report import create_model, machine, markdown_table, write_json, write_markdown
from tqdm.auto import tqdm

CATEGORIES: dict[str, Callable[[str], bool]] = {
    "selective scan": lambda name: "selective_scan" in name,
    "conv + SiLU": lambda name: "conv1d_silu" in name,
    "attention": lambda name: "scaled_dot_product" in name or "softmax" in name,
    "matrix products": lambda name: name.split("::")[-1] in {"mm", "bmm", "addmm", "baddbmm", "matmul", "linear"},
}
"""Operator name -> category, the first that matches; the rest is "other"."""


def category(name: str) -> str:
    return next((label for label, matches in CATEGORIES.items() if matches(name)), "other")


def step_function(model_name: str, size: int, batch: int, mode: str) -> Callable[[], object]:
    """One inference forward (no grad) or one training step (forward, cross-entropy, backward) of a fresh model."""
    model = create_model(model_name, size)
    images = torch.randn(batch, 3, size, size)
    if mode == "inference":
        model.eval()

        def step() -> object:
            with torch.no_grad():
                return model(images)

        return step
    model.train()
    labels = torch.randint(0, 1000, (batch,))

    def train_step() -> object:
        model.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        return loss

    return train_step


def profile(step: Callable[[], object], warmup: int, steps: int) -> dict[str, float]:
    """Milliseconds per step in each category (self time of the operators, summed)."""
    for _ in range(warmup):
        step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    totals = dict.fromkeys([*CATEGORIES, "other"], 0.0)
    for event in prof.key_averages():
        totals[category(event.key)] += event.self_cpu_time_total / 1e3 / steps
    return totals


def row(record: dict) -> list[object]:
    total = sum(record["ms"].values())
    shares = [f"{record['ms'][label]:.1f} ({record['ms'][label] / total:.0%})" for label in record["ms"]]
    return [record["label"], record["model"], record["mode"], record["size"], record["batch"], f"{total:.1f}", *shares]


def plot(path: Path, records: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['label']}: {r['model']} {r['mode']} {r['size']}px b{r['batch']}" for r in records]
    fig, ax = plt.subplots(figsize=(10, 0.5 * len(records) + 1.5))
    left = [0.0] * len(records)
    for name in [*CATEGORIES, "other"]:
        widths = [r["ms"][name] for r in records]
        ax.barh(labels, widths, left=left, label=name)
        left = [a + b for a, b in zip(left, widths)]
    ax.invert_yaxis()
    ax.set_xlabel("ms per step (operators' self time under the profiler)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["vim_tiny_patch16_224", "deit_tiny_patch16_224"])
    parser.add_argument("--modes", nargs="+", choices=("inference", "training"), default=["inference"])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--label", default="run", help="names this run's rows (rows of another label are kept)")
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks"))
    parser.add_argument("--tag", default="cpu")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    stem = args.out_dir / f"profile_{args.tag}"
    earlier = json.loads(stem.with_suffix(".json").read_text()) if stem.with_suffix(".json").exists() else {}
    runs = [run for run in earlier.get("runs", []) if run["label"] != args.label]
    records = [r for r in earlier.get("records", []) if r["label"] != args.label]
    runs.append({"label": args.label, **machine("cpu")})
    configurations = [(model, mode) for mode in args.modes for model in args.models]
    for model, mode in tqdm(configurations, desc="profile", unit="config"):
        ms = profile(step_function(model, args.size, args.batch, mode), args.warmup, args.steps)
        records.append(dict(label=args.label, model=model, mode=mode, size=args.size, batch=args.batch, ms=ms))

    write_json(stem.with_suffix(".json"), runs=runs, records=records)
    columns = ["label", "model", "mode", "size", "batch", "ms/step", *(f"{c} ms (share)" for c in [*CATEGORIES, "other"])]
    preamble = [f"- {run['label']}: {run['device']} · load average {run['load_average']} at the start · torch "
                f"{run['torch']} · timm {run['timm']} · {run['date']}" for run in runs]  # fmt: skip
    preamble += ["", "Self time of the operators under `torch.profiler`, per step, summed by category."]
    write_markdown(stem.with_suffix(".md"), "Where the CPU time goes", preamble, markdown_table(columns, map(row, records)))
    plot(stem.with_suffix(".png"), records)
    print(f"wrote {stem}.json, .md and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
