"""Selective-scan inputs laid out as a vision block makes them, and their outputs and gradients: what the kernel tests
(and the export tests' scan decomposition) share."""

from __future__ import annotations

import torch

from vim.kernels import selective_scan_ref

TOLERANCES = {torch.float32: dict(rtol=6e-4, atol=2e-3), torch.bfloat16: dict(rtol=3e-2, atol=5e-2)}
"""Float32 and bfloat16 tolerances of a fast scan against the float64 reference."""


def scan_inputs(
    batch=2, dim=8, state=4, length=16, groups=None, dtype=torch.float32, lead=(), decay=(0.5, 2.0), seed=0
) -> dict[str, torch.Tensor]:
    """Random scan inputs; u, delta and z channels-last like a vision block produces them."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    def channels_last(*shape, scale=1.0):
        return randn(*shape[:-2], shape[-1], shape[-2], scale=scale).transpose(-1, -2)

    low, high = decay
    params = torch.float64 if dtype == torch.float64 else torch.float32
    bc_shape = (*lead, batch, state, length) if groups is None else (*lead, batch, groups, state, length)
    return {
        "u": channels_last(*lead, batch, dim, length),
        "delta": channels_last(*lead, batch, dim, length, scale=0.5),
        "A": -(low + (high - low) * torch.rand(*lead, dim, state, generator=gen, dtype=torch.float64)).to(params),
        "B": randn(*bc_shape),
        "C": randn(*bc_shape),
        "D": randn(*lead, dim).to(params),
        "z": channels_last(batch, dim, length),
        "delta_bias": randn(*lead, dim, scale=0.5).to(params),
    }


def two_reference_scans(u, delta, A, B, C, D, z, delta_bias) -> torch.Tensor:
    """A bidirectional scan (inputs stacked on a leading axis of 2, softplus on) as two sequential reference scans."""
    return torch.stack([
        selective_scan_ref(u[k], delta[k], A[k], B[k], C[k], D[k], z, delta_bias[k], True, reverse=k == 1)
        for k in range(2)
    ])  # fmt: skip
