"""The public selective-scan API: backend choice, and the contract every backend shares."""

from __future__ import annotations

import importlib
import inspect
import warnings

import pytest
import torch

from vim.kernels import bidirectional_selective_scan, resolve_backend, scan_native, selective_scan, selective_scan_ref
from vim.kernels.selective_scan import _implementation

selective_scan_module = importlib.import_module("vim.kernels.selective_scan")  # the name alone is the function


def test_auto_picks_triton_on_cuda_and_the_fused_or_chunked_path_on_cpu(monkeypatch, tmp_path):
    monkeypatch.delenv("VIM_SCAN_BACKEND", raising=False)
    assert resolve_backend(torch.device("cuda", 0)) == "triton"
    monkeypatch.setattr(scan_native, "_compiler", lambda: "/usr/bin/cc")
    assert resolve_backend(torch.device("cpu")) == "native"
    monkeypatch.setattr(scan_native, "_library", None)
    monkeypatch.setattr(scan_native, "_compiler", lambda: None)
    monkeypatch.setenv("VIM_KERNEL_CACHE", str(tmp_path))  # and no library cached
    assert resolve_backend(torch.device("cpu")) == "torch"


def test_environment_variable_and_keyword_force_a_backend(monkeypatch):
    monkeypatch.setenv("VIM_SCAN_BACKEND", "reference")
    assert resolve_backend(torch.device("cpu")) == "reference"
    assert resolve_backend(torch.device("cpu"), "torch") == "torch"  # the keyword wins


def test_unknown_backend_is_rejected_with_the_choices(monkeypatch):
    monkeypatch.delenv("VIM_SCAN_BACKEND", raising=False)
    with pytest.raises(ValueError, match=r"unknown selective-scan backend 'cuda'.*'triton'"):
        resolve_backend(torch.device("cpu"), "cuda")


def test_triton_on_cpu_tensors_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=r"needs CUDA tensors.*TRITON_INTERPRET=1"):
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
    (tri_fwd, tri_bwd), (cpu_fwd, cpu_bwd) = (_implementation(name, torch.float32) for name in ("triton", "torch"))
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


# ---------------------------------------------------------------------------------------------
# mamba_ssm's calling convention
# ---------------------------------------------------------------------------------------------

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FAST_BACKENDS = ["torch", "native", "triton"]
"""Every backend with its own forward and backward: the chunked path, the fused C kernel and Triton (interpreter on CPU)."""


def test_signature_is_mamba_ssm_selective_scan_fn():
    """Positional order of mamba_ssm's selective_scan_fn; reverse and backend keyword-only."""
    parameters = inspect.signature(selective_scan).parameters.values()
    positional = [p.name for p in parameters if p.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD]
    assert positional == ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "delta_softplus", "return_last_state"]
    assert {p.name for p in parameters if p.kind == inspect.Parameter.KEYWORD_ONLY} == {"reverse", "backend"}


def _mamba_test_inputs(is_variable_B: bool, is_variable_C: bool, groups: int, seqlen: int = 16):
    """The inputs of mamba_ssm's tests/ops/test_selective_scan.py (float32, on our device), shapes and scales alike."""
    gen = torch.Generator().manual_seed(0)
    batch_size, dim, dstate = 2, 4, 8

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE)

    def state_input(variable: bool):
        if not variable:
            return randn(dim, dstate)
        return randn(batch_size, dstate, seqlen) if groups == 1 else randn(batch_size, groups, dstate, seqlen)

    return dict(
        u=randn(batch_size, dim, seqlen),
        delta=(0.5 * torch.rand(batch_size, dim, seqlen, generator=gen)).to(DEVICE),
        A=(-0.5 * torch.rand(dim, dstate, generator=gen)).to(DEVICE),
        B=state_input(is_variable_B),
        C=state_input(is_variable_C),
        D=randn(dim),
        z=randn(batch_size, dim, seqlen),
        delta_bias=(0.5 * torch.rand(dim, generator=gen)).to(DEVICE),
    )


