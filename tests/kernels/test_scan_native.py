"""The fused C kernel for CPU tensors (``backend="native"``) against the sequential reference.

The CASES grid, bidirectional, long-sequence and checkpoint tests run it too (test_scan_cpu.py, for both CPU
backends); here are the cases particular to the kernel: blocking of channels, memory layouts, dtypes, building.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from vim.kernels import bidirectional_selective_scan, scan_cpu, scan_native, selective_scan, selective_scan_ref

from support.grads import assert_close_all, leaves, run_with_grads
from support.native_builds import SIMD_LEVELS, use_build_for
from support.scans import TOLERANCES, scan_inputs, two_reference_scans

pytestmark = pytest.mark.skipif(not scan_native.native_available(), reason="no C compiler to build the fused CPU scan")


@pytest.mark.parametrize(
    "batch, dim, state, groups",
    [
        (2, 32, 16, None),  # the specialised kernel: N = 16, whole blocks of 16 channels
        (3, 24, 16, None),  # a full and a partial block of channels in each batch element
        (2, 48, 16, 3),  # three groups of B and C, one full block each
        (1, 36, 8, 3),  # groups of 12 channels: one partial block each
        (1, 20, 64, None),  # the largest state
        (2, 16, 20, None),  # the backward's lane sums: a run of 16 states folded at once, then 4 one by one
    ],
)
def test_channel_blocking_matches_reference(batch, dim, state, groups):
    inputs = scan_inputs(batch=batch, dim=dim, state=state, length=37, groups=groups, seed=dim)
    dout = torch.randn(batch, dim, 37, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    out, grads = run_with_grads(lambda **x: selective_scan(**x, delta_softplus=True, backend="native"), leaves(inputs), dout)
    ref, ref_grads = run_with_grads(lambda **x: selective_scan_ref(**x, delta_softplus=True), leaves(inputs, torch.float64), dout)
    torch.testing.assert_close(out.double(), ref, **TOLERANCES[torch.float32])
    assert_close_all(grads, ref_grads, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("threads", [1, 3, 8])
def test_any_thread_count_matches_reference(threads):
    """The channels are split over torch's thread count (more threads than blocks included); the per-thread
    sums of dB and dC add up to the whole."""
    inputs = scan_inputs(batch=2, dim=48, state=16, length=45, groups=None, seed=12)
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


def test_gradients_do_not_depend_on_which_thread_ran_what():
    """Threads claim slices of the work as they go; dB and dC are summed per slice, not per thread, so repeated
    backward passes on 3 threads give bit-identical gradients however the slices fell."""
    inputs = scan_inputs(batch=3, dim=64, state=16, length=40, seed=14)
    dout = torch.randn(3, 64, 40, generator=torch.Generator().manual_seed(9))
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        runs = [
            run_with_grads(lambda **x: selective_scan(**x, delta_softplus=True, backend="native"), leaves(inputs), dout)[1]
            for _ in range(4)
        ]
    finally:
        torch.set_num_threads(before)
    for grads in runs[1:]:
        for name, grad in grads.items():
            assert torch.equal(grad, runs[0][name]), name


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
    inputs = scan_inputs(batch=2, dim=40, state=16, length=70, groups=groups, lead=(2,), seed=11)
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


@pytest.mark.parametrize("march", SIMD_LEVELS)
def test_every_simd_width_matches_reference(march, monkeypatch, tmp_path):
    """Builds with 4 and 8 channels a job (the CPU's own build has 16 where it has AVX-512): both directions, a partial
    block, and a state of 20 (the lane sums of a whole run and of a tail)."""
    use_build_for(march, monkeypatch, tmp_path)
    inputs = scan_inputs(batch=2, dim=22, state=20, length=45, lead=(2,), seed=13)
    dout = torch.randn(2, 2, 22, 45, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    out, grads = run_with_grads(
        lambda **x: bidirectional_selective_scan(**x, delta_softplus=True, backend="native"), leaves(inputs), dout
    )
    expected, expected_grads = run_with_grads(two_reference_scans, leaves(inputs, torch.float64), dout)
    torch.testing.assert_close(out.double(), expected, **TOLERANCES[torch.float32])
    assert_close_all(grads, expected_grads, **TOLERANCES[torch.float32])


def test_half_precision_is_widened_to_float32():
    inputs = scan_inputs(batch=1, dim=32, state=16, length=40, dtype=torch.float16, seed=4)
    out = selective_scan(**inputs, delta_softplus=True, backend="native")
    widened = selective_scan(**{k: v.float() for k, v in inputs.items()}, delta_softplus=True, backend="native")
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, widened.half(), rtol=0, atol=0)


def test_saturated_decays_stay_finite():
    """Decays far below 2^-126 flush to zero and large ones are clamped, instead of turning into inf or NaN."""
    inputs = scan_inputs(batch=1, dim=16, state=16, length=50, decay=(50.0, 200.0), seed=5)
    inputs["delta"] = inputs["delta"].abs() * 20
    out = selective_scan(**inputs, delta_softplus=True, backend="native")
    ref = selective_scan_ref(**{k: v.double() for k, v in inputs.items()}, delta_softplus=True)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, **TOLERANCES[torch.float32])


def test_softplus_across_its_range_matches_reference():
    """The kernel's own softplus (no libm call) on raw step sizes from -30 to 30: past the linear threshold of 20, and
    where e^x is far below float32's resolution of 1 + e^x. Gradients go through its sigmoid."""
    inputs = scan_inputs(batch=1, dim=32, state=16, length=64, seed=9)
    steps = torch.linspace(-30.0, 30.0, 32 * 64).reshape(64, 32)[torch.randperm(64, generator=torch.Generator().manual_seed(1))]
    inputs["delta"] = steps[None].transpose(-1, -2)  # (1, D, L), channels-last
    inputs["A"] = inputs["A"] / 40  # long steps that still leave some state
    dout = torch.randn(1, 32, 64, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    out, grads = run_with_grads(lambda **x: selective_scan(**x, delta_softplus=True, backend="native"), leaves(inputs), dout)
    ref, ref_grads = run_with_grads(lambda **x: selective_scan_ref(**x, delta_softplus=True), leaves(inputs, torch.float64), dout)
    torch.testing.assert_close(out.double(), ref, **TOLERANCES[torch.float32])
    assert_close_all(grads, ref_grads, **TOLERANCES[torch.float32])


def test_float64_takes_the_exact_chunked_path():
    inputs = scan_inputs(length=20, dtype=torch.float64)
    out = selective_scan(**inputs, delta_softplus=True, backend="native")
    torch.testing.assert_close(out, selective_scan_ref(**inputs, delta_softplus=True), rtol=1e-12, atol=1e-12)


def test_without_a_compiler_it_warns_once_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setattr(scan_native, "_library", None)
    monkeypatch.setattr(scan_native, "_unavailable", None)
    monkeypatch.setenv("VIM_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    inputs = scan_inputs(length=30, groups=1, seed=6)
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
    inputs = scan_inputs(batch=3, dim=40, state=16, length=70, lead=(2,), seed=13)
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
    first = scan_native._build(*flags)
    assert first.parent == tmp_path and first.suffix == ".so"
    assert scan_native._build(*flags) == first
    # the library and the record of its size and checksum; no scratch files are left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.name, first.name + ".sha256"]


def _wrapped_compiler(tmp_path: Path) -> Path:
    """A compiler that adds $EXTRA_CFLAGS to every call: the same flags then enable other instruction sets,
    as ``-march=native`` does on another CPU."""
    wrapper = tmp_path / "cc-wrapper"
    wrapper.write_text(f'#!/bin/sh\nexec {scan_native._compiler()} "$@" $EXTRA_CFLAGS\n')
    wrapper.chmod(0o755)
    return wrapper


NATIVE_FLAGS = (("-O1", "-march=native", "-fPIC", "-pthread"), ("-pthread",))


def test_cache_key_follows_the_cpus_instruction_sets_not_the_compiler(monkeypatch):
    """A cache shared by two CPUs: one without AVX must not find the library built on one with it. The key is read
    from the OS's list of this CPU's instruction sets, so it is found without a compiler, whatever $CC names."""
    monkeypatch.setattr(scan_native, "_cpu_features", lambda: "avx avx2 fma sse4_2")
    with_avx = scan_native._cache_key(*NATIVE_FLAGS)
    monkeypatch.setenv("CC", "/nonexistent/cc")
    scan_native._find_compiler.cache_clear()
    assert scan_native._cache_key(*NATIVE_FLAGS) == with_avx, "the key is stable on one CPU, whatever the compiler"
    monkeypatch.setattr(scan_native, "_cpu_features", lambda: "sse4_2")
    assert scan_native._cache_key(*NATIVE_FLAGS) != with_avx
    scan_native._find_compiler.cache_clear()


def test_without_the_oss_list_the_key_follows_the_instruction_sets_the_flags_enable(monkeypatch, tmp_path):
    """Where the OS lists no instruction sets, the compiler's macros stand in: the same flags enabling other
    instruction sets (as ``-march=native`` does on another CPU) give another key."""
    if "__AVX__" not in scan_native._instruction_sets(scan_native._compiler(), ("-march=native",)):
        pytest.skip("this CPU has no AVX to switch off")
    monkeypatch.setattr(scan_native, "_cpu_features", lambda: None)
    monkeypatch.setenv("CC", str(_wrapped_compiler(tmp_path)))
    scan_native._find_compiler.cache_clear()
    monkeypatch.setenv("EXTRA_CFLAGS", "")
    with_avx = scan_native._cache_key(*NATIVE_FLAGS)
    monkeypatch.setenv("EXTRA_CFLAGS", "-mno-avx")
    assert scan_native._cache_key(*NATIVE_FLAGS) != with_avx
    monkeypatch.setenv("EXTRA_CFLAGS", "")
    assert scan_native._cache_key(*NATIVE_FLAGS) == with_avx, "the key is stable on one CPU"
    scan_native._find_compiler.cache_clear()


def _forget_the_kernel(monkeypatch) -> None:
    """As in a fresh process: the kernel not loaded, neither the compiler nor the cache looked up yet."""
    monkeypatch.setattr(scan_native, "_library", None)
    monkeypatch.setattr(scan_native, "_unavailable", None)
    scan_native._find_compiler.cache_clear()
    scan_native._found_in_cache.cache_clear()


def test_cached_library_loads_without_a_compiler(monkeypatch, tmp_path):
    """$CC naming a missing compiler and none on $PATH: the intact library in the cache is loaded, the native
    backend runs (not the chunked path), nothing is compiled and nothing warns."""
    built = Path(scan_native._load()._name)  # this process's library (built normally), copied into a fresh cache
    for file in (built, built.with_name(built.name + ".sha256")):
        shutil.copy(file, tmp_path)
    monkeypatch.setenv("VIM_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setenv("PATH", str(tmp_path / "no-compilers-here"))
    monkeypatch.delenv("VIM_SCAN_BACKEND", raising=False)
    _forget_the_kernel(monkeypatch)

    def no_compiling(*args, **kwargs):
        raise AssertionError(f"ran {args[0]}: a cached library needs no compiler")

    monkeypatch.setattr(scan_native.subprocess, "run", no_compiling)
    inputs = scan_inputs(length=20, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither "no C compiler found" nor "the fused CPU scan is unavailable"
        assert scan_native.native_available()
        out = selective_scan(**inputs, delta_softplus=True)  # backend "auto"
    assert scan_native._library is not None and Path(scan_native._library._name) == tmp_path / built.name
    torch.testing.assert_close(out, selective_scan_ref(**inputs, delta_softplus=True), **TOLERANCES[torch.float32])
    scan_native._find_compiler.cache_clear()
    scan_native._found_in_cache.cache_clear()


_SCAN_IN_A_FRESH_PROCESS = """
import torch
from vim.kernels import scan_native, selective_scan, selective_scan_ref
g = torch.Generator().manual_seed(0)
u, delta, B, C = (torch.randn(1, 16, 12, generator=g) for _ in range(4))
A = -torch.rand(16, 12, generator=g)[:, :4] - 0.5
out = selective_scan(u, delta.abs(), A, B[:, :4], C[:, :4], backend="native")
torch.testing.assert_close(out, selective_scan_ref(u, delta.abs(), A, B[:, :4], C[:, :4]), rtol=6e-4, atol=2e-3)
assert scan_native._library is not None
print("scan ok")
"""


def test_truncated_cached_library_is_rebuilt_not_loaded(tmp_path):
    """A cached library cut short (a full disk, a killed copy) would kill the process with a bus error when
    loaded; it is checked against its recorded size and checksum and rebuilt."""
    built = Path(scan_native._load()._name)  # this process's library, and the record written beside it
    library = tmp_path / built.name
    intact = built.read_bytes()
    library.write_bytes(intact[: len(intact) // 2])
    shutil.copy(built.with_name(built.name + ".sha256"), tmp_path)

    env = {**os.environ, "VIM_KERNEL_CACHE": str(tmp_path)}
    fresh = subprocess.run([sys.executable, "-c", _SCAN_IN_A_FRESH_PROCESS], env=env, capture_output=True, text=True)
    assert fresh.returncode == 0, f"exit status {fresh.returncode}: {fresh.stderr[-2000:]}"
    assert "scan ok" in fresh.stdout
    assert len(library.read_bytes()) == len(intact), "the truncated library was rebuilt in place"


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
