"""The fused C kernel for CPU tensors (``backend="native"``) against the sequential reference.

The CASES grid, bidirectional, long-sequence and checkpoint tests run it too (test_scan_cpu.py, for both CPU
backends); here are the cases particular to the kernel: blocking of channels, memory layouts, dtypes, building.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from test_scan_cpu import TOLERANCES, assert_close_all, leaves, make_inputs, run_with_grads, two_reference_scans

from vim.kernels import bidirectional_selective_scan, scan_cpu, scan_native, selective_scan, selective_scan_ref

pytestmark = pytest.mark.skipif(not scan_native.native_available(), reason="no C compiler to build the fused CPU scan")


@pytest.mark.parametrize(
    "batch, dim, state, groups",
    [
        (2, 32, 16, None),  # the specialised kernel: N = 16, whole blocks of 16 channels
        (3, 24, 16, None),  # a full and a partial block of channels in each batch element
        (2, 48, 16, 3),  # three groups of B and C, one full block each
        (1, 36, 8, 3),  # groups of 12 channels: one partial block each
        (1, 20, 64, None),  # the largest state
    ],
)
def test_channel_blocking_matches_reference(batch, dim, state, groups):
    inputs = make_inputs(batch=batch, dim=dim, state=state, length=37, groups=groups, seed=dim)
    dout = torch.randn(batch, dim, 37, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    out, grads = run_with_grads(lambda **x: selective_scan(**x, delta_softplus=True, backend="native"), leaves(inputs), dout)
    ref, ref_grads = run_with_grads(lambda **x: selective_scan_ref(**x, delta_softplus=True), leaves(inputs, torch.float64), dout)
    torch.testing.assert_close(out.double(), ref, **TOLERANCES[torch.float32])
    assert_close_all(grads, ref_grads, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("threads", [1, 3, 8])
def test_any_thread_count_matches_reference(threads):
    """The channels are split over torch's thread count (more threads than blocks included); the per-thread
    sums of dB and dC add up to the whole."""
    inputs = make_inputs(batch=2, dim=48, state=16, length=45, groups=None, seed=12)
    dout = torch.randn(2, 48, 45, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out, grads = run_with_grads(lambda **x: selective_scan(**x, delta_softplus=True, backend="native"), leaves(inputs), dout)
    finally:
        torch.set_num_threads(before)
    ref, ref_grads = run_with_grads(lambda **x: selective_scan_ref(**x, delta_softplus=True), leaves(inputs, torch.float64), dout)
    torch.testing.assert_close(out.double(), ref, **TOLERANCES[torch.float32])
    assert_close_all(grads, ref_grads, **TOLERANCES[torch.float32])


def _layouts(inputs: dict) -> dict[str, dict]:
    """The same values in the memory layouts a caller can hand over: the kernel reads each in place."""

    def strided_in_time(x):  # every other element of a twice-as-long buffer along L
        return torch.stack([x, torch.zeros_like(x)], dim=-1).flatten(-2)[..., ::2]

    def channel_slice(x):  # the first half of a (..., L, 2 * dim) buffer, as a mixer's in_proj output is split
        wide = torch.cat([x.transpose(-1, -2), torch.full_like(x.transpose(-1, -2), float("nan"))], dim=-1)
        return wide[..., : x.shape[-2]].transpose(-1, -2)

    sequences = ("u", "delta", "z", "B", "C")
    return {
        "channels-last": inputs,
        "contiguous": {k: v.contiguous() for k, v in inputs.items()},
        "strided in time": {k: strided_in_time(v) if k in sequences else v for k, v in inputs.items()},
        "channel slice": {k: channel_slice(v) if k in ("u", "delta", "z") else v for k, v in inputs.items()},
    }


@pytest.mark.parametrize("groups", [None, 2])
def test_every_memory_layout_matches_reference_both_directions(groups):
    """Both directions in one call (dim 40: two full blocks of 16 channels and a partial one; groups of 20
    give each group a full and a partial block), for channels-last, contiguous and strided inputs, gradients too."""
    inputs = make_inputs(batch=2, dim=40, state=16, length=70, groups=groups, lead=(2,), seed=11)
    dout = torch.randn(2, 2, 40, 70, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    expected, expected_grads = run_with_grads(two_reference_scans, leaves(inputs, torch.float64), dout)
    for layout, tensors in _layouts(inputs).items():
        out, grads = run_with_grads(
            lambda **x: bidirectional_selective_scan(**x, delta_softplus=True, backend="native"), leaves(tensors), dout
        )
        torch.testing.assert_close(out.double(), expected, **TOLERANCES[torch.float32], msg=lambda m, n=layout: f"{n}: {m}")
        for name, grad in expected_grads.items():
            torch.testing.assert_close(
                grads[name].double(), grad, **TOLERANCES[torch.float32], msg=lambda m, n=layout, g=name: f"{n}, d{g}: {m}"
            )


def test_half_precision_is_widened_to_float32():
    inputs = make_inputs(batch=1, dim=32, state=16, length=40, dtype=torch.float16, seed=4)
    out = selective_scan(**inputs, delta_softplus=True, backend="native")
    widened = selective_scan(**{k: v.float() for k, v in inputs.items()}, delta_softplus=True, backend="native")
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, widened.half(), rtol=0, atol=0)


def test_saturated_decays_stay_finite():
    """Decays far below 2^-126 flush to zero and large ones are clamped, instead of turning into inf or NaN."""
    inputs = make_inputs(batch=1, dim=16, state=16, length=50, decay=(50.0, 200.0), seed=5)
    inputs["delta"] = inputs["delta"].abs() * 20
    out = selective_scan(**inputs, delta_softplus=True, backend="native")
    ref = selective_scan_ref(**{k: v.double() for k, v in inputs.items()}, delta_softplus=True)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, **TOLERANCES[torch.float32])


def test_float64_takes_the_exact_chunked_path():
    inputs = make_inputs(length=20, dtype=torch.float64)
    out = selective_scan(**inputs, delta_softplus=True, backend="native")
    torch.testing.assert_close(out, selective_scan_ref(**inputs, delta_softplus=True), rtol=1e-12, atol=1e-12)


def test_without_a_compiler_it_warns_once_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setattr(scan_native, "_library", None)
    monkeypatch.setattr(scan_native, "_unavailable", None)
    monkeypatch.setenv("VIM_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    inputs = make_inputs(length=30, groups=1, seed=6)
    canonical = (*(inputs[k][None] for k in ("u", "delta", "A", "B", "C", "D")), inputs["z"], inputs["delta_bias"][None])
    canonical = (*canonical, True, False)
    with pytest.warns(UserWarning, match="fused CPU scan is unavailable"):
        out, checkpoints = scan_native.native_forward(*canonical)
    expected, expected_checkpoints = scan_cpu.chunked_forward(*canonical)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(checkpoints, expected_checkpoints)
    dout = torch.randn_like(out)
    for grad, expected_grad in zip(
        scan_native.native_backward(dout, *canonical, checkpoints), scan_cpu.chunked_backward(dout, *canonical, checkpoints)
    ):
        torch.testing.assert_close(grad, expected_grad)
    assert not scan_native.native_available()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scan_native.native_forward(*canonical)  # no second warning


def test_build_on_its_own_threads_matches_reference(monkeypatch, tmp_path):
    """The build without OpenMP (where torch does not run on libgomp) starts threads of its own."""
    monkeypatch.setattr(scan_native, "_library", None)
    monkeypatch.setattr(scan_native, "_unavailable", None)
    monkeypatch.setattr(scan_native, "_variants", lambda: [(("-O2", "-fPIC", "-pthread"), ("-pthread",))])
    monkeypatch.setenv("VIM_KERNEL_CACHE", str(tmp_path))
    inputs = make_inputs(batch=3, dim=40, state=16, length=70, lead=(2,), seed=13)
    dout = torch.randn(2, 3, 40, 70, generator=torch.Generator().manual_seed(6), dtype=torch.float64)

    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        out, grads = run_with_grads(
            lambda **x: bidirectional_selective_scan(**x, delta_softplus=True, backend="native"), leaves(inputs), dout
        )
    finally:
        torch.set_num_threads(before)
    assert scan_native._library is not None, "the pthread build must load"
    expected, expected_grads = run_with_grads(two_reference_scans, leaves(inputs, torch.float64), dout)
    torch.testing.assert_close(out.double(), expected, **TOLERANCES[torch.float32])
    assert_close_all(grads, expected_grads, **TOLERANCES[torch.float32])


def test_build_is_cached_by_source_and_flags(monkeypatch, tmp_path):
    monkeypatch.setenv("VIM_KERNEL_CACHE", str(tmp_path))
    flags = scan_native._variants()[-1]  # the portable build
    first = scan_native._build(scan_native._compiler(), *flags)
    assert first.parent == tmp_path and first.suffix == ".so"
    assert scan_native._build(scan_native._compiler(), *flags) == first
    assert [p.name for p in tmp_path.iterdir()] == [first.name], "no scratch files are left behind"


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc to list the loaded libraries")
def test_kernel_adds_no_openmp_runtime(monkeypatch, tmp_path):
    """Where torch runs on libgomp the kernel is linked against that same library: no second runtime is loaded."""
    monkeypatch.setattr(scan_native, "_library", None)
    monkeypatch.setattr(scan_native, "_unavailable", None)
    monkeypatch.setenv("VIM_KERNEL_CACHE", str(tmp_path))

    def runtimes() -> set[str]:
        return {path for path in scan_native._loaded_libraries() if "gomp" in Path(path).name or "libomp" in Path(path).name}

    before = runtimes()
    assert scan_native._load() is not None
    assert runtimes() == before
    if "parallel backend: OpenMP" in torch.__config__.parallel_info():
        assert scan_native._torch_libgomp() in before, "torch's OpenMP runtime was not found"
