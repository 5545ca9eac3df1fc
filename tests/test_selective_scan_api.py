"""The public selective-scan API: backend choice, and the contract every backend shares."""

from __future__ import annotations

import pytest
import torch

from vim.kernels import resolve_backend, scan_native, selective_scan, selective_scan_ref
from vim.kernels.selective_scan import _implementation


def test_auto_picks_triton_on_cuda_and_the_fused_or_chunked_path_on_cpu(monkeypatch):
    monkeypatch.delenv("VIM_SCAN_BACKEND", raising=False)
    assert resolve_backend(torch.device("cuda", 0)) == "triton"
    monkeypatch.setattr(scan_native, "_compiler", lambda: "/usr/bin/cc")
    assert resolve_backend(torch.device("cpu")) == "native"
    monkeypatch.setattr(scan_native, "_library", None)
    monkeypatch.setattr(scan_native, "_compiler", lambda: None)
    assert resolve_backend(torch.device("cpu")) == "torch"


def test_environment_variable_and_keyword_force_a_backend(monkeypatch):
    monkeypatch.setenv("VIM_SCAN_BACKEND", "reference")
    assert resolve_backend(torch.device("cpu")) == "reference"
    assert resolve_backend(torch.device("cpu"), "torch") == "torch"  # the keyword wins


def test_unknown_backend_is_rejected_with_the_choices(monkeypatch):
    monkeypatch.delenv("VIM_SCAN_BACKEND", raising=False)
    with pytest.raises(ValueError, match="unknown selective-scan backend 'cuda'.*'triton'"):
        resolve_backend(torch.device("cpu"), "cuda")


def test_triton_on_cpu_tensors_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="needs CUDA tensors.*TRITON_INTERPRET=1"):
        resolve_backend(torch.device("cpu"), "triton")


def _canonical_inputs(length: int, reverse_second: bool = True):
    """Two directions in the canonical form of scan_layout, float32."""
    g = torch.Generator().manual_seed(length)
    batch, dim, n_state = 2, 6, 3

    def rand(*shape):
        return torch.randn(*shape, generator=g)

    return dict(
        u=rand(2, batch, dim, length),
        delta=rand(2, batch, dim, length) * 0.5,
        A=-torch.rand(2, dim, n_state, generator=g) - 0.2,
        B=rand(2, batch, 1, n_state, length),
        C=rand(2, batch, 1, n_state, length),
        D=rand(2, dim),
        z=rand(batch, dim, length),
        delta_bias=rand(2, dim) * 0.1,
        delta_softplus=True,
        reverse=False,
    )


@pytest.mark.parametrize("length", [5, 70])
def test_backends_agree_on_checkpoints_and_accept_each_others(length):
    """Each backend's checkpoints equal the other's and feed the other's backward (the shared contract)."""
    args = _canonical_inputs(length)
    (tri_fwd, tri_bwd), (cpu_fwd, cpu_bwd) = _implementation("triton"), _implementation("torch")
    out_t, ckpt_t = tri_fwd(**args)
    out_c, ckpt_c = cpu_fwd(**args)
    torch.testing.assert_close(out_t, out_c, rtol=6e-4, atol=2e-3)
    torch.testing.assert_close(ckpt_t, ckpt_c, rtol=6e-4, atol=2e-3)

    dout = torch.randn_like(out_t)
    ordered = [args[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "delta_softplus", "reverse")]
    grads_own = tri_bwd(dout, *ordered, ckpt_t)
    grads_swapped = tri_bwd(dout, *ordered, ckpt_c)
    grads_cpu = cpu_bwd(dout, *ordered, ckpt_t)
    for own, swapped, cpu in zip(grads_own, grads_swapped, grads_cpu):
        torch.testing.assert_close(own, swapped, rtol=6e-4, atol=2e-3)
        torch.testing.assert_close(own, cpu, rtol=6e-4, atol=2e-3)


def test_reference_backend_is_the_sequential_definition():
    g = torch.Generator().manual_seed(0)
    u, delta, z = (torch.randn(1, 4, 9, generator=g, dtype=torch.float64) for _ in range(3))
    A = -torch.rand(4, 2, generator=g, dtype=torch.float64)
    B, C = (torch.randn(1, 2, 9, generator=g, dtype=torch.float64) for _ in range(2))
    out, last = selective_scan(u, delta, A, B, C, z=z, reverse=True, return_last_state=True, backend="reference")
    # hand-unrolled recurrence, last token first
    h = torch.zeros(1, 4, 2, dtype=torch.float64)
    expected = torch.empty_like(u)
    for t in reversed(range(9)):
        h = torch.exp(delta[..., t, None] * A) * h + (delta[..., t] * u[..., t])[..., None] * B[:, None, :, t]
        expected[..., t] = (h * C[:, None, :, t]).sum(-1) * torch.nn.functional.silu(z[..., t])
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(last, h.float())
    torch.testing.assert_close(out, selective_scan_ref(u, delta, A, B, C, z=z, reverse=True))
