"""MambaVision's mixer and attention parts against float64 re-implementations of upstream (tests/reference/mambavision.py)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vim.deploy import SCAN_OP
from vim.kernels import scan_native
from vim.models.attention import mambavision_attention
from vim.models.mambavision_mixer import MambaVisionMixer

from reference.mambavision import official_attention_forward, official_mixer_forward, official_mixer_shapes, official_state_dict
from support.grads import leaves, run_with_grads

# Written down from upstream's mamba_vision.py for MambaVision-T's stages 3 and 4 (dim 80 * 4 = 320, 80 * 8 = 640;
# heads 8 and 16): d_inner = d_model, halves of d_model / 2, dt_rank = ceil(d_model / 16) = 20 and 40, d_state 8,
# conv width 3; no bias on in_proj, out_proj or the convs; qkv and proj with biases.
MAMBAVISION_T_MIXER = {
    320: {
        "in_proj.weight": (320, 320),
        "x_proj.weight": (36, 160),
        "dt_proj.weight": (160, 20),
        "dt_proj.bias": (160,),
        "A_log": (160, 8),
        "D": (160,),
        "out_proj.weight": (320, 320),
        "conv1d_x.weight": (160, 1, 3),
        "conv1d_z.weight": (160, 1, 3),
    },
    640: {
        "in_proj.weight": (640, 640),
        "x_proj.weight": (56, 320),
        "dt_proj.weight": (320, 40),
        "dt_proj.bias": (320,),
        "A_log": (320, 8),
        "D": (320,),
        "out_proj.weight": (640, 640),
        "conv1d_x.weight": (320, 1, 3),
        "conv1d_z.weight": (320, 1, 3),
    },
}
MAMBAVISION_T_ATTENTION = {
    (320, 8): {"qkv.weight": (960, 320), "qkv.bias": (960,), "proj.weight": (320, 320), "proj.bias": (320,)},
    (640, 16): {"qkv.weight": (1920, 640), "qkv.bias": (1920,), "proj.weight": (640, 640), "proj.bias": (640,)},
}


def shapes_of(module: nn.Module) -> dict[str, tuple]:
    return {name: tuple(t.shape) for name, t in module.state_dict().items()}


def skip_unless_available(backend: str) -> None:
    if backend == "native" and not scan_native.native_available():
        pytest.skip("no C compiler to build the fused CPU kernels")
    if backend == "triton":
        pytest.importorskip("triton")


def mixer_with_official_weights(d_model: int, seed: int, backend: str | None = None, dtype=torch.float32):
    """Our mixer holding random official-format parameters, and those parameters."""
    state = official_state_dict(official_mixer_shapes(d_model), torch.Generator().manual_seed(seed))
    mixer = MambaVisionMixer(d_model, kernel_backend=backend)
    mixer.load_state_dict(state)  # strict: every official key and shape, no other
    return mixer.to(dtype), state


# ---------------------------------------------------------------------------------------------- names and shapes
@pytest.mark.parametrize("d_model", [320, 640])
def test_mixer_has_the_official_parameter_names_and_shapes(d_model):
    assert shapes_of(MambaVisionMixer(d_model, device="meta")) == MAMBAVISION_T_MIXER[d_model]
    assert official_mixer_shapes(d_model) == MAMBAVISION_T_MIXER[d_model], "the reference builds what the table says"


@pytest.mark.parametrize("dim, heads", [(320, 8), (640, 16)])
def test_attention_has_the_official_parameter_names_and_shapes(dim, heads):
    assert shapes_of(mambavision_attention(dim, heads, device="meta")) == MAMBAVISION_T_ATTENTION[(dim, heads)]


# ---------------------------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("length", [1, 8, 49])
def test_float64_mixer_is_the_official_forward(length):
    mixer, state = mixer_with_official_weights(32, seed=length, dtype=torch.float64)
    hidden = torch.randn(2, length, 32, generator=torch.Generator().manual_seed(100 + length), dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(mixer(hidden), official_mixer_forward(state, hidden), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("length", [7, 8, 49])
@pytest.mark.parametrize("backend", ["native", "torch"])
def test_float32_mixer_through_the_cpu_kernels_is_the_official_forward(backend, length):
    skip_unless_available(backend)
    mixer, state = mixer_with_official_weights(48, seed=length, backend=backend)
    hidden = torch.randn(2, length, 48, generator=torch.Generator().manual_seed(100 + length))
    with torch.no_grad():
        out = mixer(hidden)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), official_mixer_forward(state, hidden), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("length", [4, 5])
def test_float32_mixer_through_triton_is_the_official_forward(length):
    """Triton's scan and conv kernels (in the interpreter without CUDA) on a tiny shape."""
    skip_unless_available("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    mixer, state = mixer_with_official_weights(16, seed=length, backend="triton")
    hidden = torch.randn(1, length, 16, generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        out = mixer.to(device)(hidden.to(device)).cpu()
    torch.testing.assert_close(out.double(), official_mixer_forward(state, hidden), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_mixer_gradients_are_autograd_through_the_official_forward(backend):
    """The gradients of the input and of every parameter, by name, against autograd of the float64 reference."""
    skip_unless_available(backend)
    mixer, state = mixer_with_official_weights(16, seed=3, backend=backend)
    generator = torch.Generator().manual_seed(4)
    hidden = torch.randn(2, 6, 16, generator=generator)
    dout = torch.randn(2, 6, 16, generator=generator)
    params = dict(mixer.named_parameters())
    out, grads = run_with_grads(lambda hidden, **p: torch.func.functional_call(mixer, p, (hidden,)),
                                leaves({"hidden": hidden, **params}), dout)  # fmt: skip
    expected, expected_grads = run_with_grads(lambda hidden, **sd: official_mixer_forward(sd, hidden),
                                              leaves({"hidden": hidden, **state}, torch.float64), dout.double())  # fmt: skip
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        scale = max(expected_grads[name].abs().max().item(), 1.0)
        torch.testing.assert_close(grad.double(), expected_grads[name], rtol=1e-4, atol=1e-4 * scale, msg=name)


def test_attention_is_softmax_of_scaled_dot_products():
    attention = mambavision_attention(24, num_heads=4).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in attention.parameters():  # non-zero biases, so a dropped or misplaced bias shows
            p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(p.shape[-1]))
        x = torch.randn(2, 9, 24, generator=generator)
        expected = official_attention_forward(attention.state_dict(), x, num_heads=4)
        torch.testing.assert_close(attention(x).double(), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- init, errors, export
def test_reset_parameters_is_the_official_from_scratch_init():
    """Upstream's model re-initialises every Linear (dt_proj too) truncated-normal 0.02 with zero biases."""
    torch.manual_seed(0)
    mixer = MambaVisionMixer(320)
    assert mixer.dt_proj.bias.abs().max() == 0, "dt_proj.bias ends zero: softplus(0) = ln 2 initial step"
    for name in ("in_proj", "x_proj", "dt_proj", "out_proj"):
        weight = getattr(mixer, name).weight
        assert abs(weight.std().item() - 0.02) < 0.1 * 0.02 * (1 + 10 / math.sqrt(weight.numel())), name
        assert weight.abs().max() <= 2.0, f"{name}: trunc_normal_ cuts at +-2"
    expected_A_log = torch.log(torch.arange(1.0, 9.0)).expand(160, 8)
    torch.testing.assert_close(mixer.A_log.detach(), expected_A_log, rtol=0, atol=0)
    assert (mixer.D == 1).all()
    assert mixer.conv1d_x.bias is None and mixer.conv1d_z.bias is None
    bound = 1 / math.sqrt(3)  # PyTorch's default: kaiming_uniform(a=sqrt(5)) over fan-in 3 gives +-1/sqrt(fan_in)
    assert 0.5 * bound < mixer.conv1d_x.weight.abs().max() <= bound


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(d_model=15), r"d_inner = expand \* d_model = 15 must be even"),
        (dict(d_model=16, dt_rank="full"), r"dt_rank must be a positive integer or 'auto', got 'full'"),
    ],
)
def test_bad_settings_raise_value_error_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MambaVisionMixer(**kwargs)


def test_attention_heads_that_do_not_divide_the_width_raise_value_error():
    with pytest.raises(ValueError, match="dim 30 is not a multiple of num_heads 4"):
        mambavision_attention(30, 4)


def test_torch_export_keeps_the_scan_one_custom_op():
    model = nn.Sequential(nn.LayerNorm(16), MambaVisionMixer(16, kernel_backend="torch")).eval()
    hidden = torch.randn(2, 7, 16)
    program = torch.export.export(model, (hidden,))
    assert sum(node.target is SCAN_OP for node in program.graph.nodes) == 1
    assert sum(node.target is torch.ops.vim.conv1d_silu_fwd.default for node in program.graph.nodes) == 1
    with torch.no_grad():
        torch.testing.assert_close(program.module()(hidden), model(hidden))
