"""Throughput and peak memory of Vision Mamba against DeiT (or any timm model) across image resolutions.

Usage::

    python tools/bench_models.py                                   # GPU: Vim-Ti/S/B vs DeiT-Ti/S/B, 224 ... 1248 px
    python tools/bench_models.py --models vim_tiny_patch16_224 deit_tiny_patch16_224 --sizes 224 512 --batch 2 --iters 3
    python tools/bench_models.py --models vmamba_tiny_s1l8 mambavision_tiny swin_tiny_patch4_window7_224 convnext_tiny \
        --sizes 224 --batch 8 --rounds 3 --baseline swin_tiny_patch4_window7_224 --tag cpu_hierarchical

A model given as ``NAME:BACKEND`` runs its kernels on that backend (``vmamba_tiny_s1l8:reference``: the sequential
scan, what upstream VMamba falls back to on CPU). ``--rounds R`` measures the whole list R times, round after round
(so that a busy spell of a shared machine hits every model alike), and keeps each configuration's median round;
``--baseline`` adds each model's images/s over the baseline's at the same size and mode.

For every model and image size it measures inference (no grad) and training (forward, cross
entropy, backward, AdamW step) images/s (from the median step time, robust to a busy machine)
and the peak memory, each configuration in a fresh
process so that peaks do not leak between them (CUDA: ``max_memory_allocated``; CPU: the growth of
the process's peak resident set while the model runs). On CUDA the models run under autocast
(``--dtype``, bfloat16 by default); DeiT uses timm's fused SDPA attention. A configuration that
runs out of memory is recorded as OOM.

GPU options: ``--scale-batch`` gives images larger than 224 px proportionally fewer images per step
(``--batch`` is then the batch at 224 px); ``--fit-batch`` halves the batch after an out-of-memory error until it
fits; ``--same-process`` measures every configuration in this process (CUDA peaks come from
``max_memory_allocated`` after a reset, unaffected by earlier configurations; CPU peaks are then
not measured). Each result records the batch it ran with.

Writes ``benchmarks/models_<device>.{json,md,png}`` (``--out-dir``, ``--tag``) with the device,
the torch / triton / timm versions and the date; the PNG plots images/s and peak memory against
resolution on log scales.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from benchmark_report import create_model, machine, markdown_table, write_json, write_markdown

DEFAULT_MODELS = [
    "vim_tiny_patch16_224",
    "vim_small_patch16_224",
    "vim_base_patch16_224",
    "deit_tiny_patch16_224",
    "deit_small_patch16_224",
    "deit_base_patch16_224",
]
DEFAULT_SIZES = [224, 512, 738, 1024, 1248]
MODES = ("inference", "training")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure(
    model_name: str,
    size: int,
    mode: str,
    batch: int,
    warmup: int,
    iters: int,
    device: str,
    dtype: str,
    threads: int | None,
    fit_batch: bool = False,
    isolated: bool = True,
) -> dict:
    """Images/s and peak memory of one configuration (``isolated``: in a process of its own).

    With ``fit_batch`` an out-of-memory error on CUDA halves the batch and tries again, down to one image.
    """
    result = _measure(model_name, size, mode, batch, warmup, iters, device, dtype, threads, isolated)
    while fit_batch and result["status"] == "OOM" and batch > 1:
        torch.cuda.empty_cache()
        batch //= 2
        result = _measure(model_name, size, mode, batch, warmup, iters, device, dtype, threads, isolated)
    return result


def _measure(model_name, size, mode, batch, warmup, iters, device, dtype, threads, isolated) -> dict:

    dev = torch.device(device)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    baseline_rss = _peak_rss_bytes()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    try:
        model = create_model(model_name, size).to(dev)
        images = torch.randn(batch, 3, size, size, device=dev)
        labels = torch.randint(0, 1000, (batch,), device=dev)
        autocast = torch.autocast(dev.type, dtype=getattr(torch, dtype), enabled=dev.type == "cuda")
        if mode == "training":
            model.train()
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

            def step() -> None:
                with autocast:
                    loss = torch.nn.functional.cross_entropy(model(images), labels)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        else:
            model.eval()

            def step() -> None:
                with torch.no_grad(), autocast:
                    model(images)

        for _ in range(warmup):
            step()
        step_seconds = []
        for _ in range(iters):
            _sync(dev)
            start = time.perf_counter()
            step()
            _sync(dev)
            step_seconds.append(time.perf_counter() - start)
    except torch.cuda.OutOfMemoryError:
        return dict(model=model_name, size=size, mode=mode, batch=batch, status="OOM")
    peak: int | None = None  # CPU peaks are measured only in a process of their own
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev)
    elif isolated:
        peak = _peak_rss_bytes() - baseline_rss
    return dict(
        model=model_name,
        size=size,
        mode=mode,
        batch=batch,
        status="ok",
        images_per_s=batch / statistics.median(step_seconds),
        peak_memory_mib=None if peak is None else peak / 2**20,
        step_seconds=step_seconds,
    )


def _in_own_process(context, job: tuple) -> dict:
    """:func:`measure` of ``job`` in a fresh process, so that its peak memory is its own."""
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        try:
            return pool.submit(measure, *job).result()
        except concurrent.futures.process.BrokenProcessPool:  # killed, e.g. out of host memory
            model_name, size, mode, batch = job[:4]
            return dict(model=model_name, size=size, mode=mode, batch=batch, status="crashed")


def median_round(runs: list[dict]) -> dict:
    """The run of median images/s among one configuration's rounds, with every round's images/s beside it."""
    done = sorted((r for r in runs if r["status"] == "ok"), key=lambda r: r["images_per_s"])
    if not done:
        return runs[-1]
    return {**done[(len(done) - 1) // 2], "rounds_images_per_s": [r.get("images_per_s") for r in runs]}


def with_ratios(results: list[dict], baseline: str | None) -> list[dict]:
    """``results`` with ``vs_baseline``: images/s over the baseline model's at the same size and mode."""
    if baseline is None:
        return results
    reference = {(r["size"], r["mode"]): r.get("images_per_s") for r in results if r["model"] == baseline}
    out = []
    for r in results:
        base = reference.get((r["size"], r["mode"]))
        ratio = r["images_per_s"] / base if r["status"] == "ok" and base else None
        out.append({**r, "vs_baseline": ratio, "baseline": baseline})
    return out


