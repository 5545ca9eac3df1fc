"""Benchmark the fused kernels of one Mamba block against the PyTorch ops they replace.

For one block of Vim-Ti (width 192, d_inner 384, a 4-tap conv, 197 tokens at 224 px) on this
machine's device it times, forward and forward+backward (median of repeated calls):

* conv + SiLU of both scan directions: the PyTorch ops (``F.conv1d`` and ``F.silu`` per direction,
  stacked; ``causal_conv1d_silu(backend="reference")``) against the fused kernel of the auto backend
  (the C kernel on CPU, Triton on CUDA), on ``x`` laid out as a mixer hands it over (the first half of
  the input projection's output);
* residual add + RMSNorm: the PyTorch ops (``add_norm_ref``) against the Triton kernel (CUDA only;
  on CPU the block keeps the PyTorch ops, and only they are timed).

Each fused row gives its speed-up and the time a whole model of ``--depth`` blocks saves. Writes
``benchmarks/block_<device>.json`` and ``.md`` with the machine, versions and date.

    python tools/bench_block.py                                  # Vim-Ti block, batch 8 on CPU / 64 on GPU
    python tools/bench_block.py --batch 2 --length 16 --dim 32 --out /tmp/bench   # a quick check
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from benchmark_report import bullet_list, machine, median_seconds, records_table, write_json, write_markdown
from tqdm import tqdm

from vim.kernels import add_norm, add_norm_ref, causal_conv1d_silu, resolve_backend


def conv_inputs(batch: int, length: int, d_inner: int, d_conv: int, dtype: torch.dtype, device: torch.device) -> dict:
    """x (B, L, d_inner) as the first half of a (B, L, 2 d_inner) projection; per-direction taps (C, 1, W) and biases."""
    projection = torch.randn(batch, length, 2 * d_inner, device=device, dtype=dtype)

    def param(*shape):
        return (0.5 * torch.randn(*shape, device=device)).requires_grad_()

    return dict(
        x=projection[..., :d_inner].requires_grad_(),
        weight=param(d_inner, 1, d_conv),
        bias=param(d_inner),
        weight_b=param(d_inner, 1, d_conv),
        bias_b=param(d_inner),
    )


def norm_inputs(batch: int, length: int, dim: int, dtype: torch.dtype, device: torch.device) -> dict:
    """The previous mixer's output in ``dtype``, the float32 stream, an RMSNorm weight."""
    return dict(
        hidden=torch.randn(batch, length, dim, device=device, dtype=dtype).requires_grad_(),
        residual=torch.randn(batch, length, dim, device=device).requires_grad_(),
        weight=torch.ones(dim, device=device).requires_grad_(),
    )


def cases(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[tuple[str, str, Callable, dict]]:
    """(operation, implementation, function, inputs) of every row."""
    d_inner = 2 * args.dim
    conv = conv_inputs(args.batch, args.length, d_inner, args.d_conv, dtype, device)
    norm = norm_inputs(args.batch, args.length, args.dim, dtype, device)
    fused_conv = resolve_backend(device)
    rows = [
        ("conv_silu", "pytorch", lambda **kw: causal_conv1d_silu(**kw, backend="reference"), conv),
        ("conv_silu", f"fused ({fused_conv})", lambda **kw: causal_conv1d_silu(**kw, backend=fused_conv), conv),
        ("add_norm", "pytorch", lambda **kw: add_norm_ref(**kw, eps=1e-5), norm),
    ]
    if device.type == "cuda":
        rows.append(("add_norm", "fused (triton)", lambda **kw: add_norm(**kw, eps=1e-5, backend="triton"), norm))
    return rows


def measure(fn, inputs: dict, device: torch.device, min_seconds: float) -> tuple[float, float]:
    """(forward ms, forward+backward ms); the backward reaches every input."""

    def forward():
        with torch.no_grad():
            fn(**inputs)

    def forward_backward():
        outputs = fn(**inputs)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        torch.autograd.backward(outputs, [torch.ones_like(o) for o in outputs])

    return median_seconds(forward, device, min_seconds, 200) * 1e3, median_seconds(
        forward_backward, device, min_seconds, 200
    ) * 1e3


def add_speedups(rows: list[dict], depth: int) -> None:
    """Each fused row's speed-up over the PyTorch ops, and the ms a model of ``depth`` blocks saves."""
    unfused = {row["operation"]: row for row in rows if row["implementation"] == "pytorch"}
    for row in rows:
        base = unfused[row["operation"]]
        if row is base:
            continue
        for phase in ("forward", "forward_backward"):
            row[f"{phase}_speedup"] = base[f"{phase}_ms"] / row[f"{phase}_ms"]
            row[f"{phase}_ms_saved_per_model"] = (base[f"{phase}_ms"] - row[f"{phase}_ms"]) * depth


def environment(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    """The machine (see :func:`benchmark_report.machine`), the block's shapes and the command."""
    return dict(
        machine(device),
        dtype=str(dtype),
        batch=args.batch,
        length=args.length,
        dim=args.dim,
        d_inner=2 * args.dim,
        d_conv=args.d_conv,
        depth=args.depth,
        command=" ".join(sys.argv),
    )


def write_results(folder: Path, device: torch.device, meta: dict, rows: list[dict]) -> Path:
    """JSON with everything and a Markdown table; returns the JSON's path."""
    stem = folder / f"block_{device.type}"
    write_json(stem.with_suffix(".json"), meta=meta, results=rows)
    title = f"Fused kernels of one Mamba block ({meta['device']})"
    print(write_markdown(stem.with_suffix(".md"), title, bullet_list(meta), records_table(rows)), end="")
    return stem.with_suffix(".json")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=None, help="default: 8 on CPU, 64 on GPU")
    parser.add_argument("--length", type=int, default=197, help="tokens: 197 for Vim at 224 px")
    parser.add_argument("--dim", type=int, default=192, help="block width (Vim-Ti); d_inner is twice that")
    parser.add_argument("--d-conv", type=int, default=4)
    parser.add_argument("--depth", type=int, default=24, help="blocks per model, for the time a model saves")
    parser.add_argument("--min-seconds", type=float, default=1.0, help="timing budget per measurement")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads); default: torch's")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--out", type=Path, default=Path("benchmarks"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args.batch = args.batch or (64 if device.type == "cuda" else 8)
    rows = []
    for operation, implementation, fn, inputs in tqdm(cases(args, device, dtype), desc="block kernels"):
        forward_ms, forward_backward_ms = measure(fn, inputs, device, args.min_seconds)
        rows.append(dict(operation=operation, implementation=implementation, forward_ms=forward_ms,
                         forward_backward_ms=forward_backward_ms))  # fmt: skip
    add_speedups(rows, args.depth)
    write_results(args.out, device, environment(args, device, dtype), rows)


if __name__ == "__main__":
    main()
