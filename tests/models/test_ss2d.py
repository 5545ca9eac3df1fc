"""VMamba's SS2D mixer against upstream: parameter names and shapes, the forward in float64 and float32 on every
backend, gradients, mixed precision and torch.export.

The expected outputs come from ``tests/reference/vmamba.py``, a float64 re-implementation of upstream's ``v05_noz``
forward written from its code (channels-first, explicit cross-scan copies, the sequential scan, explicit
cross-merge), loaded with the same random official-format state dict. Grids are square and not (a transposed
index shows only when H != W). Triton runs in its interpreter on CPU (tests/conftest.py), so its grid is tiny.
"""

from __future__ import annotations

import pytest
import torch

from vim.deploy import SCAN_OP
from vim.kernels import scan_native
from vim.models import ss2d
from vim.models.ss2d import SS2D

from reference.vmamba import official_ss2d_forward, official_ss2d_shapes, official_ss2d_state_dict

NAMES = (
    "x_proj_weight", "A_logs", "Ds", "dt_projs_weight", "dt_projs_bias", "out_norm.weight", "out_norm.bias",
    "in_proj.weight", "conv2d.weight", "out_proj.weight",
)  # fmt: skip

# One SS2D per stage, read off upstream's vmamba.py (SS2Dv2.__initv2__, mamba_init.init_dt_A_D, Linear2d) for the
# released configs (d_state 1, dt_rank ceil(C / 16), d_conv 3, conv_bias False, ln2d), in the order of NAMES.
OFFICIAL_STAGES = {
    "tiny_s1l8": {  # vmambav2v_tiny_224.yaml: ssm_ratio 1.0, dims 96 / 192 / 384 / 768
        96: [(4, 8, 96), (384, 1), (384,), (4, 96, 6), (4, 96), (96,), (96,), (96, 96), (96, 1, 3, 3), (96, 96)],
        192: [(4, 14, 192), (768, 1), (768,), (4, 192, 12), (4, 192), (192,), (192,), (192, 192), (192, 1, 3, 3), (192, 192)],
        384: [(4, 26, 384), (1536, 1), (1536,), (4, 384, 24), (4, 384), (384,), (384,), (384, 384), (384, 1, 3, 3), (384, 384)],
        768: [(4, 50, 768), (3072, 1), (3072,), (4, 768, 48), (4, 768), (768,), (768,), (768, 768), (768, 1, 3, 3), (768, 768)],
    },
    "small_s2l15": {  # vmambav2_small_224.yaml: ssm_ratio 2.0, dims 96 / 192 / 384 / 768
        96: [(4, 8, 192), (768, 1), (768,), (4, 192, 6), (4, 192), (192,), (192,), (192, 96), (192, 1, 3, 3), (96, 192)],
        192: [(4, 14, 384), (1536, 1), (1536,), (4, 384, 12), (4, 384), (384,), (384,), (384, 192), (384, 1, 3, 3), (192, 384)],
        384: [(4, 26, 768), (3072, 1), (3072,), (4, 768, 24), (4, 768), (768,), (768,), (768, 384), (768, 1, 3, 3), (384, 768)],
        768: [
            (4, 50, 1536), (6144, 1), (6144,), (4, 1536, 48), (4, 1536), (1536,), (1536,), (1536, 768), (1536, 1, 3, 3),
            (768, 1536),
        ],
    },
}  # fmt: skip
SSM_RATIOS = {"tiny_s1l8": 1.0, "small_s2l15": 2.0}


@pytest.mark.parametrize("config", sorted(OFFICIAL_STAGES))
def test_parameter_names_and_shapes_are_the_official_ones(config: str) -> None:
    for d_model, shapes in OFFICIAL_STAGES[config].items():
        expected = dict(zip(NAMES, shapes))
        mixer = SS2D(d_model, d_state=1, ssm_ratio=SSM_RATIOS[config], device="meta")
        assert {name: tuple(p.shape) for name, p in mixer.state_dict().items()} == expected
        assert official_ss2d_shapes(d_model, 1, SSM_RATIOS[config]) == expected  # the golden tests' state dicts


