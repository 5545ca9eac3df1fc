"""The fused residual add + RMSNorm / LayerNorm against the PyTorch modules a Mamba block runs.

The Triton kernels run in Triton's interpreter without CUDA (tiny shapes). Uninitialised memory is
filled with NaN, so an output element or a per-program sum the kernels forget to write shows up.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from vim.kernels import add_norm, add_norm_ref
from vim.kernels.add_norm import MAX_DIM

from support.grads import leaves, run_with_grads

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCES = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


pytestmark = pytest.mark.usefixtures("poison_uninitialized_memory")  # tests/conftest.py


@torch.no_grad()
def block_norm(hidden, residual, weight, bias, eps, norm):
    """What a block does, with the norm as the torch.nn module (a check of add_norm_ref, forward only)."""
    residual = (hidden if residual is None else residual + hidden).float()
    dim = hidden.shape[-1]
    if norm == "rms":
        module = torch.nn.RMSNorm(dim, eps=eps, device=DEVICE, dtype=weight.dtype)
    else:
        module = torch.nn.LayerNorm(dim, eps=eps, bias=bias is not None, device=DEVICE, dtype=weight.dtype)
    module.weight.copy_(weight)
    if bias is not None:
        module.bias.copy_(bias)
    return module(residual.to(weight.dtype)), residual


def add_norm_inputs(batch=2, length=5, dim=48, dtype=torch.float32, weight_dtype=None, residual=True, bias=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    weight_dtype = weight_dtype or dtype

    def rand(*shape, scale=1.0, shift=0.0, dtype=dtype):
        return (torch.randn(*shape, generator=gen) * scale + shift).to(DEVICE, dtype)

    return dict(
        hidden=rand(batch, length, dim),
        residual=rand(batch, length, dim, scale=2.0, dtype=torch.float32) if residual else None,
        weight=rand(dim, scale=0.2, shift=1.0, dtype=weight_dtype),
        bias=rand(dim, scale=0.2, dtype=weight_dtype) if bias else None,
    )


def assert_close_scaled(actual, expected, dtype, name):
    """Within the dtype's tolerance at the scale of the largest expected value (sums over rows grow)."""
    tol = TOLERANCES[dtype]
    scale = max(expected.abs().max().item(), 1.0)
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol["rtol"], atol=tol["atol"] * scale, msg=name)


def assert_matches(inputs: dict, norm: str, backend: str = "triton", used: tuple[bool, bool] = (True, True), seed: int = 1):
    """Outputs and gradients against add_norm_ref; ``used`` says which outputs get a gradient (normed, residual_out)."""
    gen = torch.Generator().manual_seed(seed)
    shape = inputs["hidden"].shape
    cotangents = (
        torch.randn(shape, generator=gen).to(DEVICE, inputs["weight"].dtype) if used[0] else None,
        torch.randn(shape, generator=gen).to(DEVICE) if used[1] else None,
    )

    def fused(**kw):
        return add_norm(**kw, eps=1e-5, norm=norm, backend=backend)

    (normed, residual), grads = run_with_grads(fused, leaves(inputs), cotangents)
    (ref_normed, ref_residual), ref_grads = run_with_grads(
        lambda **kw: add_norm_ref(**kw, eps=1e-5, norm=norm), leaves(inputs), cotangents
    )
    dtype = inputs["hidden"].dtype
    assert normed.dtype == inputs["weight"].dtype and residual.dtype == torch.float32
    assert_close_scaled(normed, ref_normed, dtype, "normed")
    torch.testing.assert_close(residual, ref_residual, rtol=0, atol=0)  # one float32 add, exactly
    for name, grad in grads.items():
        if ref_grads[name] is None:  # the input does not reach a used output
            assert grad is None, name
            continue
        assert grad.dtype == inputs[name].dtype, name
        assert_close_scaled(grad, ref_grads[name], dtype, f"d{name}")


@pytest.mark.parametrize(
    "dtype, residual, norm, dim",
    list(itertools.product([torch.float32, torch.bfloat16], [False, True], ["rms", "layer"], [48, 192])),
)
def test_triton_matches_block_ops_forward_and_backward(dtype, residual, norm, dim):
    inputs = add_norm_inputs(dim=dim, dtype=dtype, residual=residual, bias=norm == "layer", seed=dim)
    assert_matches(inputs, norm)


@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_mixed_precision_hidden_with_float32_weight(norm):
    """Autocast's arrangement: bf16 mixer output, fp32 stream and norm weight; an RMSNorm with a bias."""
    inputs = add_norm_inputs(dtype=torch.bfloat16, weight_dtype=torch.float32, bias=True)
    assert_matches(inputs, norm)


@pytest.mark.parametrize("used", [(True, False), (False, True)])
def test_many_rows_split_over_programs_and_one_output_used(used):
    """74 rows: several backward programs each sum their rows' weight gradients; only one output gets a gradient."""
    inputs = add_norm_inputs(batch=2, length=37, dim=48, bias=True)
    assert_matches(inputs, "layer", used=used)


