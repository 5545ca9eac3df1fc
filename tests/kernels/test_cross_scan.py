"""The selective scan of a 2-D grid in K directions (VMamba's cross scan), every backend, against explicit copies.

The expected values come from the sequential float64 reference run on cross-scanned copies built here, apart
from the kernels' index arithmetic: row by row is ``x.flatten(-2)``, column by column
``x.transpose(-1, -2).flatten(-2)``, and both flipped; the outputs are merged by un-flipping, un-transposing
and summing. Gradients come from autograd through those copies. Grids are square and not (a transposed index
shows only when H != W), longer than a checkpoint chunk, with one and eight states, one and two groups of B/C,
a u shared by the directions and one per direction, with and without z, D and delta_bias. The Triton kernels
run in Triton's interpreter on CPU (tests/conftest.py), so their grids stay small.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from vim.kernels import bidirectional_selective_scan, cross_selective_scan, selective_scan, selective_scan_ref
from vim.kernels.scan_layout import CHUNK_SIZE

from support.grads import leaves

TOLERANCES = {
    torch.float32: dict(rtol=6e-4, atol=2e-3),
    torch.float16: dict(rtol=3e-2, atol=5e-2),
    torch.bfloat16: dict(rtol=3e-2, atol=5e-2),
}
BACKENDS = ("torch", "native", "triton", "reference")

pytestmark = pytest.mark.usefixtures("poison_uninitialized_memory")  # tests/conftest.py


@dataclass(frozen=True)
class Case:
    height: int
    width: int
    n_state: int = 4
    orders: tuple[int, ...] = (0, 1, 2, 3)
    groups: int = 1
    shared_u: bool = True
    has_D: bool = True
    has_z: bool = True
    has_bias: bool = True
    softplus: bool = True
    batch: int = 2
    dim: int = 4
    dtype: torch.dtype = torch.float32

    @property
    def length(self) -> int:
        return self.height * self.width


def cross_scan_inputs(case: Case, seed: int = 0) -> dict:
    """Keyword arguments of cross_selective_scan: per-token tensors in grid order, channels-last as a block makes them."""
    gen = torch.Generator().manual_seed(seed)
    K, batch, dim, n, length, groups = len(case.orders), case.batch, case.dim, case.n_state, case.length, case.groups

    def tokens(*lead: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
        return (torch.randn(*lead, length, dim, generator=gen) * scale + shift).to(case.dtype).transpose(-1, -2)

    def state_input() -> torch.Tensor:
        x = torch.randn(K, batch, length, groups, n, generator=gen).to(case.dtype).permute(0, 1, 3, 4, 2)
        return x[:, :, 0] if groups == 1 else x

    return dict(
        u=tokens(batch) if case.shared_u else tokens(K, batch),
        delta=tokens(K, batch, scale=0.5, shift=-1.0) if case.softplus else tokens(K, batch, scale=0.1, shift=0.3).abs(),
        A=-torch.exp(0.5 * torch.randn(K, dim, n, generator=gen)),
        B=state_input(),
        C=state_input(),
        D=torch.randn(K, dim, generator=gen) if case.has_D else None,
        z=tokens(batch) if case.has_z else None,
        delta_bias=torch.rand(K, dim, generator=gen) * 0.5 if case.has_bias else None,
    )


def cross_scan(x: torch.Tensor, order: int, height: int, width: int) -> torch.Tensor:
    """(..., L) in grid order -> (..., L) in the order's steps, as a copy: VMamba's cross_scan of one direction."""
    grid = x.unflatten(-1, (height, width))
    steps = grid.transpose(-1, -2).flatten(-2) if order in (1, 3) else grid.flatten(-2)
    return steps.flip(-1) if order in (2, 3) else steps


def cross_merge(y: torch.Tensor, order: int, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`cross_scan`: (..., L) in the order's steps -> grid order."""
    steps = y.flip(-1) if order in (2, 3) else y
    return steps.unflatten(-1, (width, height)).transpose(-1, -2).flatten(-2) if order in (1, 3) else steps


def expected_scan(inputs: dict, case: Case) -> torch.Tensor:
    """The merged output by the definition: each direction scanned forward on its cross-scanned copies."""
    merged = 0
    for k, order in enumerate(case.orders):

        def read(x, k=k, order=order, per_direction=True):
            if x is None:
                return None
            return cross_scan(x[k] if per_direction else x, order, case.height, case.width)

        out = selective_scan_ref(
            read(inputs["u"], per_direction=not case.shared_u),
            read(inputs["delta"]),
            inputs["A"][k],
            read(inputs["B"]),
            read(inputs["C"]),
            None if inputs["D"] is None else inputs["D"][k],
            read(inputs["z"], per_direction=False),
            None if inputs["delta_bias"] is None else inputs["delta_bias"][k],
            delta_softplus=case.softplus,
        )
        merged = merged + cross_merge(out, order, case.height, case.width)
    return merged


def device_of(backend: str) -> str:
    """Where a backend's inputs live: the GPU for Triton where there is one (else its interpreter on CPU), else CPU."""
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def run_against_reference(case: Case, backend: str) -> None:
    inputs = cross_scan_inputs(case)
    ref_inputs = leaves(inputs, torch.float64)
    expected = expected_scan(ref_inputs, case)
    dout = torch.randn(expected.shape, generator=torch.Generator().manual_seed(7))
    expected.backward(dout.double())

    tested = leaves(inputs, device=device_of(backend))
    out = cross_selective_scan(
        **tested, delta_softplus=case.softplus, grid=(case.height, case.width), orders=case.orders, backend=backend
    )
    assert out.shape == (case.batch, case.dim, case.length) and out.dtype == case.dtype
    tolerance = TOLERANCES[case.dtype]
    torch.testing.assert_close(out.cpu().double(), expected, **tolerance)
    out.backward(dout.to(out.device, out.dtype))
    for name, x in tested.items():
        if x is not None:
            assert x.grad.dtype == x.dtype and torch.isfinite(x.grad).all(), name
            expected_grad = ref_inputs[name].grad
            torch.testing.assert_close(x.grad.cpu().double(), expected_grad, **tolerance, msg=lambda m, n=name: f"d{n}: {m}")


