"""The Triton selective-scan kernels against the sequential reference.

Without CUDA the kernels run in Triton's interpreter on CPU tensors (see conftest.py), so the shapes
are tiny; the ``gpu`` tests repeat the checks at real sizes on a CUDA device. Every test runs with
uninitialised memory filled with NaN, so an output element the kernels forget to write shows up.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import pytest
import torch

from vim.kernels import bidirectional_selective_scan, selective_scan, selective_scan_ref
from vim.kernels.scan_layout import CHUNK_SIZE, num_chunks

pytest.importorskip("triton")

TOLERANCES = {
    torch.float32: dict(rtol=6e-4, atol=2e-3),
    torch.float16: dict(rtol=3e-2, atol=5e-2),
    torch.bfloat16: dict(rtol=3e-2, atol=5e-2),
}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


pytestmark = pytest.mark.usefixtures("poison_uninitialized_memory")  # tests/conftest.py


@dataclass(frozen=True)
class Case:
    length: int
    reverse: bool = False
    batch: int = 2
    dim: int = 4
    n_state: int = 4
    groups: int = 1
    has_D: bool = True
    has_z: bool = True
    has_bias: bool = True
    softplus: bool = True
    dtype: torch.dtype = torch.float32


def case_inputs(case: Case, seed: int = 0, device: str = DEVICE) -> dict[str, torch.Tensor | None]:
    """Keyword arguments of selective_scan for ``case``, laid out as a vision block makes them.

    u, delta, z are (batch, dim, L) views of (batch, L, dim) memory; B, C are (batch, G, N, L)
    (or (batch, N, L) when G = 1) views of (batch, L, G, N) memory.
    """
    gen = torch.Generator().manual_seed(seed)
    batch, dim, n_state, length, groups = case.batch, case.dim, case.n_state, case.length, case.groups

    def channels_last(*shape: int, scale: float = 1.0, shift: float = 0.0, uniform: bool = False) -> torch.Tensor:
        x = torch.rand(batch, length, dim, generator=gen) if uniform else torch.randn(batch, length, dim, generator=gen)
        return (x * scale + shift).to(device, case.dtype).transpose(1, 2)

    def state_input() -> torch.Tensor:
        x = torch.randn(batch, length, groups, n_state, generator=gen).to(device, case.dtype).permute(0, 2, 3, 1)
        return x[:, 0] if groups == 1 else x

    # with softplus delta is a pre-activation around -1; without it, a positive step size
    delta = channels_last(scale=0.5, shift=-1.0) if case.softplus else channels_last(scale=0.5, shift=0.05, uniform=True)
    bias_scale = 0.5 if case.softplus else 0.1
    return dict(
        u=channels_last(),
        delta=delta,
        A=-torch.exp(0.5 * torch.randn(dim, n_state, generator=gen)).to(device),
        B=state_input(),
        C=state_input(),
        D=torch.randn(dim, generator=gen).to(device) if case.has_D else None,
        z=channels_last() if case.has_z else None,
        delta_bias=(torch.rand(dim, generator=gen) * bias_scale).to(device) if case.has_bias else None,
    )


def leaves(inputs: dict, dtype: torch.dtype | None = None) -> dict:
    """Copies of ``inputs`` (strides kept, optionally cast) that collect gradients."""
    return {name: None if x is None else x.detach().clone().to(dtype or x.dtype).requires_grad_() for name, x in inputs.items()}


def grads(tensors: dict) -> dict:
    return {name: x.grad for name, x in tensors.items() if x is not None}


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert actual.shape == expected.shape, what
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    torch.testing.assert_close(actual.double(), expected.double(), **TOLERANCES[dtype], msg=lambda m: f"{what}: {m}")


def run_against_reference(case: Case, seed: int = 0) -> None:
    """Forward output and every gradient of the Triton scan vs autograd through the float64 reference."""
    inputs = case_inputs(case, seed)
    flags = dict(delta_softplus=case.softplus, reverse=case.reverse)
    ref_inputs = leaves(inputs, torch.float64)
    expected = selective_scan_ref(**ref_inputs, **flags)
    dout = torch.randn(expected.shape, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE)
    expected.backward(dout.double())

    tri_inputs = leaves(inputs)
    out = selective_scan(**tri_inputs, **flags, backend="triton")
    assert out.dtype == case.dtype
    assert_matches(out, expected, case.dtype, "out")
    out.backward(dout.to(out.dtype))
    expected_grads = grads(ref_inputs)
    for name, grad in grads(tri_inputs).items():
        assert grad.dtype == inputs[name].dtype, name
        assert_matches(grad, expected_grads[name], case.dtype, f"d{name}")


CASES = {
    "L1-bare": Case(length=1, batch=1, n_state=2, has_D=False, has_z=False, has_bias=False, softplus=False),
    "L7-reverse-N3": Case(length=7, reverse=True, n_state=3),
    "L64-grouped-no-softplus": Case(length=64, dim=8, groups=2, has_z=False, softplus=False),
    "L197-reverse-grouped": Case(length=197, reverse=True, batch=1, dim=8, n_state=2, groups=2, has_D=False),
    "L300-dim6": Case(length=300, batch=1, dim=6, n_state=4),
    "L70-two-dim-blocks": Case(length=70, batch=1, dim=40, n_state=2, has_z=False),
    "L70-N64-many-tiles": Case(length=70, batch=1, dim=3, n_state=64, reverse=True, has_bias=False),
    "L300-reverse-bf16": Case(length=300, reverse=True, batch=1, dim=8, n_state=2, groups=2, dtype=torch.bfloat16),
    "L7-fp16": Case(length=7, dtype=torch.float16, has_bias=False),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_forward_and_gradients_match_reference(case: Case):
    run_against_reference(case)


@pytest.mark.parametrize(
    "case, block_d",
    [
        (Case(length=33, batch=1, dim=40, n_state=4, has_z=False), 32),  # a full block of 32 channels and a partial one
        (Case(length=20, batch=1, dim=24, n_state=32, reverse=True, softplus=False), 16),
    ],
    ids=["32-channels", "16-channels-N32"],
)
def test_wide_tiles_of_a_gpu_with_few_multiprocessors(case: Case, block_d: int, monkeypatch):
    """A grid that fills the GPU gets the widest programs; on CPU tensors (an H100's limits) tiny grids never do."""
    from vim.kernels import scan_triton

    few_multiprocessors = scan_triton.GpuLimits(capability=90, multiprocessors=1, smem_per_block=227 * 1024)
    monkeypatch.setattr(scan_triton, "device_limits", lambda device: few_multiprocessors)
    for backward in (False, True):
        chosen = scan_triton._choose_tiles(case.dim, case.n_state, backward, 2 * case.batch, few_multiprocessors)
        assert chosen.block_d == block_d
    run_against_reference(case)


def test_bidirectional_matches_two_reference_scans():
    """K = 2 in one launch: separate parameters per direction, the second reversed, z shared."""
    case = Case(length=130, batch=1, dim=8, n_state=3, groups=2)
    per_direction = [case_inputs(case, seed) for seed in (0, 1)]
    z = per_direction[0]["z"]
    stacked = {
        name: torch.stack([inputs[name] for inputs in per_direction]) for name in ("u", "delta", "A", "B", "C", "D", "delta_bias")
    }
    dout = torch.randn(2, case.batch, case.dim, case.length, generator=torch.Generator().manual_seed(5)).to(DEVICE)

    tri = leaves({**stacked, "z": z})
    out = bidirectional_selective_scan(**tri, delta_softplus=True, backend="triton")
    out.backward(dout)

    ref_z = z.detach().double().requires_grad_()
    for k in range(2):
        ref = leaves({name: x[k] for name, x in stacked.items()}, torch.float64)
        expected = selective_scan_ref(**ref, z=ref_z, delta_softplus=True, reverse=k == 1)
        assert_matches(out[k], expected, torch.float32, f"out[{k}]")
        expected.backward(dout[k].double())
        for name, grad in grads(ref).items():
            assert_matches(tri[name].grad[k], grad, torch.float32, f"d{name}[{k}]")
    assert_matches(tri["z"].grad, ref_z.grad, torch.float32, "dz (summed over directions)")


def test_any_memory_layout_gives_the_same_result():
    """Channels-last, contiguous (B, D, L) and strided slices are read in place with identical results."""
    case = Case(length=70, batch=1, dim=4, n_state=3, groups=2)
    native = case_inputs(case)
    contiguous = {name: None if x is None else x.contiguous() for name, x in native.items()}
    sliced = {  # every other element of a twice-as-long buffer along L
        name: x if x is None or x.dim() < 3 else torch.stack([x, torch.zeros_like(x)], dim=-1).flatten(-2)[..., ::2]
        for name, x in native.items()
    }
    assert native["u"].stride(1) == 1 and contiguous["u"].stride(2) == 1 and sliced["u"].stride(2) == 2
    dout = torch.randn(case.batch, case.dim, case.length, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    results = []
    for inputs in (native, contiguous, sliced):
        tensors = leaves(inputs)
        out = selective_scan(**tensors, delta_softplus=True, reverse=True, backend="triton")
        out.backward(dout)
        results.append((out, grads(tensors)))
    expected = selective_scan_ref(**leaves(native, torch.float64), delta_softplus=True, reverse=True)
    assert_matches(results[0][0], expected, torch.float32, "out")
    for out, gradients in results[1:]:
        torch.testing.assert_close(out, results[0][0], rtol=0, atol=0)
        for name, grad in gradients.items():
            torch.testing.assert_close(grad, results[0][1][name], rtol=0, atol=0, msg=f"d{name}")


@pytest.mark.parametrize("reverse", [False, True])
def test_last_state_matches_reference(reverse: bool):
    case = Case(length=75, batch=2, dim=4, n_state=3, reverse=reverse)
    inputs = case_inputs(case)
    _, last = selective_scan(**inputs, delta_softplus=True, reverse=reverse, return_last_state=True, backend="triton")
    _, expected = selective_scan_ref(
        **leaves(inputs, torch.float64), delta_softplus=True, reverse=reverse, return_last_state=True
    )
    assert last.dtype == torch.float32
    assert_matches(last, expected, torch.float32, "last state")


def test_checkpoints_hold_the_state_after_each_chunk():
    """The canonical forward's checkpoints, per direction, against the reference's states."""
    from vim.kernels.scan_triton import triton_forward

    case = Case(length=2 * CHUNK_SIZE + 5, batch=1, dim=4, n_state=2, has_z=False)
    per_direction = [case_inputs(case, seed) for seed in (0, 1)]
    stacked = {name: torch.stack([inputs[name] for inputs in per_direction]) for name in ("u", "delta", "A", "D", "delta_bias")}
    B, C = (torch.stack([inputs[name] for inputs in per_direction]).unsqueeze(2) for name in ("B", "C"))
    _, checkpoints = triton_forward(
        stacked["u"], stacked["delta"], stacked["A"], B, C, stacked["D"], None, stacked["delta_bias"], True, False
    )
    assert checkpoints.shape == (2, case.batch, num_chunks(case.length), case.dim, case.n_state)
    for k, inputs in enumerate(per_direction):
        _, states = selective_scan_ref(
            **leaves(inputs, torch.float64), delta_softplus=True, reverse=k == 1, return_all_states=True
        )
        for chunk in range(num_chunks(case.length)):
            step = min((chunk + 1) * CHUNK_SIZE, case.length) - 1
            t = case.length - 1 - step if k == 1 else step
            assert_matches(checkpoints[k, :, chunk], states[:, :, t], torch.float32, f"checkpoint {chunk} of direction {k}")


# ---------------------------------------------------------------------------------------------
# real sizes, on a GPU only
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_long_sequence_with_largest_state_on_gpu():
    run_against_reference(Case(length=65_536, batch=1, dim=8, n_state=64, reverse=True, groups=2))


GPU_LENGTHS = (1, 7, 197, 4096, 16384)
GPU_GRID = [
    pytest.param(length, n_state, groups, reverse, id=f"L{length}-N{n_state}-G{groups}-{'reverse' if reverse else 'forward'}")
    for length in GPU_LENGTHS
    for n_state in (16, 64)
    for groups in (1, 2)
    for reverse in (False, True)
]


@functools.cache
def _gpu_reference(length: int, n_state: int, groups: int, reverse: bool) -> tuple[dict, torch.Tensor, torch.Tensor, dict]:
    """Inputs (float64 values that bf16 and fp16 hold exactly), dout, and the float64 reference's output and gradients.

    Computed once per shape and shared by the three dtypes: the sequential reference takes L steps.
    """
    case = Case(length=length, batch=2, dim=64, n_state=n_state, groups=groups, reverse=reverse)
    inputs = {k: None if x is None else x.to(torch.bfloat16).double() for k, x in case_inputs(case, seed=length).items()}
    ref_inputs = leaves(inputs)
    expected = selective_scan_ref(**ref_inputs, delta_softplus=True, reverse=reverse)
    dout = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, torch.bfloat16).double()
    expected.backward(dout)
    return inputs, dout, expected.detach(), grads(ref_inputs)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("length, n_state, groups, reverse", GPU_GRID)
def test_forward_and_every_gradient_match_reference_on_gpu(length, n_state, groups, reverse, dtype):
    """The Triton forward and all eight gradients against the sequential float64 reference, on the GPU."""
    inputs, dout, expected, expected_grads = _gpu_reference(length, n_state, groups, reverse)
    ours = {k: None if x is None else x.to(torch.float32 if k in ("A", "D", "delta_bias") else dtype) for k, x in inputs.items()}
    ours = leaves(ours)
    out = selective_scan(**ours, delta_softplus=True, reverse=reverse, backend="triton")
    assert out.dtype == dtype
    assert_matches(out, expected, dtype, "out")
    out.backward(dout.to(dtype))
    for name, grad in grads(ours).items():
        assert grad.dtype == ours[name].dtype, name
        assert_matches(grad, expected_grads[name], dtype, f"d{name}")


@pytest.mark.gpu
def test_bidirectional_bf16_at_vim_small_width_on_gpu():
    """Vim-S: d_inner 768, N 16, 197 tokens; bf16 activations against the reference on the same bf16 values.

    Batch 8 makes a grid that fills an A100 or H100, so the widest tiles (32 channels) run.
    """
    case = Case(length=197, batch=8, dim=768, n_state=16, dtype=torch.bfloat16)
    per_direction = [case_inputs(case, seed) for seed in (0, 1)]
    stacked = {
        name: torch.stack([inputs[name] for inputs in per_direction]) for name in ("u", "delta", "A", "B", "C", "D", "delta_bias")
    }
    z = per_direction[0]["z"]
    out = bidirectional_selective_scan(**stacked, z=z, delta_softplus=True, backend="triton")
    for k in range(2):
        ref = {name: x[k].double() for name, x in stacked.items()}
        expected = selective_scan_ref(**ref, z=z.double(), delta_softplus=True, reverse=k == 1)
        assert_matches(out[k], expected, torch.bfloat16, f"out[{k}]")
    run_against_reference(case)
