"""The CPU selective scans against the sequential reference.

Both CPU backends run here: the chunked PyTorch path (``backend="torch"``) and the fused C kernel (``"native"``).
"""

from __future__ import annotations

import pytest
import torch

from vim.kernels import bidirectional_selective_scan, scan_cpu, scan_native, selective_scan, selective_scan_ref
from vim.kernels.scan_layout import CHUNK_SIZE, num_chunks

from support.grads import assert_close_all, leaves, run_with_grads
from support.scans import TOLERANCES, scan_inputs, two_reference_scans

CASES = [
    # length, reverse, groups, with D / z / delta_bias, softplus
    (1, False, None, True, True),
    (1, True, 1, False, False),
    (7, False, None, False, True),
    (7, True, None, True, False),
    (64, False, 2, True, True),
    (64, True, None, False, False),
    (197, False, None, True, True),
    (197, True, 4, True, True),
    (300, False, 4, False, True),
    (300, True, None, True, False),
]


needs_compiler = pytest.mark.skipif(not scan_native.native_available(), reason="no C compiler to build the fused CPU scan")
CPU_BACKENDS = ["torch", pytest.param("native", marks=needs_compiler)]
"""The chunked PyTorch path and the fused C kernel: every CPU test below runs on both."""


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("length, reverse, groups, optional, softplus", CASES)
def test_forward_and_gradients_match_reference(dtype, length, reverse, groups, optional, softplus, backend):
    inputs = scan_inputs(length=length, groups=groups, dtype=dtype, seed=length)
    if not optional:
        inputs.update(D=None, z=None, delta_bias=None)
    if not softplus:  # keep the step size delta + delta_bias positive, as softplus would
        inputs["delta"] = inputs["delta"].abs()
        inputs["delta_bias"] = None if inputs["delta_bias"] is None else inputs["delta_bias"].abs()
    dout = torch.randn(2, 8, length, generator=torch.Generator().manual_seed(1)).to(dtype).double()

    def fast(**x):
        return selective_scan(**x, delta_softplus=softplus, reverse=reverse, backend=backend)

    def reference(**x):
        return selective_scan_ref(**x, delta_softplus=softplus, reverse=reverse)

    out, grads = run_with_grads(fast, leaves(inputs), dout)
    ref_out, ref_grads = run_with_grads(reference, leaves(inputs, torch.float64), dout)
    assert out.dtype == dtype and out.stride(1) == 1, "output must be channels-last in the input dtype"
    torch.testing.assert_close(out.double(), ref_out, **TOLERANCES[dtype])
    for name, grad in grads.items():
        assert grad.dtype == inputs[name].dtype, name
        torch.testing.assert_close(grad.double(), ref_grads[name], **TOLERANCES[dtype], msg=lambda m, n=name: f"d{n}: {m}")


def test_float16_forward_matches_reference():
    inputs = scan_inputs(length=50, dtype=torch.float16)
    out = selective_scan(**inputs, delta_softplus=True, backend="torch")
    expected = selective_scan_ref(**{k: v.double() for k, v in inputs.items()}, delta_softplus=True)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.double(), expected, rtol=1e-2, atol=2e-2)