CASES = {
    "4x4-N1-shared-u": Case(4, 4, n_state=1),
    "3x5-N8-G2-per-direction-u-bare": Case(3, 5, n_state=8, groups=2, shared_u=False, has_D=False, has_z=False, has_bias=False),
    "5x3-N8-D-only-no-softplus": Case(5, 3, n_state=8, has_z=False, has_bias=False, softplus=False, batch=1),
    "9x11-N1-over-a-chunk": Case(9, 11, n_state=1, batch=1, dim=3),
    "2x7-N1-bf16": Case(2, 7, n_state=1, dtype=torch.bfloat16),
    "3x4-N8-G2-fp16-per-direction-u": Case(3, 4, n_state=8, groups=2, shared_u=False, dtype=torch.float16),
    "4x3-columns-only": Case(4, 3, orders=(1, 3), n_state=2),
    "6x2-one-reversed-column-scan": Case(6, 2, orders=(3,), n_state=2, batch=1),
}
TRITON_CASES = ("4x4-N1-shared-u", "3x5-N8-G2-per-direction-u-bare", "2x7-N1-bf16", "6x2-one-reversed-column-scan")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", CASES)
def test_every_backend_matches_the_scan_of_explicit_cross_scanned_copies(name: str, backend: str):
    if backend == "triton" and name not in TRITON_CASES:
        pytest.skip("Triton's interpreter is slow: a few grids cover its index arithmetic")
    run_against_reference(CASES[name], backend)


@pytest.mark.parametrize("backend", ("torch", "native", "triton"))
def test_cross_scans_longer_than_a_chunk(backend: str):
    """Column-major steps over several checkpoint chunks: the backward passes restart from the checkpoints."""
    case = Case(10, 7, n_state=2, batch=1, dim=2, has_z=False)
    assert case.length > CHUNK_SIZE
    run_against_reference(case, backend)


@pytest.mark.parametrize("backend", ("torch", "native", "triton"))
def test_row_orders_are_bit_identical_to_the_one_and_two_direction_api(backend: str):
    """A cross scan with row orders only is today's scan: the same bits as selective_scan and the bidirectional call."""
    case = Case(3, 5, orders=(0, 2), shared_u=False)
    inputs = leaves(cross_scan_inputs(case), device=device_of(backend))
    grid = (case.height, case.width)

    old, new = leaves(inputs, device=device_of(backend)), leaves(inputs, device=device_of(backend))
    both = bidirectional_selective_scan(**old, delta_softplus=True, backend=backend)
    merged = cross_selective_scan(**new, grid=grid, orders=(0, 2), backend=backend)
    assert torch.equal(merged, both.sum(0))
    dout = torch.randn(merged.shape, generator=torch.Generator().manual_seed(3)).to(merged.device)
    both.backward(dout.expand_as(both))
    merged.backward(dout)
    for name, x in old.items():
        if x is not None:
            assert torch.equal(new[name].grad, x.grad), name

    one = {name: None if x is None else x.detach()[1] for name, x in inputs.items() if name != "z"}
    z = inputs["z"].detach()
    reversed_scan = selective_scan(**one, z=z, delta_softplus=True, reverse=True, backend=backend)
    as_cross = cross_selective_scan(
        **{name: None if x is None else x[None] for name, x in one.items()}, z=z, grid=grid, orders=(2,),
        backend=backend,
    )  # fmt: skip
    assert torch.equal(as_cross, reversed_scan)


def test_compiles_into_one_graph_with_its_gradients():
    """The cross scan goes through the same custom ops: torch.compile traces it with no graph break."""
    case = Case(3, 4, n_state=2)
    inputs = cross_scan_inputs(case)

    def scan(u, delta, A, B, C, D, z, delta_bias):
        return cross_selective_scan(u, delta, A, B, C, D, z, delta_bias, grid=(3, 4), backend="torch")

    eager, compiled = leaves(inputs), leaves(inputs)
    expected = scan(**eager)
    out = torch.compile(scan, fullgraph=True, backend="aot_eager")(**compiled)
    torch.testing.assert_close(out, expected)
    expected.sum().backward()
    out.sum().backward()
    for name, x in eager.items():
        torch.testing.assert_close(compiled[name].grad, x.grad, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(grid=(3, 5)), r"grid \(3, 5\) is not \(H, W\) with H \* W == L = 12"),
        (dict(orders=(0, 1, 2)), r"3 orders \(0, 1, 2\) for delta of shape \(4, 2, 4, 12\)"),
        (dict(orders=(0, 1, 2, 4)), r"orders \(0, 1, 2, 4\) must be codes in \(0, 1, 2, 3\)"),
    ],
)
def test_a_grid_or_orders_that_do_not_fit_are_named(change: dict, message: str):
    inputs = cross_scan_inputs(Case(3, 4))
    with pytest.raises(ValueError, match=message):
        cross_selective_scan(**inputs, **(dict(grid=(3, 4), backend="torch") | change))
