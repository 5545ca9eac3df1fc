"""Benchmark the selective scan: forward and forward+backward time per backend and sequence length.

Writes ``benchmarks/scan_<device>.json``, ``.md`` and ``.png`` (time against sequence length) with
the machine, versions and date. On a GPU it
also measures the device-to-device copy bandwidth and reports each Triton run as effective GB/s and
as a fraction of that roofline; if mamba_ssm is importable its CUDA ``selective_scan_fn`` is timed too.

    python tools/bench_scan.py                      # GPU: triton (+ mamba_ssm); CPU: native, torch, reference
    python tools/bench_scan.py --lengths 197 1024 --batch 2 --backends torch reference
    python tools/bench_scan.py --tokens 262144      # GPU default: each length's batch holds this many tokens
    python tools/bench_scan.py --replot benchmarks/scan_cpu.json   # redraw the plot of an earlier run
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from benchmark_report import bullet_list, machine, median_seconds, records_table, write_json, write_markdown
from tqdm import tqdm

from vim.kernels import bidirectional_selective_scan, selective_scan


def make_inputs(batch: int, dim: int, length: int, n_state: int, dtype: torch.dtype, device: str, directions: int = 1):
    """Vim-shaped inputs: channels-last u/delta/z (a (B, D, L) view of (B, L, D)), B/C (B, N, L)."""
    lead = (directions,) if directions > 1 else ()

    def channels_last(*shape):
        return torch.randn(*lead, batch, length, dim, device=device, dtype=dtype).transpose(-1, -2).mul_(0.5)

    return dict(
        u=channels_last().requires_grad_(),
        delta=channels_last().requires_grad_(),
        A=-torch.rand(*lead, dim, n_state, device=device).add_(0.5).requires_grad_(),
        B=torch.randn(*lead, batch, n_state, length, device=device, dtype=dtype).requires_grad_(),
        C=torch.randn(*lead, batch, n_state, length, device=device, dtype=dtype).requires_grad_(),
        D=torch.ones(*lead, dim, device=device).requires_grad_(),
        z=torch.randn(batch, length, dim, device=device, dtype=dtype).transpose(-1, -2).requires_grad_(),
        delta_bias=torch.zeros(*lead, dim, device=device).requires_grad_(),
    )


def copy_bandwidth(device: str) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = median_seconds(lambda: dst.copy_(src), device)
    return 2 * src.numel() / seconds / 1e9


def scan_bytes(batch: int, dim: int, length: int, n_state: int, itemsize: int, backward: bool) -> int:
    """Fewest bytes a scan must move: read u, delta, z, B, C once and write out (fwd); bwd adds dout in, 4 grads out."""
    tokens = batch * length
    forward = (4 * tokens * dim + 2 * tokens * n_state) * itemsize
    if not backward:
        return forward
    return forward + (4 * tokens * dim + 2 * tokens * n_state) * itemsize


def run_case(backend: str, inputs: dict, device: str, bidirectional: bool) -> tuple[float, float]:
    """(forward seconds, forward+backward seconds)."""
    if backend == "mamba_ssm":
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

        def call():
            return selective_scan_fn(**inputs, delta_softplus=True)
    elif bidirectional:

        def call():
            return bidirectional_selective_scan(**inputs, delta_softplus=True, backend=backend)
    else:

        def call():
            return selective_scan(**inputs, delta_softplus=True, backend=backend)

    def forward():
        with torch.no_grad():
            call()

    def forward_backward():
        call().float().sum().backward()

    return median_seconds(forward, device), median_seconds(forward_backward, device)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[197, 1024, 4096, 16384])
    parser.add_argument("--dim", type=int, default=768, help="d_inner of Vim-S")
    parser.add_argument("--state", type=int, default=16)
    parser.add_argument("--batch", type=int, default=None, help="one batch for every length (default on CPU: 1)")
    parser.add_argument(
        "--tokens", type=int, default=None, help="batch = ceil(tokens / L) at each length L (default on GPU: 2^18, fills an H100)"
    )
    parser.add_argument("--backends", nargs="+", default=None)
    parser.add_argument("--max-reference-length", type=int, default=1024, help="the sequential reference is slow")
    parser.add_argument("--out", type=Path, default=Path("benchmarks"))
    parser.add_argument("--replot", type=Path, default=None, help="only redraw the plot of this results JSON")
    args = parser.parse_args(argv)
    if args.replot:
        saved = json.loads(args.replot.read_text())
        plot(args.replot.with_suffix(".png"), saved["meta"], saved["results"])
        return

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.batch and args.tokens:
        parser.error("give --batch or --tokens, not both")
    tokens = args.tokens or (1 << 18 if device == "cuda" and not args.batch else None)

    def batch_for(length: int) -> int:
        return -(-tokens // length) if tokens else args.batch or 1

    default = ["triton", "triton-bidirectional", "mamba_ssm"] if device == "cuda" else ["native", "torch", "reference"]
    backends = args.backends or default
    if "mamba_ssm" in backends:
        try:
            import mamba_ssm  # noqa: F401
        except ImportError:
            backends.remove("mamba_ssm")
    roofline = copy_bandwidth(device) if device == "cuda" else None

    rows = []
    cases = [(b, L) for L in args.lengths for b in backends if not (b == "reference" and args.max_reference_length < L)]
    for backend, length in tqdm(cases, desc="selective scan"):
        batch = batch_for(length)
        bidirectional = backend.endswith("-bidirectional")
        inputs = make_inputs(batch, args.dim, length, args.state, dtype, device, directions=2 if bidirectional else 1)
        if backend == "mamba_ssm":
            inputs = {k: v.detach().contiguous().requires_grad_() for k, v in inputs.items()}
        fwd, fwd_bwd = run_case(backend.removesuffix("-bidirectional"), inputs, device, bidirectional)
        scans = 2 if bidirectional else 1
        itemsize = torch.finfo(dtype).bits // 8
        row = dict(backend=backend, length=length, batch=batch, forward_ms=fwd * 1e3, forward_backward_ms=fwd_bwd * 1e3)
        row["forward_GBps"] = scans * scan_bytes(batch, args.dim, length, args.state, itemsize, False) / fwd / 1e9
        row["forward_backward_GBps"] = scans * scan_bytes(batch, args.dim, length, args.state, itemsize, True) / fwd_bwd / 1e9
        if roofline:
            row["forward_roofline_fraction"] = row["forward_GBps"] / roofline
            row["forward_backward_roofline_fraction"] = row["forward_backward_GBps"] / roofline
        rows.append(row)
    add_speedups(rows)

    meta = dict(
        machine(device),
        dtype=str(dtype),
        batch=f"ceil({tokens} / L)" if tokens else batch_for(1),
        dim=args.dim,
        state=args.state,
        copy_bandwidth_GBps=roofline,
        note="bidirectional rows run two scans (forward + reversed) in one launch; GB/s counts both",
    )
    write_results(args.out, device, meta, rows)


def add_speedups(rows: list[dict]) -> None:
    """Add each row's speed-up over the sequential reference at the same length (where it was timed)."""
    reference = {row["length"]: row for row in rows if row["backend"] == "reference"}
    for row in rows:
        if row["length"] in reference:
            for phase in ("forward", "forward_backward"):
                row[f"{phase}_x_reference"] = reference[row["length"]][f"{phase}_ms"] / row[f"{phase}_ms"]