def _reference_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus=False, return_last_state=False, reverse=False):
    """selective_scan_ref, with a time-invariant (dim, N) B or C spelled out as one group per channel."""

    def per_channel(x):
        return x[None, :, :, None].expand(u.shape[0], *x.shape, u.shape[-1]) if x.dim() == 2 else x

    return selective_scan_ref(
        u, delta, A, per_channel(B), per_channel(C), D, z, delta_bias, delta_softplus, reverse, return_last_state
    )


def _leaves(inputs: dict, dtype=None) -> dict:
    return {k: v.detach().clone().to(dtype or v.dtype).requires_grad_() for k, v in inputs.items()}


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize(
    "is_variable_B, is_variable_C, groups",
    [(True, True, 1), (True, True, 2), (False, True, 1), (True, False, 1), (False, False, 1)],
)
def test_called_as_mamba_ssm_test_calls_selective_scan_fn(is_variable_B, is_variable_C, groups, backend):
    """The call of mamba_ssm's own test (``out, *rest = selective_scan_fn(u, delta, A, B, C, D, z=z, ...)``),
    time-invariant (dim, N) B and C included, against the reference: output, last state and every gradient."""
    inputs = _mamba_test_inputs(is_variable_B, is_variable_C, groups)
    ours, ref = _leaves(inputs), _leaves(inputs, torch.float64)
    u, delta, A, B, C, D, z, delta_bias = ours.values()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VIM_SCAN_BACKEND", backend)
        out, *rest = selective_scan(
            u, delta, A, B, C, D, z=z,
            delta_bias=delta_bias, delta_softplus=True,
            return_last_state=True
        )  # fmt: skip
    out_ref, state_ref = _reference_scan(**ref, delta_softplus=True, return_last_state=True)
    tol = dict(rtol=6e-4, atol=2e-3)  # mamba_ssm's float32 tolerances
    torch.testing.assert_close(out.double(), out_ref, **tol)
    torch.testing.assert_close(rest[0].double(), state_ref, **tol)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    out.backward(dout)
    out_ref.backward(dout.double())
    for name in inputs:
        assert ours[name].grad.shape == inputs[name].shape, name
        torch.testing.assert_close(ours[name].grad.double(), ref[name].grad, **tol, msg=lambda m, n=name: f"d{n}: {m}")


def test_B_and_C_with_different_group_counts():
    """B in 2 groups and C in one (or time-invariant): both are read with one common grouping."""
    inputs = _mamba_test_inputs(True, True, 2)
    single = _mamba_test_inputs(True, True, 1)
    for C in (single["C"], single["A"].neg()):  # (batch, N, L), then time-invariant (dim, N)
        out = selective_scan(**{**inputs, "C": C}, delta_softplus=True, backend="torch")
        expected = _reference_scan(**{**inputs, "C": C}, delta_softplus=True)
        torch.testing.assert_close(out, expected, rtol=6e-4, atol=2e-3)


def test_all_positional_call_returns_the_last_state_of_a_forward_scan():
    """``selective_scan(u, delta, A, B, C, D, None, None, False, True)``: the tenth argument is return_last_state."""
    inputs = _mamba_test_inputs(True, True, 1)
    u, delta, A, B, C, D = (inputs[k] for k in ("u", "delta", "A", "B", "C", "D"))
    out, last = selective_scan(u, delta, A, B, C, D, None, None, False, True, backend="torch")
    expected, expected_last = _reference_scan(u, delta, A, B, C, D, None, None, return_last_state=True)
    torch.testing.assert_close(out, expected, rtol=6e-4, atol=2e-3)
    torch.testing.assert_close(last, expected_last, rtol=6e-4, atol=2e-3)