def environment(device: str, args: argparse.Namespace) -> dict:
    """The machine (see :func:`benchmark_report.machine`), the scan backend and the run's settings."""
    from vim.kernels import resolve_backend

    dev = torch.device(device)
    threads = args.threads or torch.get_num_threads()
    return dict(
        machine(dev, threads),
        device_type=dev.type,
        threads=threads,
        scan_backend=resolve_backend(dev),
        batch=args.batch,
        warmup=args.warmup,
        iters=args.iters,
        rounds=args.rounds,
        dtype=args.dtype if dev.type == "cuda" else "float32",
    )


def write_markdown_table(path: Path, env: dict, results: list[dict]) -> None:
    """A table of images/s and peak memory per model, size and mode, under the device and settings."""
    settings = (
        f"Device: {env['device']} · load average {env['load_average']} at the start · "
        f"torch {env['torch']} · triton {env['triton']} · "
        f"timm {env['timm']} · scan backend `{env['scan_backend']}` · {env['dtype']} · batch {env['batch']} · "
        f"median of {env['iters']} timed steps after {env['warmup']} warm-up"
        f"{f', median of {rounds} interleaved rounds' if (rounds := env.get('rounds', 1)) > 1 else ''} · {env['date']}"
    )
    baseline = next((r["baseline"] for r in results if "baseline" in r), None)
    rows = []
    for r in results:
        first = [r["model"], r["size"], r["mode"], r.get("batch", env["batch"])]
        ratio = [] if baseline is None else ["-" if r.get("vs_baseline") is None else f"{r['vs_baseline']:.2f}"]
        if r["status"] == "ok":
            peak = "not measured" if r["peak_memory_mib"] is None else f"{r['peak_memory_mib']:.0f}"
            rows.append([*first, f"{r['images_per_s']:.2f}", *ratio, peak])
        else:
            rows.append([*first, r["status"], *ratio, r["status"]])
    ratio_column = [] if baseline is None else [f"vs {baseline}"]
    columns = ["model", "size", "mode", "batch", "images/s", *ratio_column, "peak memory (MiB)"]
    aligned = {"size", "batch", "images/s", "peak memory (MiB)", *ratio_column}
    table = markdown_table(columns, rows, right_aligned=aligned)
    write_markdown(path, "Vision Mamba against other timm models: throughput and peak memory", [settings], table)