def write_results(folder: Path, device: str, meta: dict, rows: list[dict]) -> None:
    """JSON with everything, a Markdown table for people, and the plot."""
    stem = folder / f"scan_{device}"
    write_json(stem.with_suffix(".json"), meta=meta, results=rows)
    title = f"Selective scan benchmark ({meta['device']})"
    text = write_markdown(stem.with_suffix(".md"), title, bullet_list(meta), records_table(rows))
    plot(stem.with_suffix(".png"), meta, rows)
    print(text, end="")


def plot(path: Path, meta: dict, rows: list[dict]) -> None:
    """Forward and forward+backward time against sequence length, one line per backend, log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, phase in zip(axes, ("forward", "forward_backward")):
        for backend in dict.fromkeys(row["backend"] for row in rows):
            points = sorted((row["length"], row[f"{phase}_ms"]) for row in rows if row["backend"] == backend)
            ax.plot(*zip(*points), marker="o", label=backend)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(phase.replace("_", " + "))
        ax.set_xlabel("sequence length L")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("time (ms)")
    axes[0].legend()
    shape = f"dim {meta['dim']}, N {meta['state']}, batch {meta['batch']}, {meta['dtype']}"
    fig.suptitle(f"selective scan, {shape} · {meta['device']} · {meta['date'][:10]}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