def test_time_invariant_B_and_C_in_the_bidirectional_call():
    """(2, dim, N) B and C with the bidirectional scan: each direction against its reference scan."""
    per_direction = [_mamba_test_inputs(False, False, 1) for _ in range(2)]
    per_direction[1] = {k: v.flip(0) if v.dim() > 1 else v + 0.1 for k, v in per_direction[1].items()}
    stacked = {k: torch.stack([d[k] for d in per_direction]) for k in ("u", "delta", "A", "B", "C", "D", "delta_bias")}
    z = per_direction[0]["z"]
    out = bidirectional_selective_scan(**stacked, z=z, delta_softplus=True, backend="torch")
    for k in range(2):
        expected = _reference_scan(**{n: x[k] for n, x in stacked.items()}, z=z, delta_softplus=True, reverse=k == 1)
        torch.testing.assert_close(out[k], expected, rtol=6e-4, atol=2e-3)


def test_complex_A_is_refused_naming_it():
    inputs = _mamba_test_inputs(False, False, 1)
    inputs["A"] = inputs["A"].to(torch.complex64)
    with pytest.raises(ValueError, match=r"complex A \(dtype torch.complex64, shape \(4, 8\)\) is not supported"):
        selective_scan(**inputs)


# ---------------------------------------------------------------------------------------------
# backend choice and its errors
# ---------------------------------------------------------------------------------------------


def _meta_inputs() -> dict:
    return {k: v.to("meta") for k, v in _mamba_test_inputs(True, True, 1).items()}


def test_native_backend_refuses_tensors_off_the_cpu(monkeypatch):
    """The C kernel would read device pointers as host memory: a ValueError names the device instead."""
    monkeypatch.delenv("VIM_SCAN_BACKEND", raising=False)
    with pytest.raises(ValueError, match=r"'native' \(the fused C kernel\) needs CPU tensors, got tensors on cuda:0"):
        resolve_backend(torch.device("cuda", 0), "native")
    with pytest.raises(ValueError, match="needs CPU tensors, got tensors on meta"):
        selective_scan(**_meta_inputs(), backend="native")
    monkeypatch.setenv("VIM_SCAN_BACKEND", "native")
    with pytest.raises(ValueError, match="needs CPU tensors, got tensors on meta"):
        selective_scan(**_meta_inputs())


def _forget_the_c_kernel(monkeypatch) -> None:
    """As in a fresh process: the C kernel not loaded, the compiler not yet looked up."""
    monkeypatch.delenv("VIM_SCAN_BACKEND", raising=False)
    monkeypatch.setattr(scan_native, "_library", None)
    monkeypatch.setattr(scan_native, "_unavailable", None)
    scan_native._find_compiler.cache_clear()
    scan_native._found_in_cache.cache_clear()


def test_no_c_compiler_warns_once_and_the_chunked_path_runs(monkeypatch, tmp_path):
    _forget_the_c_kernel(monkeypatch)
    monkeypatch.setenv("VIM_KERNEL_CACHE", str(tmp_path))  # and no library cached
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no cc, gcc or clang here
    with pytest.warns(UserWarning, match=r"no C compiler found \(cc, gcc or clang on \$PATH\).*chunked PyTorch path"):
        assert not scan_native.native_available()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_backend(torch.device("cpu")) == "torch"  # the lookup is not repeated, nor the warning
    scan_native._find_compiler.cache_clear()


def test_auto_is_resolved_when_the_op_runs_not_when_it_is_traced(monkeypatch):
    """A fullgraph trace with the default backend looks up no compiler (a file-system lookup Dynamo cannot trace);
    the op chooses when it runs, by the tensors' device: the C kernel here."""
    _forget_the_c_kernel(monkeypatch)
    inputs = _mamba_test_inputs(True, True, 1)
    torch._dynamo.reset()
    compiled = torch.compile(lambda **x: selective_scan(**x, delta_softplus=True), fullgraph=True, backend="eager")
    expected = _reference_scan(**inputs, delta_softplus=True)
    torch.testing.assert_close(compiled(**inputs), expected, rtol=6e-4, atol=2e-3)
    assert (scan_native._library is not None) == scan_native.native_available(), "the C kernel ran where it can be built"


