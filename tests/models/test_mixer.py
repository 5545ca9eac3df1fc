"""The bidirectional mixer against an explicit-flip re-implementation of the official bimamba v2."""

from __future__ import annotations

import math
from functools import partial

import pytest
import timm
import torch
import torch.nn.functional as F

from vim.kernels import scan_native, selective_scan_ref
from vim.models import MambaBlock, MambaMixer


def _official_direction(mixer: MambaMixer, x: torch.Tensor, z: torch.Tensor, suffix: str) -> torch.Tensor:
    """One direction of mamba_inner_fn_no_out_proj: causal conv + SiLU, projections, gated scan. (B, Di, L)."""
    length = x.shape[-1]
    conv = getattr(mixer, f"conv1d{suffix}")
    x = F.silu(F.conv1d(x, conv.weight, conv.bias, padding=mixer.d_conv - 1, groups=mixer.d_inner)[..., :length])
    x_dbl = x.transpose(1, 2) @ getattr(mixer, f"x_proj{suffix}").weight.T
    dt, B, C = x_dbl.split([mixer.dt_rank, mixer.d_state, mixer.d_state], dim=-1)
    dt_proj = getattr(mixer, f"dt_proj{suffix}")
    delta = (dt @ dt_proj.weight.T).transpose(1, 2)
    A = -torch.exp(getattr(mixer, f"A{suffix}_log").float())
    D = getattr(mixer, f"D{suffix}").float()
    return selective_scan_ref(
        x, delta, A, B.transpose(1, 2), C.transpose(1, 2), D, z=z, delta_bias=dt_proj.bias.float(), delta_softplus=True
    )


def official_bimamba_v2(mixer: MambaMixer, hidden: torch.Tensor) -> torch.Tensor:
    """The official forward: the backward direction runs on torch.flip-ped x and z, its output flipped back."""
    xz = (hidden @ mixer.in_proj.weight.T).transpose(1, 2)
    x, z = xz.chunk(2, dim=1)
    y = _official_direction(mixer, x, z, "") + _official_direction(mixer, x.flip(-1), z.flip(-1), "_b").flip(-1)
    if mixer.divide_out:
        y = y / 2
    return y.transpose(1, 2) @ mixer.out_proj.weight.T


def official_mamba(mixer: MambaMixer, hidden: torch.Tensor) -> torch.Tensor:
    """mamba_ssm's unidirectional Mamba.forward (mamba_inner_fn): one causal direction, gated, projected out."""
    xz = (hidden @ mixer.in_proj.weight.T).transpose(1, 2)
    x, z = xz.chunk(2, dim=1)
    return _official_direction(mixer, x, z, "").transpose(1, 2) @ mixer.out_proj.weight.T


def _randomize(mixer: MambaMixer, generator: torch.Generator) -> None:
    """Give the two directions different, non-trivial parameters so that mixing them up would show."""
    with torch.no_grad():
        for name, p in mixer.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            p.add_(0.3 * noise if name.startswith(("A", "D", "conv")) else 0.05 * noise)


def assert_matches_reference(mixer: MambaMixer, reference, hidden: torch.Tensor, generator: torch.Generator) -> None:
    """The mixer's output and the gradients of its input and parameters equal ``reference(mixer, hidden)``'s."""
    x_ours, x_ref = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    out = mixer(x_ours)
    grad_out = torch.randn(out.shape, generator=generator).to(out.device)
    (out * grad_out).sum().backward()
    ours = {name: p.grad.clone() for name, p in mixer.named_parameters()}
    mixer.zero_grad()
    expected = reference(mixer, x_ref)
    (expected * grad_out).sum().backward()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(x_ours.grad, x_ref.grad, atol=1e-5, rtol=1e-4)
    for name, p in mixer.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, atol=1e-4, rtol=1e-4, msg=f"gradient of {name}")


@pytest.mark.parametrize("divide_out", [True, False])
@pytest.mark.parametrize("length", [1, 5, 37])
def test_mixer_matches_explicit_flip_forward_and_backward(divide_out: bool, length: int) -> None:
    generator = torch.Generator().manual_seed(length)
    mixer = MambaMixer(16, d_state=4, divide_out=divide_out, kernel_backend="torch")
    _randomize(mixer, generator)
    assert_matches_reference(mixer, official_bimamba_v2, torch.randn(2, length, 16, generator=generator), generator)


