"""Inference speed and peak memory of VideoMamba against torchvision's video transformers, by clip length.

    python tools/bench_video.py                                   # GPU: tiny/small vs swin3d_t, mvit_v2_s at 8-64 frames
    python tools/bench_video.py --device cpu --models videomamba_tiny swin3d_t --frames 8 16 --img-size 112

Each (model, frame count) runs in a fresh subprocess (so peak memory is its own: CUDA's max allocated memory,
or the process's peak resident set on CPU): ``warmup`` forward passes, then ``iters`` timed ones under
``torch.inference_mode`` on random clips (B, 3, T, H, W). A configuration that fails (out of memory, a model
that cannot take that many frames) or exceeds ``--timeout`` is recorded with its reason. Writes
``benchmarks/video_<device>.{json,md,png}`` with the device, library versions and date.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from benchmark_report import machine, markdown_table, write_json, write_markdown
from tqdm import tqdm

TORCHVISION_MODELS = ("swin3d_t", "mvit_v2_s", "swin3d_s", "r3d_18")


def build(name: str, num_frames: int, img_size: int) -> torch.nn.Module:
    """A randomly initialised model for (3, num_frames, img_size, img_size) clips."""
    if name in TORCHVISION_MODELS:
        import torchvision.models.video as video_models

        return getattr(video_models, name)(weights=None)
    import timm

    import vim.models  # noqa: F401

    return timm.create_model(name, num_frames=num_frames, img_size=img_size)


def measure(name: str, num_frames: int, img_size: int, batch_size: int, device: str, warmup: int, iters: int) -> dict:
    """Clips per second and peak memory (MiB) of one configuration, in this process."""
    model = build(name, num_frames, img_size).to(device).eval()
    clips = torch.randn(batch_size, 3, num_frames, img_size, img_size, device=device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.inference_mode(), torch.autocast(device, dtype=dtype, enabled=device == "cuda"):
        for _ in range(warmup):
            model(clips)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(iters):
            model(clips)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if device == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    )
    return {
        "clips_per_s": batch_size * iters / seconds,
        "peak_mib": peak,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
    }


def run_isolated(args: argparse.Namespace, name: str, num_frames: int) -> dict:
    """:func:`measure` in a subprocess; a failure or timeout becomes ``{"error": ...}``."""
    command = [
        sys.executable,
        __file__,
        "--single",
        name,
        str(num_frames),
        "--device",
        args.device,
        "--img-size",
        str(args.img_size),
        "--batch-size",
        str(args.batch_size),
        "--warmup",
        str(args.warmup),
        "--iters",
        str(args.iters),
    ]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {args.timeout} s"}
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def environment(device: str) -> dict:
    """The machine (see :func:`benchmark_report.machine`): ``device`` is cuda or cpu, ``device_name`` what it is."""
    import torchvision

    described = machine(device)
    return {
        **described,
        "device": device,
        "device_name": described["device"],
        "cpu_threads": torch.get_num_threads(),
        "torchvision": torchvision.__version__,
    }


def write_reports(results: list[dict], meta: dict, out: Path) -> None:
    """``out``.json (everything), ``out``.md (a table) and ``out``.png (clips/s and memory against frames)."""
    write_json(out.with_suffix(".json"), meta=meta, results=results)
    settings = (
        f"{meta['date']}, torch {meta['torch']}, torchvision {meta['torchvision']}, timm {meta['timm']}; "
        f"batch {meta['batch_size']}, "
        f"{meta['img_size']} px, {meta['iters']} timed passes after {meta['warmup']} warm-up; "
        + ("bf16 autocast; peak = CUDA max allocated." if meta["device"] == "cuda" else "fp32; peak = process max RSS.")
    )
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["model"], r["frames"], "", r["error"], ""])
        else:
            rows.append([r["model"], r["frames"], f"{r['params_m']:.1f}", f"{r['clips_per_s']:.2f}", f"{r['peak_mib']:.0f}"])
    columns = ["model", "frames", "params (M)", "clips/s", "peak memory (MiB)"]
    table = markdown_table(columns, rows, right_aligned=columns[1:])
    title = f"Video backbones: inference speed and peak memory ({meta['device']}: {meta['device_name']})"
    write_markdown(out.with_suffix(".md"), title, [settings], table)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (speed, memory) = plt.subplots(1, 2, figsize=(11, 4))
    for model in dict.fromkeys(r["model"] for r in results):
        ok = [r for r in results if r["model"] == model and "error" not in r]
        speed.plot([r["frames"] for r in ok], [r["clips_per_s"] for r in ok], marker="o", label=model)
        memory.plot([r["frames"] for r in ok], [r["peak_mib"] for r in ok], marker="o", label=model)
    for axis, label in ((speed, "clips / s"), (memory, "peak memory (MiB)")):
        axis.set(xscale="log", yscale="log", xlabel="frames per clip", ylabel=label)
        axis.set_xticks(sorted({r["frames"] for r in results}), labels=[str(f) for f in sorted({r["frames"] for r in results})])
        axis.grid(True, alpha=0.3)
    speed.legend()
    figure.suptitle(f"{meta['device_name']} ({meta['device']}), batch {meta['batch_size']}, {meta['img_size']} px")
    figure.tight_layout()
    figure.savefig(out.with_suffix(".png"), dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["videomamba_tiny", "videomamba_small", "swin3d_t", "mvit_v2_s"])
    parser.add_argument("--frames", nargs="+", type=int, default=[8, 16, 32, 64])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per configuration")
    parser.add_argument("--out", default="benchmarks/video")
    parser.add_argument("--single", nargs=2, metavar=("MODEL", "FRAMES"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.single:
        name, frames = args.single[0], int(args.single[1])
        print(json.dumps(measure(name, frames, args.img_size, args.batch_size, args.device, args.warmup, args.iters)))
        return
    results = []
    configurations = [(m, f) for m in args.models for f in args.frames]
    for name, frames in tqdm(configurations, desc="benchmark"):
        results.append({"model": name, "frames": frames, **run_isolated(args, name, frames)})
        tqdm.write(json.dumps(results[-1]))
    meta = {**environment(args.device), **{k: getattr(args, k) for k in ("img_size", "batch_size", "warmup", "iters")}}
    write_reports(results, meta, Path(f"{args.out}_{args.device}"))
    print(f"wrote {args.out}_{args.device}.json / .md / .png")


if __name__ == "__main__":
    main()