def plot(path: Path, env: dict, results: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharex=True)
    models = sorted({r["model"] for r in results})
    sizes = sorted({r["size"] for r in results})
    for col, mode in enumerate(MODES):
        for row, (key, label) in enumerate((("images_per_s", "images / s"), ("peak_memory_mib", "peak memory (MiB)"))):
            ax = axes[row, col]
            for model in models:
                runs = [r for r in results if r["model"] == model and r["mode"] == mode and r["status"] == "ok" and r[key]]
                points = sorted((r["size"], r[key]) for r in runs)
                if points:
                    ax.plot(*zip(*points), marker="o", linestyle="--" if model.startswith("deit") else "-", label=model)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xticks(sizes, [str(size) for size in sizes])
            ax.minorticks_off()
            ax.set_title(f"{mode}: {label}")
            ax.set_xlabel("image size (px)")
            ax.grid(True, which="both", alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"{env['device']} · batch {env['batch']} · {env['dtype']} · {env['date'][:10]}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    parser.add_argument("--sizes", nargs="+", type=int, default=DEFAULT_SIZES)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--batch", type=int, default=None, help="images per step (default: 32 on CUDA, 1 on CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default: 3 on CUDA, 1 on CPU)")
    parser.add_argument("--iters", type=int, default=None, help="timed steps (default: 10 on CUDA, 2 on CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's); 1 is steadier on a shared machine")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"], help="CUDA autocast dtype")
    parser.add_argument("--scale-batch", action="store_true", help="--batch is for 224 px; larger images get fewer per step")
    parser.add_argument("--fit-batch", action="store_true", help="halve the batch after a CUDA out-of-memory error")
    parser.add_argument("--same-process", action="store_true", help="no process per configuration (CPU peaks unmeasured)")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parents[1] / "benchmarks")
    parser.add_argument("--tag", help="output file suffix (default: the device type)")
    parser.add_argument("--rounds", type=int, default=1, help="measure every configuration this many times, interleaved")
    parser.add_argument("--baseline", help="a model of --models: report each model's images/s over its")
    args = parser.parse_args(argv)
    on_cuda = torch.device(args.device).type == "cuda"
    args.batch = args.batch or (32 if on_cuda else 1)
    args.warmup = args.warmup if args.warmup is not None else (3 if on_cuda else 1)
    args.iters = args.iters or (10 if on_cuda else 2)
    if min(args.batch, args.iters, args.rounds, *args.sizes) < 1:
        parser.error("--batch, --iters, --rounds and --sizes must be positive")
    if args.baseline is not None and args.baseline not in args.models:
        parser.error(f"--baseline {args.baseline} is not one of --models")

    from tqdm import tqdm

    env = environment(args.device, args)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / f"models_{args.tag or torch.device(args.device).type}"
    configs = [(m, s, mode) for m in args.models for s in args.sizes for mode in args.modes]
    rounds: dict[tuple, list[dict]] = {config: [] for config in configs}
    context = multiprocessing.get_context("spawn")
    with tqdm(total=len(configs) * args.rounds, desc="benchmark", unit="config") as progress:
        for round_index in range(args.rounds):
            for model_name, size, mode in configs:
                progress.set_postfix_str(f"round {round_index + 1}: {model_name} {size}px {mode}")
                batch = max(1, args.batch * 224**2 // max(size, 224) ** 2) if args.scale_batch else args.batch
                job = (model_name, size, mode, batch, args.warmup, args.iters, args.device, args.dtype, args.threads,
                       args.fit_batch)  # fmt: skip
                result = measure(*job, isolated=False) if args.same_process else _in_own_process(context, job)
                rounds[(model_name, size, mode)].append(result)
                progress.update()
                # rewritten after every configuration, so an interrupted run keeps what it measured
                results = with_ratios([median_round(runs) for runs in rounds.values() if runs], args.baseline)
                write_json(stem.with_suffix(".json"), environment=env, results=results)
                write_markdown_table(stem.with_suffix(".md"), env, results)
    plot(stem.with_suffix(".png"), env, results)
    print(f"wrote {stem}.json, .md and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