@pytest.mark.parametrize("length", [1, 9])
def test_single_direction_is_mambas_own_mixer(length: int) -> None:
    """directions=1: Mamba's parameter names (no ``_b``) and its causal forward, values and gradients."""
    generator = torch.Generator().manual_seed(7)
    mixer = MambaMixer(16, d_state=4, directions=1, kernel_backend="torch")
    assert set(mixer.state_dict()) == {
        "in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight", "dt_proj.bias",
        "A_log", "D", "out_proj.weight",
    }  # fmt: skip
    assert mixer.conv1d_b is None and mixer.A_b_log is None
    _randomize(mixer, generator)
    hidden = torch.randn(2, length, 16, generator=generator)
    assert_matches_reference(mixer, official_mamba, hidden, generator)
    if length > 1:  # causal: the first token never sees the later ones
        x = hidden.clone().requires_grad_()
        mixer(x)[0, 0].sum().backward()
        assert x.grad[0, 1:].abs().sum() == 0


def test_bad_direction_count() -> None:
    with pytest.raises(ValueError, match="directions must be 1"):
        MambaMixer(8, directions=3)


def test_divide_out_halves_the_sum_of_directions() -> None:
    torch.manual_seed(0)
    mean_mixer = MambaMixer(8, d_state=4, divide_out=True, kernel_backend="torch")
    sum_mixer = MambaMixer(8, d_state=4, divide_out=False, kernel_backend="torch")
    sum_mixer.load_state_dict(mean_mixer.state_dict())
    x = torch.randn(1, 6, 8)
    torch.testing.assert_close(sum_mixer(x), 2 * mean_mixer(x))


def test_backward_direction_reads_the_future() -> None:
    """Token t's output depends on later tokens only through the backward direction."""
    torch.manual_seed(0)
    mixer = MambaMixer(8, d_state=4, kernel_backend="torch")
    x = torch.randn(1, 10, 8, requires_grad=True)
    mixer(x)[0, 3].sum().backward()
    assert x.grad[0, 4:].abs().sum() > 0
    with torch.no_grad():
        mixer.x_proj_b.weight.zero_()
        mixer.conv1d_b.weight.zero_()
        mixer.conv1d_b.bias.zero_()
        mixer.D_b.zero_()
    x.grad = None
    mixer(x)[0, 3].sum().backward()
    assert x.grad[0, 4:].abs().sum() == 0


def test_mamba_initialisation() -> None:
    d_model, d_state = 40, 16
    mixer = MambaMixer(d_model, d_state=d_state)
    dt_rank = math.ceil(d_model / 16)
    assert mixer.dt_rank == dt_rank and mixer.d_inner == 2 * d_model
    assert mixer.x_proj.weight.shape == (dt_rank + 2 * d_state, 2 * d_model)
    for suffix in ("", "_b"):
        A = -torch.exp(getattr(mixer, f"A{suffix}_log"))
        torch.testing.assert_close(A, -torch.arange(1, d_state + 1, dtype=torch.float32).expand(2 * d_model, -1))
        torch.testing.assert_close(getattr(mixer, f"D{suffix}"), torch.ones(2 * d_model))
        dt_proj = getattr(mixer, f"dt_proj{suffix}")
        dt = F.softplus(dt_proj.bias)
        assert dt.min() >= 1e-3 * (1 - 1e-4) and dt.max() <= 0.1 * (1 + 1e-4)
        assert dt_proj.weight.abs().max() <= dt_rank**-0.5
    assert mixer.in_proj.bias is None and mixer.out_proj.bias is None and mixer.x_proj.bias is None
    assert mixer.conv1d.weight.shape == (2 * d_model, 1, 4) and mixer.conv1d.bias is not None


def test_block_keeps_an_fp32_residual_and_matches_its_definition() -> None:
    torch.manual_seed(0)
    block = MambaBlock(8, partial(MambaMixer, d_state=4, kernel_backend="torch"), kernel_backend="torch").to(torch.bfloat16)
    x = torch.randn(2, 5, 8, dtype=torch.bfloat16)
    previous = torch.randn(2, 5, 8)
    hidden, residual = block(x, previous)
    assert residual.dtype == torch.float32 and hidden.dtype == torch.bfloat16
    torch.testing.assert_close(residual, previous + x.float())
    normed = residual.bfloat16() * torch.rsqrt(residual.bfloat16().pow(2).mean(-1, keepdim=True) + 1e-5) * block.norm.weight
    torch.testing.assert_close(hidden, block.mixer(normed), atol=2e-2, rtol=2e-2)
    _, first_residual = block(x)  # the first block starts the stream from its input
    torch.testing.assert_close(first_residual, x.float())


# ---------------------------------------------------------------------------------------------
# the fused conv + SiLU against the mixer's grouped-conv computation it replaced
# ---------------------------------------------------------------------------------------------