def test_strided_inputs_and_gradients():
    inputs = add_norm_inputs(dim=48)
    inputs["hidden"] = inputs["hidden"].transpose(0, 1).contiguous().transpose(0, 1)
    inputs["residual"] = torch.cat([inputs["residual"], torch.full_like(inputs["residual"], float("nan"))], -1)[..., :48]
    shape = inputs["hidden"].shape
    cotangents = (torch.randn(shape[::-1]).to(DEVICE).permute(2, 1, 0), torch.randn(shape[::-1]).to(DEVICE).permute(2, 1, 0))
    outs, grads = run_with_grads(lambda **kw: add_norm(**kw, backend="triton"), leaves(inputs), cotangents)
    ref_outs, ref_grads = run_with_grads(lambda **kw: add_norm_ref(**kw), leaves(inputs), cotangents)
    for got, want in [*zip(outs, ref_outs), *((grads[k], ref_grads[k]) for k in grads)]:
        torch.testing.assert_close(got, want, **TOLERANCES[torch.float32])


def test_reference_is_the_block_arrangement():
    """add_norm_ref against the torch.nn modules (the tests above check the kernels against add_norm_ref)."""
    for norm, dtype in itertools.product(["rms", "layer"], [torch.float32, torch.bfloat16]):
        inputs = add_norm_inputs(dtype=dtype, bias=norm == "layer")
        for got, want in zip(add_norm_ref(**inputs, eps=1e-5, norm=norm), block_norm(**inputs, eps=1e-5, norm=norm)):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.skipif(DEVICE == "cuda", reason="checks the CPU dispatch")
def test_cpu_runs_the_pytorch_ops_unless_triton_is_asked(monkeypatch):
    monkeypatch.delenv("VIM_SCAN_BACKEND", raising=False)
    inputs = {k: v.requires_grad_() if v is not None else v for k, v in add_norm_inputs().items()}
    assert "add_norm" not in type(add_norm(**inputs)[0].grad_fn).__name__
    assert "add_norm" in type(add_norm(**inputs, backend="triton")[0].grad_fn).__name__
    wide = add_norm_inputs(dim=MAX_DIM + 1)
    wide = {k: v.requires_grad_() if v is not None else v for k, v in wide.items()}
    assert "add_norm" not in type(add_norm(**wide, backend="triton")[0].grad_fn).__name__, "too wide: PyTorch ops"


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_eps_none_is_rmsnorms_default(backend):
    inputs = add_norm_inputs(dtype=torch.bfloat16)
    inputs["hidden"], inputs["residual"] = inputs["hidden"] * 1e-3, inputs["residual"] * 1e-3  # eps matters at this scale
    module = torch.nn.RMSNorm(48, device=DEVICE, dtype=torch.bfloat16)  # eps None: finfo(bfloat16).eps
    with torch.no_grad():
        module.weight.copy_(inputs["weight"])
        normed, stream = add_norm(**inputs, eps=module.eps, backend=backend)
        assert_close_scaled(normed, module(stream.to(torch.bfloat16)), torch.bfloat16, "normed")


def test_custom_ops_trace_under_torch_compile():
    inputs = add_norm_inputs(dtype=torch.bfloat16, bias=True)
    torch.library.opcheck(torch.ops.vim.add_norm_fwd.default, (*leaves(inputs).values(), 1e-5, False))
    compiled = torch.compile(lambda **kw: add_norm(**kw, norm="layer", backend="triton"), fullgraph=True, backend="aot_eager")
    cotangents = (torch.randn(2, 5, 48).to(DEVICE, torch.bfloat16), torch.randn(2, 5, 48).to(DEVICE))
    outs, grads = run_with_grads(compiled, leaves(inputs), cotangents)
    ref_outs, ref_grads = run_with_grads(lambda **kw: add_norm(**kw, norm="layer", backend="triton"), leaves(inputs), cotangents)
    for got, want in [*zip(outs, ref_outs), *((grads[k], ref_grads[k]) for k in grads)]:
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(norm="batch"), r"unknown norm 'batch'; expected one of \('rms', 'layer'\)"),
        (dict(hidden=torch.zeros(5, 48)), r"hidden must be \(batch, L, dim\), got shape \(5, 48\)"),
        (dict(residual=torch.zeros(2, 4, 48)), r"residual has shape \(2, 4, 48\), hidden \(2, 5, 48\)"),
        (dict(residual=torch.zeros(2, 5, 48, dtype=torch.bfloat16)), r"residual must be the float32 residual stream.*bfloat16"),
        (dict(weight=torch.ones(47)), r"weight has shape \(47,\), expected \(48,\)"),
        (dict(bias=torch.ones(49)), r"bias has shape \(49,\), expected \(48,\)"),
        (dict(eps=None, norm="layer"), r"eps=None .* is for norm='rms'"),
    ],
)
def test_bad_input_raises_value_error_naming_it(change, message):
    inputs = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in add_norm_inputs().items()}
    with pytest.raises(ValueError, match=message):
        add_norm(**{**inputs, **change})