def test_float64_takes_the_chunked_path_with_every_backend():
    """backend="triton" (and "native") with float64 inputs: float64 accuracy, as gradcheck sees it."""
    gen = torch.Generator().manual_seed(3)
    u, delta, z = (torch.randn(1, 2, 5, generator=gen, dtype=torch.float64).to(DEVICE) for _ in range(3))
    delta = delta * 0.5
    A = (-torch.rand(2, 2, generator=gen, dtype=torch.float64) - 0.5).to(DEVICE)
    B, C = (torch.randn(1, 2, 5, generator=gen, dtype=torch.float64).to(DEVICE) for _ in range(2))
    D = torch.randn(2, generator=gen, dtype=torch.float64).to(DEVICE)
    inputs = tuple(x.requires_grad_() for x in (u, delta, A, B, C, D, z))
    backends = ["triton", "native"] if DEVICE == "cpu" else ["triton"]
    for backend in backends:

        def scan(u, delta, A, B, C, D, z, backend=backend):
            return selective_scan(u, delta, A, B, C, D, z, None, True, backend=backend)

        assert torch.autograd.gradcheck(scan, inputs), backend


def test_empty_channel_axis_is_refused_naming_it():
    inputs = _mamba_test_inputs(True, True, 1)
    inputs = {**inputs, "u": inputs["u"][:, :0], "delta": inputs["delta"][:, :0], "z": None, "A": inputs["A"][:0]}
    inputs = {**inputs, "D": None, "delta_bias": None}
    with pytest.raises(ValueError, match=r"u has no channels \(dim = 0 in shape \(2, 0, 16\)\)"):
        selective_scan(**inputs, backend="torch")


def _dout_layouts(shape: tuple[int, int, int]) -> dict[str, torch.Tensor]:
    """The gradient of the output as autograd may hand it over: any strides, read in place by the kernels."""
    gen = torch.Generator().manual_seed(7)
    batch, dim, length = shape
    wide = torch.randn(batch, dim, 2 * length, generator=gen).to(DEVICE)
    return {
        "channels-last": torch.randn(batch, length, dim, generator=gen).to(DEVICE).transpose(1, 2),
        "contiguous": torch.randn(batch, dim, length, generator=gen).to(DEVICE),
        "strided in time": wide[..., ::2],
        "broadcast (out.sum())": torch.ones(1, 1, 1, device=DEVICE).expand(batch, dim, length),
    }


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_backward_reads_dout_in_place_in_any_layout(backend, monkeypatch):
    """dout reaches the backend with the strides autograd gave it (no channels-last copy), and every layout gives
    the reference's gradients."""
    monkeypatch.delenv("VIM_SCAN_BACKEND", raising=False)
    inputs = _mamba_test_inputs(True, True, 2, seqlen=8)
    received = []
    implementation = selective_scan_module._implementation

    def recording(name, dtype):
        forward, backward = implementation(name, dtype)

        def backward_recording(dout, *args, **kwargs):
            received.append(dout.stride())
            return backward(dout, *args, **kwargs)

        return forward, backward_recording

    monkeypatch.setattr(selective_scan_module, "_implementation", recording)
    for layout, dout in _dout_layouts(tuple(inputs["u"].shape)).items():
        ours, ref = _leaves(inputs), _leaves(inputs, torch.float64)
        selective_scan(**ours, delta_softplus=True, reverse=True, backend=backend).backward(dout)
        _reference_scan(**ref, delta_softplus=True, reverse=True).backward(dout.double())
        assert received.pop()[1:] == dout.stride(), f"{layout}: dout was copied"
        for name in inputs:
            torch.testing.assert_close(
                ours[name].grad.double(), ref[name].grad, rtol=6e-4, atol=2e-3, msg=lambda m, n=name, s=layout: f"{s}, d{n}: {m}"
            )
