"""The fused depthwise causal conv + SiLU of both scan directions against an independent definition.

The definition here is a loop over the taps in float64 (shifted copies of x, no convolution op),
differentiated by autograd. Every backend ("native": the C kernel; "triton": in Triton's interpreter
without CUDA; "torch"; "reference") is checked against it, forward and backward, for the layout a
mixer hands over (x the first half of a (B, L, 2C) projection, the other half NaN, so a kernel that
reads past its channels fails). Uninitialised memory is filled with NaN, so an output element a
kernel forgets to write shows up. ``padding="same"`` (the centred conv) is checked the same way against a
centred loop, itself checked against ``F.conv1d(padding="same")``.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from vim.kernels import causal_conv1d_silu, causal_conv1d_silu_ref, conv_silu_native, scan_native
from vim.kernels.conv_silu_reference import reference_backward

from support.grads import leaves, run_with_grads
from support.native_builds import SIMD_LEVELS, use_build_for

TOLERANCES = {
    torch.float64: dict(rtol=1e-7, atol=1e-9),
    torch.float32: dict(rtol=1e-4, atol=1e-5),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}
CPU_BACKENDS = ["native", "torch", "reference"]
needs_compiler = pytest.mark.skipif(not scan_native.native_available(), reason="no C compiler to build the fused CPU kernels")


pytestmark = pytest.mark.usefixtures("poison_uninitialized_memory")  # tests/conftest.py


def shifted(x: torch.Tensor, shift: int) -> torch.Tensor:
    """``x[:, t + shift]`` at row t, zero where that row is outside the sequence; x (B, L, C)."""
    out, length = torch.zeros_like(x), x.shape[1]
    if abs(shift) < length:
        if shift >= 0:
            out[:, : length - shift] = x[:, shift:]
        else:
            out[:, -shift:] = x[:, : length + shift]
    return out


def loop_definition(x, weight, bias=None, weight_b=None, bias_b=None) -> torch.Tensor:
    """(K, B, L, C): silu of sum_i w[:, i] x[t - (W-1) + i] (+ b), and with weight_b of sum_i w_b[:, i] x[t + (W-1) - i]."""
    width = weight.shape[-1]
    directions = [(weight, bias, -1)] + ([] if weight_b is None else [(weight_b, bias_b, 1)])
    outputs = []
    for w, b, sign in directions:
        w = w.reshape(w.shape[0], width)
        pre = sum(w[:, i] * shifted(x, sign * (width - 1 - i)) for i in range(width))
        outputs.append(F.silu(pre if b is None else pre + b))
    return torch.stack(outputs)


def centred_loop_definition(x, weight, bias=None) -> torch.Tensor:
    """(1, B, L, C): silu of sum_i w[:, i] x[t - (W-1)//2 + i] (+ b), the taps centred on the token."""
    width = weight.shape[-1]
    w = weight.reshape(weight.shape[0], width)
    pre = sum(w[:, i] * shifted(x, i - (width - 1) // 2) for i in range(width))
    return F.silu(pre if bias is None else pre + bias)[None]


def conv_inputs(
    batch=2,
    length=11,
    channels=20,
    width=4,
    directions=2,
    bias=True,
    dtype=torch.float32,
    weight_dtype=None,
    seed=0,
    device="cpu",
):
    """x as a mixer makes it: the first half of a (B, L, 2C) buffer whose other half is NaN; taps (C, 1, W) like nn.Conv1d."""
    gen = torch.Generator().manual_seed(seed)
    wide = torch.cat(
        [torch.randn(batch, length, channels, generator=gen), torch.full((batch, length, channels), float("nan"))], -1
    )
    weight_dtype = weight_dtype or dtype

    def param(*shape):
        return (0.5 * torch.randn(*shape, generator=gen)).to(weight_dtype)

    inputs = dict(x=wide.to(dtype)[..., :channels], weight=param(channels, 1, width), bias=param(channels) if bias else None)
    if directions == 2:
        inputs |= dict(weight_b=param(channels, 1, width), bias_b=param(channels) if bias else None)
    return {k: None if v is None else v.to(device) for k, v in inputs.items()}


def device_of(backend: str) -> str:
    """Where a backend's tensors live: Triton's on the GPU if there is one (else in the interpreter on CPU)."""
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def expected_with_grads(inputs: dict, dout: torch.Tensor, definition=loop_definition):
    """The loop definition in float64 on the same (already rounded) values; x without its NaN half."""
    return run_with_grads(definition, leaves(inputs, torch.float64), dout.double())


def assert_matches_definition(fn, inputs: dict, seed: int = 1, definition=loop_definition):
    x = inputs["x"]
    directions = 1 if inputs.get("weight_b") is None else 2
    dout = torch.randn(directions, *x.shape, generator=torch.Generator().manual_seed(seed)).to(x.device, x.dtype)
    out, grads = run_with_grads(fn, leaves(inputs), dout)
    expected, expected_grads = expected_with_grads(inputs, dout, definition)
    assert out.shape == expected.shape and out.dtype == x.dtype
    # the centred conv gives back a view of the causal kernel's longer output: rows still channels-last
    assert out.is_contiguous() if definition is loop_definition else out.stride()[-2:] == (x.shape[-1], 1)
    torch.testing.assert_close(out.double(), expected, **TOLERANCES[x.dtype])
    for name, grad in grads.items():
        assert grad.dtype == inputs[name].dtype and grad.shape == inputs[name].shape, name
        # sums over B * L terms: compare at the scale of the largest gradient
        scale = expected_grads[name].abs().max().item()
        tol = TOLERANCES[x.dtype]
        torch.testing.assert_close(grad.double(), expected_grads[name], rtol=tol["rtol"], atol=tol["atol"] * max(scale, 1.0),
                                   msg=lambda m, n=name: f"d{n}: {m}")  # fmt: skip


def skip_unless_available(backend: str) -> None:
    if backend == "native" and not scan_native.native_available():
        pytest.skip("no C compiler to build the fused CPU kernels")
    if backend == "triton":
        pytest.importorskip("triton")


def backend_fn(backend: str):
    return lambda **kw: causal_conv1d_silu(**kw, backend=backend)


# ---------------------------------------------------------------------------------------------
# the definition itself
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [1, 3, 4, 9])
def test_reference_is_the_loop_definition_forward_and_backward(length):
    inputs = {k: None if v is None else v.double() for k, v in conv_inputs(length=length, width=4).items()}
    assert_matches_definition(causal_conv1d_silu_ref, inputs)


def grouped_conv_of_both_directions(x, weight, bias, weight_b, bias_b) -> torch.Tensor:
    """The mixer's unfused arrangement: one grouped conv whose group g maps channel g to (forward, flipped backward) taps."""
    channels, width = x.shape[-1], weight.shape[-1]
    taps = torch.stack([weight, weight_b.flip(-1)], dim=1).flatten(0, 1)  # (2C, 1, W)
    y = F.conv1d(x.transpose(1, 2), taps, torch.stack([bias, bias_b], dim=1).flatten(), padding=width - 1, groups=channels)
    y = y.unflatten(1, (channels, 2))
    return F.silu(torch.stack([y[:, :, 0, : x.shape[1]], y[:, :, 1, width - 1 :]]).transpose(-1, -2))


def test_reference_is_the_grouped_conv_of_both_directions():
    """A second, independent check: the grouped conv + stack a Vim mixer ran before the fused kernels."""
    inputs = {k: v.double() for k, v in conv_inputs(length=9).items()}
    inputs["x"] = inputs["x"].contiguous()
    torch.testing.assert_close(causal_conv1d_silu_ref(**inputs), grouped_conv_of_both_directions(**inputs))


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_centred_definition_is_pytorchs_same_padding(width):
    """The centred loop against PyTorch's own reading of padding="same" (its split of the W - 1 zeros)."""
    inputs = {k: v.double().contiguous() for k, v in conv_inputs(length=6, width=width, directions=1).items()}
    x, weight, bias = inputs["x"], inputs["weight"], inputs["bias"]
    expected = F.silu(F.conv1d(x.transpose(1, 2), weight, bias, padding="same", groups=x.shape[-1])).transpose(1, 2)
    torch.testing.assert_close(centred_loop_definition(**inputs)[0], expected)


def test_written_out_backward_is_autograd_of_the_definition():
    """The "torch" backend's backward (no autograd inside a custom op), for both directions and one."""
    for directions in (1, 2):
        inputs = {k: None if v is None else v.double() for k, v in conv_inputs(length=9, directions=directions).items()}
        dout = torch.randn(directions, 2, 9, 20, dtype=torch.float64)
        _, expected = expected_with_grads(inputs, dout)
        grads = reference_backward(dout, *(inputs.get(k) for k in ("x", "weight", "bias", "weight_b", "bias_b")))
        names = ("x", "weight", "bias", "weight_b", "bias_b")
        for name, grad in zip(names, grads):
            if inputs.get(name) is None:
                assert grad is None
            else:
                torch.testing.assert_close(grad, expected[name], msg=name)


# ---------------------------------------------------------------------------------------------
# the backends
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("length", [1, 3, 4, 197])
@pytest.mark.parametrize("directions", [2, 1])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cpu_backends_match_definition(backend, directions, length, dtype):
    skip_unless_available(backend)
    # 36 channels: two full blocks of 16 and a partial one in the C kernel
    inputs = conv_inputs(batch=2, length=length, channels=36, directions=directions, dtype=dtype, seed=length)
    assert_matches_definition(backend_fn(backend), inputs)


@pytest.mark.parametrize("march", SIMD_LEVELS)
def test_every_simd_width_matches_definition(march, monkeypatch, tmp_path):
    """Builds with 4 and 8 channels a job (the CPU's own build has 16 where it has AVX-512), a partial block included."""
    use_build_for(march, monkeypatch, tmp_path)
    inputs = conv_inputs(batch=2, length=30, channels=22, directions=2, seed=3)
    assert_matches_definition(backend_fn("native"), inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("length, directions", [(1, 2), (3, 1), (4, 2), (197, 2)])
def test_triton_matches_definition(length, directions, dtype):
    skip_unless_available("triton")
    batch = 1 if length > 100 else 2  # the interpreter is slow
    inputs = conv_inputs(batch=batch, length=length, channels=20, directions=directions, dtype=dtype, seed=length,
                         device=device_of("triton"))  # fmt: skip
    assert_matches_definition(backend_fn("triton"), inputs)


@pytest.mark.parametrize("width", [1, 2, 3, 8])
@pytest.mark.parametrize("backend", ["native", "triton"])
def test_any_width_up_to_eight(backend, width):
    """The C kernel's general path (W != 4) and the Triton kernels, unbiased, with weights in another dtype."""
    skip_unless_available(backend)
    inputs = conv_inputs(batch=1, length=13, channels=17, width=width, bias=False, dtype=torch.bfloat16,
                         weight_dtype=torch.float32, device=device_of(backend))  # fmt: skip
    assert_matches_definition(backend_fn(backend), inputs)


@pytest.mark.parametrize("backend", ["native", "triton"])
def test_every_layout_of_x_and_dout(backend):
    """Contiguous x, x strided in time, x with channels 3 apart, and a dout that is not contiguous."""
    skip_unless_available(backend)
    base = conv_inputs(batch=2, length=10, channels=20, device=device_of(backend))
    x = base["x"].contiguous()
    layouts = {
        "contiguous": x,
        "strided in time": torch.stack([x, torch.full_like(x, float("nan"))], dim=2).flatten(1, 2)[:, ::2],
        "channels apart": torch.stack([x, x.neg(), x], dim=-1).flatten(-2)[..., ::3],
        "channels first": x.transpose(1, 2).contiguous().transpose(1, 2),
    }
    dout = torch.randn(2, 20, 10, 2, generator=torch.Generator().manual_seed(3)).to(x.device).permute(3, 0, 2, 1)  # strided
    expected, expected_grads = expected_with_grads(base, dout)
    for name, strided in layouts.items():
        torch.testing.assert_close(strided, x, equal_nan=False, msg=name)
        out, grads = run_with_grads(backend_fn(backend), leaves({**base, "x": strided}), dout)
        torch.testing.assert_close(out.double(), expected, **TOLERANCES[torch.float32], msg=name)
        for key, grad in grads.items():
            torch.testing.assert_close(grad.double(), expected_grads[key], rtol=1e-4, atol=1e-4, msg=f"{name}: d{key}")


@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("length", [1, 2, 7])
@pytest.mark.parametrize("backend", [*CPU_BACKENDS, "triton"])
def test_same_padding_matches_the_centred_definition(backend, length, width):
    """padding="same" (MambaVision's centred conv) on every backend, forward and backward, odd and even widths."""
    skip_unless_available(backend)
    inputs = conv_inputs(batch=2, length=length, channels=20, width=width, directions=1, seed=width,
                         device=device_of(backend))  # fmt: skip
    same = functools.partial(causal_conv1d_silu, backend=backend, padding="same")
    assert_matches_definition(same, inputs, definition=centred_loop_definition)


@needs_compiler
@pytest.mark.parametrize("threads", [1, 3])
def test_native_sequence_split_into_segments(threads):
    """Batch 1 and few channels: the sequence is cut into segments (each with a halo in the backward)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert conv_silu_native._segments(1, 100, 20, threads) > 1
        assert_matches_definition(backend_fn("native"), conv_inputs(batch=1, length=100, channels=20, seed=threads))
    finally:
        torch.set_num_threads(before)


def test_float64_takes_the_pytorch_path_and_passes_gradcheck():
    inputs = conv_inputs(batch=1, length=5, channels=3, width=3)
    inputs = {k: None if v is None else v.double().requires_grad_() for k, v in inputs.items()}
    assert torch.autograd.gradcheck(lambda *t: causal_conv1d_silu(*t, backend="native"), tuple(inputs.values()))


def test_auto_picks_the_c_kernel_on_cpu_and_pytorch_without_a_compiler(monkeypatch, tmp_path):
    calls = []

    def spy(*args):
        calls.append("native")
        return causal_conv1d_silu_ref(*args)

    monkeypatch.delenv("VIM_SCAN_BACKEND", raising=False)
    monkeypatch.setattr(conv_silu_native, "native_conv_forward", spy)
    inputs = conv_inputs(length=5)
    monkeypatch.setattr(scan_native, "_compiler", lambda: "/usr/bin/cc")
    causal_conv1d_silu(**inputs)
    assert calls == ["native"]
    monkeypatch.setattr(scan_native, "_library", None)
    monkeypatch.setattr(scan_native, "_compiler", lambda: None)
    monkeypatch.setenv("VIM_KERNEL_CACHE", str(tmp_path))  # and no library cached
    out = causal_conv1d_silu(**inputs)
    assert calls == ["native"], "without a compiler the PyTorch path runs"
    torch.testing.assert_close(out, causal_conv1d_silu_ref(**inputs))


@pytest.mark.parametrize("backend", ["native", "triton"])
def test_custom_ops_trace_under_torch_compile(backend):
    """opcheck (schema, fake, autograd registration) and a fullgraph compile, forward and backward."""
    skip_unless_available(backend)
    inputs = conv_inputs(batch=1, length=5, channels=20, device=device_of(backend))
    taps = {k: v.squeeze(1) if k.startswith("weight") else v for k, v in inputs.items()}
    torch.library.opcheck(torch.ops.vim.conv1d_silu_fwd.default, (*leaves(taps).values(), backend))
    compiled = torch.compile(backend_fn(backend), fullgraph=True, backend="aot_eager")
    dout = torch.randn(2, 1, 5, 20, device=device_of(backend))
    out, grads = run_with_grads(compiled, leaves(inputs), dout)
    expected, expected_grads = run_with_grads(backend_fn(backend), leaves(inputs), dout)
    torch.testing.assert_close(out, expected)
    for name in grads:
        torch.testing.assert_close(grads[name], expected_grads[name], msg=name)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(x=torch.zeros(2, 20)), r"x must be \(batch, L, channels\).*\(2, 20\)"),
        (dict(x=torch.zeros(2, 0, 20)), r"L >= 1.*\(2, 0, 20\)"),
        (dict(weight=torch.zeros(19, 1, 4)), r"weight has shape \(19, 1, 4\), expected \(20, 1, W\)"),
        (dict(weight=torch.zeros(20, 1, 9)), r"weight has shape \(20, 1, 9\).*1 <= W <= 8"),
        (dict(weight_b=torch.zeros(20, 1, 3)), r"weight_b has width 3, weight 4"),
        (dict(bias_b=torch.zeros(20), weight_b=None), r"bias_b is given without weight_b"),
        (dict(bias=torch.zeros(21)), r"bias has shape \(21,\), expected \(20,\)"),
        (dict(x=torch.zeros(2, 5, 20, dtype=torch.int64)), r"x must be a floating tensor"),
        (dict(padding="valid"), r"padding must be 'causal' or 'same', got 'valid'"),
        (dict(padding="same"), r"padding='same' runs one direction; weight_b is given"),
    ],
)
def test_bad_input_raises_value_error_naming_it(change, message):
    inputs = {**conv_inputs(length=5), **change}
    with pytest.raises(ValueError, match=message):
        causal_conv1d_silu(**inputs)