@pytest.mark.parametrize("reverse", [False, True])
def test_gradcheck_float64(reverse):
    inputs = leaves(scan_inputs(batch=1, dim=4, state=3, length=11, groups=2, dtype=torch.float64))

    def fn(u, delta, A, B, C, D, z, delta_bias):
        return selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True, reverse=reverse, backend="torch")

    assert torch.autograd.gradcheck(fn, tuple(inputs.values()), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_float64_gradients_are_float64_exact(backend):
    """float64 takes the chunked path whatever the backend: every gradient, A's, D's and delta_bias's included, in
    float64 and as exact as autograd through the sequential reference (float32 rounding would miss by ~1e-8)."""
    inputs = scan_inputs(batch=2, dim=4, state=3, length=70, groups=2, dtype=torch.float64)
    dout = torch.randn(2, 4, 70, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    out, grads = run_with_grads(lambda **x: selective_scan(**x, delta_softplus=True, backend=backend), leaves(inputs), dout)
    ref_out, ref_grads = run_with_grads(lambda **x: selective_scan_ref(**x, delta_softplus=True), leaves(inputs), dout)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    for name, grad in grads.items():
        assert grad.dtype == torch.float64, name
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-11, atol=1e-12, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bidirectional_matches_two_reference_scans(backend):
    inputs = scan_inputs(state=64, length=90, groups=2, lead=(2,))  # N at its maximum, 64
    dout = torch.randn(2, 2, 8, 90, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    out, grads = run_with_grads(
        lambda **x: bidirectional_selective_scan(**x, delta_softplus=True, backend=backend), leaves(inputs), dout
    )
    ref_out, ref_grads = run_with_grads(two_reference_scans, leaves(inputs, torch.float64), dout)
    torch.testing.assert_close(out.double(), ref_out, **TOLERANCES[torch.float32])
    assert_close_all(grads, ref_grads, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reverse", [False, True])
def test_long_sequence_with_fast_and_slow_decay_is_stable(reverse, backend):
    """L = 4096 with delta*|A| up to ~60 on half the states and ~1e-4 on the others: no underflow tricks.

    B and C get no gradient here: the reference's per-step autograd makes them quadratic in L
    (their formulas are covered at shorter lengths above).
    """
    inputs = scan_inputs(batch=1, dim=4, state=4, length=4096, seed=7)
    inputs["A"][:, :2] *= 20.0
    inputs["A"][:, 2:] *= 1e-4
    dout = torch.randn(1, 4, 4096, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def without_bc_grads(x: dict) -> dict:
        return {**x, "B": x["B"].detach(), "C": x["C"].detach()}

    def fast(**x):
        return selective_scan(**x, delta_softplus=True, reverse=reverse, backend=backend)

    def reference(**x):
        return selective_scan_ref(**x, delta_softplus=True, reverse=reverse)

    out, grads = run_with_grads(fast, without_bc_grads(leaves(inputs)), dout)
    ref_out, ref_grads = run_with_grads(reference, without_bc_grads(leaves(inputs, torch.float64)), dout)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads.values())
    torch.testing.assert_close(out.double(), ref_out, **TOLERANCES[torch.float32])
    assert_close_all(grads, ref_grads, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reverse", [False, True])
def test_checkpoints_hold_the_state_at_each_chunk_end(reverse, backend):
    length = 2 * CHUNK_SIZE + 13
    x = scan_inputs(length=length, groups=2, seed=5)
    canonical = (
        x["u"][None], x["delta"][None], x["A"][None], x["B"][None], x["C"][None], x["D"][None], x["z"],
        x["delta_bias"][None], True, reverse,
    )  # fmt: skip
    forward = scan_cpu.chunked_forward if backend == "torch" else scan_native.native_forward
    out, checkpoints = forward(*canonical)
    ref_out, last, states = selective_scan_ref(
        **{k: v.double() for k, v in x.items()},
        delta_softplus=True,
        reverse=reverse,
        return_last_state=True,
        return_all_states=True,
    )
    assert checkpoints.shape == (1, 2, num_chunks(length), 8, 4) and checkpoints.dtype == torch.float32
    ends = [min((j + 1) * CHUNK_SIZE, length) - 1 for j in range(num_chunks(length))]
    times = [length - 1 - s for s in ends] if reverse else ends
    torch.testing.assert_close(checkpoints[0].double(), states[:, :, times].transpose(1, 2), rtol=6e-4, atol=2e-3)
    torch.testing.assert_close(out[0].double(), ref_out, rtol=6e-4, atol=2e-3)
    _, public_last = selective_scan(**x, delta_softplus=True, reverse=reverse, return_last_state=True, backend=backend)
    torch.testing.assert_close(public_last.double(), last, rtol=6e-4, atol=2e-3)


def test_batch_slices_give_the_same_result(monkeypatch):
    """Inputs too big for one slice are processed in pieces of the batch: same values and gradients."""
    inputs = scan_inputs(batch=3, length=40, lead=(2,))
    dout = torch.randn(2, 3, 8, 40, generator=torch.Generator().manual_seed(4), dtype=torch.float64)

    def fn(**x):
        return bidirectional_selective_scan(**x, delta_softplus=True, backend="torch")

    whole, whole_grads = run_with_grads(fn, leaves(inputs), dout)
    monkeypatch.setattr(scan_cpu, "SLICE_ELEMENTS", 1)
    assert len(scan_cpu._batch_slices(3, 40, 8, 4)) == 3
    sliced, sliced_grads = run_with_grads(fn, leaves(inputs), dout)
    torch.testing.assert_close(sliced, whole)
    assert_close_all(sliced_grads, whole_grads, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("reverse", [False, True])
def test_linear_recurrence_matches_a_loop(reverse):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 12, 3, generator=gen, dtype=torch.float64)
    m = torch.rand(2, 12, 3, generator=gen, dtype=torch.float64)
    m[:, 5] = 0.0
    expected = x.clone()
    order = range(10, -1, -1) if reverse else range(1, 12)
    for t in order:
        expected[:, t] += m[:, t] * expected[:, t + 1 if reverse else t - 1]
    torch.testing.assert_close(scan_cpu.linear_recurrence_(x.clone(), m, 4, reverse), expected)


def test_torch_compile_matches_eager():
    """fullgraph compile: the forward and (through AOT autograd) the backward custom op are traced."""
    inputs = scan_inputs(length=70, groups=2)
    dout = torch.randn(2, 8, 70, generator=torch.Generator().manual_seed(6), dtype=torch.float64)

    def scan(**x):
        return selective_scan(**x, delta_softplus=True, reverse=True, backend="torch")

    compiled = torch.compile(scan, fullgraph=True, backend="aot_eager")
    out, grads = run_with_grads(scan, leaves(inputs), dout)
    compiled_out, compiled_grads = run_with_grads(compiled, leaves(inputs), dout)
    torch.testing.assert_close(compiled_out, out)
    assert_close_all(compiled_grads, grads, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(delta=torch.zeros(2, 8, 15)), r"delta has shape \(2, 8, 15\), expected \(2, 8, 16\)"),
        (dict(B=torch.zeros(2, 4, 9)), r"B has shape \(2, (1, )?4, 9\)"),
        (dict(B=torch.zeros(2, 3, 4, 16)), r"B has shape \(2, 3, 4, 16\).*dim 8 divisible by G"),
        (dict(D=torch.zeros(7)), r"D has shape \(7,\), expected \(8,\)"),
        (dict(z=torch.zeros(2, 8, 17)), r"z has shape \(2, 8, 17\)"),
        (dict(A=torch.zeros(8, 4, dtype=torch.float16)), r"A must be float32.*float16 with shape \(8, 4\)"),
        (dict(A=torch.zeros(8, 65), B=torch.zeros(2, 65, 16), C=torch.zeros(2, 65, 16)), r"N = 65 .*\(8, 65\)"),
    ],
)
def test_bad_input_raises_value_error_naming_it(change, message):
    inputs = {**scan_inputs(), **change}
    with pytest.raises(ValueError, match=message):
        selective_scan(**inputs, backend="torch")


@pytest.mark.parametrize(
    "name, message",
    [
        ("u", r"u must be \(2, batch, dim, L\), got shape \(1, 2, 8, 16\)"),
        ("A", r"A has shape \(1, 8, 4\), expected \(2, 8, 'N'\)"),
    ],
)
def test_bidirectional_input_must_hold_two_directions(name, message):
    """One direction where two are expected is an error, not a silent single scan or a read past A's end."""
    inputs = scan_inputs(lead=(2,))
    inputs[name] = inputs[name][:1]
    with pytest.raises(ValueError, match=message):
        bidirectional_selective_scan(**inputs, delta_softplus=True, backend="torch")
