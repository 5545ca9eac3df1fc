"""VMamba's four-direction scan: ``cross_selective_scan`` (one launch, every direction reading the grid in place, the
outputs summed in grid order) against what upstream VMamba does, a cross-scan into a copy, one scan over the
directions' stacked channels and a cross-merge.

    python tools/bench_cross_scan.py                                 # VMamba-T's stages 1 and 3 at 224 px, batch 8
    python tools/bench_cross_scan.py --backends torch --batch 1 --stages 3

Both sides run the same backend on the same inputs (u shared by the directions, per-direction delta / B / C in grid
order, as SS2D computes them) and give the same output; the copy-based side gathers u, delta, B and C into each
direction's step order first (``index_select`` along the tokens), scans the 4 x dim channels with B / C grouped per
direction, and adds the directions back in grid order. Forward and forward+backward, median seconds.

Writes ``benchmarks/cross_scan_<device>.{json,md}`` with the machine, versions, date and load.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from benchmark_report import machine, markdown_table, median_seconds, write_json, write_markdown

from vim.kernels import cross_selective_scan, selective_scan
from vim.kernels.scan_layout import CROSS_SCAN_ORDERS, step_tokens

STAGES = {1: (96, 56), 3: (384, 14)}
"""VMamba-T (ssm_ratio 1): a stage's inner width and grid side at 224 px."""
K = len(CROSS_SCAN_ORDERS)


def make_inputs(batch: int, dim: int, side: int, n_state: int, device: str) -> dict[str, torch.Tensor]:
    """SS2D-shaped inputs in grid order: u (B, D, L) shared, delta (K, B, D, L), A (K, D, N), B / C (K, B, N, L)."""
    length = side * side
    generator = torch.Generator().manual_seed(0)

    def rand(*shape, scale=0.5):
        return (torch.randn(*shape, generator=generator) * scale).to(device).requires_grad_()

    return dict(
        u=rand(batch, dim, length),
        delta=rand(K, batch, dim, length),
        A=(-torch.rand(K, dim, n_state, generator=generator) - 0.5).to(device).requires_grad_(),
        B=rand(K, batch, n_state, length),
        C=rand(K, batch, n_state, length),
        D=torch.ones(K, dim, device=device).requires_grad_(),
        delta_bias=torch.zeros(K, dim, device=device).requires_grad_(),
    )


def fused(inputs: dict, grid: tuple[int, int], backend: str) -> torch.Tensor:
    return cross_selective_scan(**inputs, grid=grid, backend=backend)


def copy_based(inputs: dict, grid: tuple[int, int], backend: str) -> torch.Tensor:
    """Upstream's way: cross-scan copies, one scan over K * D channels (B / C grouped by direction), cross-merge."""
    u, delta, B, C = inputs["u"], inputs["delta"], inputs["B"], inputs["C"]
    batch, dim, length = u.shape
    orders = [step_tokens(order, grid, u.device) for order in CROSS_SCAN_ORDERS]
    xs = torch.stack([u.index_select(-1, steps) for steps in orders], dim=1).view(batch, K * dim, length)
    deltas = torch.stack([delta[k].index_select(-1, steps) for k, steps in enumerate(orders)], dim=1)
    Bs = torch.stack([B[k].index_select(-1, steps) for k, steps in enumerate(orders)], dim=1)  # (B, K, N, L)
    Cs = torch.stack([C[k].index_select(-1, steps) for k, steps in enumerate(orders)], dim=1)
    y = selective_scan(
        xs, deltas.view(batch, K * dim, length), inputs["A"].flatten(0, 1), Bs, Cs, inputs["D"].flatten(),
        delta_bias=inputs["delta_bias"].flatten(), delta_softplus=True, backend=backend,
    ).view(batch, K, dim, length)  # fmt: skip
    return sum(y[:, k].index_select(-1, torch.argsort(steps)) for k, steps in enumerate(orders))


def time_case(call, inputs: dict, grid: tuple[int, int], backend: str, device: str) -> tuple[float, float]:
    def forward():
        with torch.no_grad():
            call(inputs, grid, backend)

    def forward_backward():
        call(inputs, grid, backend).sum().backward()

    return median_seconds(forward, device), median_seconds(forward_backward, device)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", type=int, nargs="+", choices=sorted(STAGES), default=sorted(STAGES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--state", type=int, default=1, help="N: 1 in VMamba's released v2 models")
    parser.add_argument("--backends", nargs="+", default=None, help="default: triton on a GPU, native and torch on CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("benchmarks"))
    args = parser.parse_args(argv)
    backends = args.backends or (["triton"] if args.device.startswith("cuda") else ["native", "torch"])
    records = []
    for stage in args.stages:
        dim, side = STAGES[stage]
        inputs = make_inputs(args.batch, dim, side, args.state, args.device)
        grid = (side, side)
        for backend in backends:
            with torch.no_grad():
                torch.testing.assert_close(fused(inputs, grid, backend), copy_based(inputs, grid, backend), rtol=1e-4, atol=1e-4)
            fused_times = time_case(fused, inputs, grid, backend, args.device)
            copy_times = time_case(copy_based, inputs, grid, backend, args.device)
            records.append(dict(
                stage=stage, dim=dim, grid=f"{side}x{side}", backend=backend,
                fused_forward_ms=1e3 * fused_times[0], copy_forward_ms=1e3 * copy_times[0],
                fused_forward_backward_ms=1e3 * fused_times[1], copy_forward_backward_ms=1e3 * copy_times[1],
                forward_speedup=copy_times[0] / fused_times[0], forward_backward_speedup=copy_times[1] / fused_times[1],
            ))  # fmt: skip
            print(records[-1], flush=True)
    env = dict(machine(args.device), batch=args.batch, state=args.state, directions=K)
    stem = args.out / f"cross_scan_{torch.device(args.device).type}"
    write_json(stem.with_suffix(".json"), meta=env, results=records)
    columns = ["stage", "dim", "grid", "backend", "fused fwd ms", "copy fwd ms", "fused fwd+bwd ms", "copy fwd+bwd ms",
               "fwd speed-up", "fwd+bwd speed-up"]  # fmt: skip
    rows = [
        [r["stage"], r["dim"], r["grid"], r["backend"], *(f"{r[k]:.2f}" for k in (
            "fused_forward_ms", "copy_forward_ms", "fused_forward_backward_ms", "copy_forward_backward_ms")),
         f"{r['forward_speedup']:.2f}x", f"{r['forward_backward_speedup']:.2f}x"]
        for r in records
    ]  # fmt: skip
    preamble = [f"Device: {env['device']} · load average {env['load_average']} · torch {env['torch']} · batch "
                f"{args.batch} · N {args.state} · {K} directions · median seconds · {env['date']}"]  # fmt: skip
    write_markdown(stem.with_suffix(".md"), "Four-direction scan: one launch vs cross-scan copies", preamble,
                   markdown_table(columns, rows))  # fmt: skip
    print(f"wrote {stem}.json and .md")


if __name__ == "__main__":
    main()