def _device_of(backend: str) -> str:
    """Triton's tensors live on the GPU if there is one (the interpreter runs only without CUDA)."""
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def _skip_unavailable(backend: str) -> None:
    if backend == "native" and not scan_native.native_available():
        pytest.skip("no C compiler to build the native scan")
    if backend == "triton":
        pytest.importorskip("triton")


def _official_mixer(d_model: int, d_state: int, ssm_ratio: float, backend: str, seed: int = 0) -> tuple[SS2D, dict]:
    """An SS2D holding a random official-format state dict (loaded strictly), and that state dict."""
    state = official_ss2d_state_dict(official_ss2d_shapes(d_model, d_state, ssm_ratio), torch.Generator().manual_seed(seed))
    mixer = SS2D(d_model, d_state=d_state, ssm_ratio=ssm_ratio, kernel_backend=backend)
    mixer.load_state_dict(state)
    return mixer, state


def _channels_first(y: torch.Tensor) -> torch.Tensor:
    return y.permute(0, 3, 1, 2)


TOLERANCES = {torch.float64: dict(rtol=1e-6, atol=1e-6), torch.float32: dict(rtol=1e-4, atol=1e-4)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("ssm_ratio", [1.0, 2.0])
@pytest.mark.parametrize("d_state", [1, 16])
@pytest.mark.parametrize("grid", [(6, 6), (5, 9)], ids=["square", "5x9"])
def test_forward_matches_the_official_forward(grid, d_state: int, ssm_ratio: float, backend: str, dtype) -> None:
    _skip_unavailable(backend)
    mixer, state = _official_mixer(16, d_state, ssm_ratio, backend)
    x = torch.randn(2, 16, *grid, generator=torch.Generator().manual_seed(1))  # channels-first, as upstream's ln2d
    expected = official_ss2d_forward(state, x)
    out = mixer.to(dtype)(x.to(dtype).permute(0, 2, 3, 1))
    assert out.dtype == dtype and out.shape == (2, *grid, 16)
    torch.testing.assert_close(_channels_first(out).double(), expected, **TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_forward_on_triton_matches_the_official_forward(dtype) -> None:
    _skip_unavailable("triton")
    device = _device_of("triton")
    mixer, state = _official_mixer(8, 1, 2.0, "triton")
    x = torch.randn(2, 8, 3, 5, generator=torch.Generator().manual_seed(2))
    out = mixer.to(device, dtype)(x.to(device, dtype).permute(0, 2, 3, 1))
    torch.testing.assert_close(_channels_first(out).double().cpu(), official_ss2d_forward(state, x), **TOLERANCES[dtype])


@pytest.mark.parametrize("backend", ["native", "torch", "triton"])
def test_gradients_match_autograd_through_the_official_forward(backend: str) -> None:
    """float32 on our kernels against float64 autograd through the reference, for the input and every parameter."""
    _skip_unavailable(backend)
    device = _device_of(backend)
    generator = torch.Generator().manual_seed(3)
    mixer, state = _official_mixer(8, 2, 2.0, backend)
    x = torch.randn(2, 8, 3, 4, generator=generator)
    cotangent = torch.randn(2, 8, 3, 4, generator=generator)

    reference_state = {k: v.double().requires_grad_() for k, v in state.items()}
    reference_x = x.double().requires_grad_()
    (official_ss2d_forward(reference_state, reference_x) * cotangent).sum().backward()

    mixer.to(device)
    ours_x = x.permute(0, 2, 3, 1).to(device).requires_grad_()
    (_channels_first(mixer(ours_x)) * cotangent.to(device)).sum().backward()

    expected = {"x": reference_x.grad.permute(0, 2, 3, 1)} | {k: v.grad for k, v in reference_state.items()}
    actual = {"x": ours_x.grad} | {name: p.grad for name, p in mixer.named_parameters()}
    assert actual.keys() == expected.keys()
    for name, grad in actual.items():
        assert grad.isfinite().all(), name
        torch.testing.assert_close(grad.double().cpu(), expected[name], rtol=1e-4, atol=1e-4, msg=lambda m, n=name: f"d{n}: {m}")


def test_mixed_precision_scans_and_merges_in_float32(monkeypatch) -> None:
    """Under bf16 autocast the scan reads float32 and returns the float32 merge (upstream's oflex), the mixer returns
    the activations' bf16, and the result stays within bf16 rounding of the float64 reference."""
    seen = []

    def recording_scan(u, *args, **kwargs):
        out = ss2d_scan(u, *args, **kwargs)
        seen.append((u.dtype, out.dtype))
        return out

    ss2d_scan = ss2d.cross_selective_scan
    monkeypatch.setattr(ss2d, "cross_selective_scan", recording_scan)
    mixer, state = _official_mixer(16, 1, 2.0, "torch")
    x = torch.randn(2, 16, 4, 6, generator=torch.Generator().manual_seed(4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mixer(x.permute(0, 2, 3, 1))
    assert seen == [(torch.float32, torch.float32)]
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(_channels_first(out).double(), official_ss2d_forward(state, x), rtol=5e-2, atol=5e-2)


def test_ssm_init_v0() -> None:
    """A = -(1..N) on every channel of every direction, D = 1, softplus(dt bias) in [dt_min, dt_max], dt and x_proj
    weights in nn.Linear / Mamba ranges, no biases on the projections or the conv."""
    d_model, d_state, ratio = 40, 4, 2.0
    mixer = SS2D(d_model, d_state=d_state, ssm_ratio=ratio)
    inner, rank = 80, 3  # int(2.0 * 40), ceil(40 / 16)
    torch.testing.assert_close(mixer.A_logs, torch.log(torch.arange(1.0, d_state + 1)).expand(4 * inner, d_state))
    torch.testing.assert_close(mixer.Ds, torch.ones(4 * inner))
    dt = torch.nn.functional.softplus(mixer.dt_projs_bias)
    assert dt.min() >= 1e-3 * (1 - 1e-4) and dt.max() <= 0.1 * (1 + 1e-4)
    assert mixer.dt_projs_weight.abs().max() <= rank**-0.5
    assert mixer.x_proj_weight.abs().max() <= inner**-0.5
    assert not torch.equal(mixer.dt_projs_bias[0], mixer.dt_projs_bias[1]), "each direction draws its own steps"
    assert mixer.in_proj.bias is None and mixer.out_proj.bias is None and mixer.conv2d.bias is None


def test_bad_input_is_named() -> None:
    mixer = SS2D(16)
    with pytest.raises(ValueError, match=r"channels-last tokens \(B, H, W, 16\), got shape \(2, 16, 4, 5\)"):
        mixer(torch.randn(2, 16, 4, 5))
    with pytest.raises(ValueError, match="d_conv must be odd"):
        SS2D(16, d_conv=4)


def test_tokens_on_a_grid_are_the_channels_last_forward() -> None:
    """(B, H * W, C) tokens with their grid, as a hierarchical trunk's block passes them: the same numbers as the
    (B, H, W, C) forward of the reference, flattened row-major; a grid that does not hold the tokens is named."""
    generator = torch.Generator().manual_seed(3)
    state = official_ss2d_state_dict(official_ss2d_shapes(8, 1, 2.0), generator)
    mixer = SS2D(8, d_state=1, ssm_ratio=2.0, dtype=torch.float64)
    mixer.load_state_dict(state)
    x = torch.randn(2, 8, 3, 5, generator=generator, dtype=torch.float64)  # channels-first, as the reference takes it
    out = mixer(x.flatten(2).transpose(1, 2), grid=(3, 5))  # (B, 15, 8)
    torch.testing.assert_close(out, official_ss2d_forward(state, x).flatten(2).transpose(1, 2), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"tokens of shape \(2, 15, 8\) do not lie on the grid \(4, 4\)"):
        mixer(out, grid=(4, 4))


class _Holder(torch.nn.Module):
    """A module holding just the mixer, as a block would."""

    def __init__(self) -> None:
        super().__init__()
        self.op = SS2D(8, d_state=1, ssm_ratio=2.0, kernel_backend="torch")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


def test_torch_export_keeps_the_four_direction_scan_one_op() -> None:
    model = _Holder().eval()
    x = torch.randn(2, 3, 5, 8)
    program = torch.export.export(model, (x,))
    assert sum(node.target is SCAN_OP for node in program.graph.nodes) == 1
    torch.testing.assert_close(program.module()(x), model(x))