def grouped_conv_silu(mixer: MambaMixer, x: torch.Tensor) -> torch.Tensor:
    """Every direction's conv + SiLU as one grouped F.conv1d, the mixer's computation before fusion.

    x (B, d_inner, L) -> (K, B, L, d_inner): group g maps channel g to output channels K g ... K g + K - 1,
    one per direction; the backward direction uses its flipped taps, read from the end of the padded output.
    """
    convs = [mixer.conv1d] + ([] if mixer.conv1d_b is None else [mixer.conv1d_b])
    length, pad, directions = x.shape[-1], mixer.d_conv - 1, len(convs)
    weight = torch.stack([convs[0].weight, *(c.weight.flip(-1) for c in convs[1:])], dim=1).flatten(0, 1)
    bias = torch.stack([c.bias for c in convs], dim=1).flatten()
    y = F.conv1d(x, weight, bias, padding=pad, groups=mixer.d_inner).unflatten(1, (mixer.d_inner, directions))
    windows = [y[:, :, 0, :length], *(y[:, :, k, pad:] for k in range(1, directions))]
    return F.silu(torch.stack([w.transpose(1, 2) for w in windows]))


def grouped_conv_mixer(mixer: MambaMixer, hidden: torch.Tensor) -> torch.Tensor:
    """The unfused mixer: grouped conv + SiLU, per-direction projections, and the sequential scan (the backward
    direction on flipped inputs, its output flipped back)."""
    x, z = (hidden @ mixer.in_proj.weight.T).chunk(2, dim=-1)
    u = grouped_conv_silu(mixer, x.transpose(1, 2))
    suffixes = ["", "_b"][: mixer.directions]
    y = 0
    for k, suffix in enumerate(suffixes):
        x_dbl = u[k] @ getattr(mixer, f"x_proj{suffix}").weight.T
        dt, B, C = x_dbl.split([mixer.dt_rank, mixer.d_state, mixer.d_state], dim=-1)
        dt_proj = getattr(mixer, f"dt_proj{suffix}")
        channels_first = [u[k], dt @ dt_proj.weight.T, B, C, z]
        if suffix:  # the backward direction scans the reversed sequence
            channels_first = [t.flip(1) for t in channels_first]
        uk, delta, B, C, zk = (t.transpose(1, 2) for t in channels_first)
        A = -torch.exp(getattr(mixer, f"A{suffix}_log").float())
        yk = selective_scan_ref(
            uk, delta, A, B, C, getattr(mixer, f"D{suffix}").float(), z=zk, delta_bias=dt_proj.bias.float(), delta_softplus=True
        )
        y = y + (yk.flip(-1) if suffix else yk)
    if mixer.directions == 2 and mixer.divide_out:
        y = y / 2
    return y.transpose(1, 2) @ mixer.out_proj.weight.T


def _device_of(backend: str) -> str:
    """Triton's tensors live on the GPU if there is one (the interpreter runs only without CUDA)."""
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("directions", [1, 2])
@pytest.mark.parametrize("backend", ["torch", "native", "triton"])
def test_fused_conv_matches_the_grouped_conv_mixer(backend: str, directions: int) -> None:
    """The mixer on the fused conv + SiLU gives the grouped-conv mixer's output and every gradient."""
    if backend == "native" and not scan_native.native_available():
        pytest.skip("no C compiler to build the fused CPU kernels")
    if backend == "triton":
        pytest.importorskip("triton")
    generator = torch.Generator().manual_seed(directions)
    mixer = MambaMixer(8, d_state=4, directions=directions, kernel_backend=backend)
    _randomize(mixer, generator)
    hidden = torch.randn(2, 6, 8, generator=generator)
    device = _device_of(backend)
    assert_matches_reference(mixer.to(device), grouped_conv_mixer, hidden.to(device), generator)


def test_old_argument_name_scan_backend_still_builds_the_same_model():
    """Saved configs and checkpoints name the kernel backend ``scan_backend``: it is read as ``kernel_backend``, warned about."""
    torch.manual_seed(0)
    new = timm.create_model("test_vim", kernel_backend="torch")
    torch.manual_seed(0)
    with pytest.warns(FutureWarning, match="'scan_backend' is now called 'kernel_backend'"):
        old = timm.create_model("test_vim", scan_backend="torch")
    assert old.kernel_backend == new.kernel_backend == "torch"
    assert all(block.mixer.kernel_backend == "torch" for block in old.blocks)
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(old(images), new(images), rtol=0, atol=0)
    with pytest.raises(ValueError, match="one setting"):
        timm.create_model("test_vim", scan_backend="torch", kernel_backend="native")


def test_old_mixer_name_is_the_mixer():
    import vim.models
    from vim.models.mixer import MambaMixer

    with pytest.warns(FutureWarning, match="now called MambaMixer"):
        assert vim.models.BiMambaMixer is MambaMixer
