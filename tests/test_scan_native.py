"""The fused C forward for CPU tensors (``backend="native"``) against the sequential reference."""

from __future__ import annotations

import warnings

import pytest
import torch
from test_scan_cpu import CASES, TOLERANCES, make_inputs

from vim.kernels import scan_cpu, scan_native, selective_scan, selective_scan_ref

pytestmark = pytest.mark.skipif(not scan_native.native_available(), reason="no C compiler to build the fused CPU scan")


def _flags(inputs: dict, optional: bool, softplus: bool) -> dict:
    if not optional:
        inputs.update(D=None, z=None, delta_bias=None)
    if not softplus:  # keep delta + delta_bias positive, as softplus would
        inputs["delta"] = inputs["delta"].abs()
        inputs["delta_bias"] = None if inputs["delta_bias"] is None else inputs["delta_bias"].abs()
    return inputs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("length, reverse, groups, optional, softplus", CASES)
def test_forward_matches_reference(dtype, length, reverse, groups, optional, softplus):
    inputs = _flags(make_inputs(length=length, groups=groups, dtype=dtype, seed=length), optional, softplus)
    out, last = selective_scan(**inputs, delta_softplus=softplus, reverse=reverse, return_last_state=True, backend="native")
    ref, ref_last = selective_scan_ref(
        **{k: None if v is None else v.double() for k, v in inputs.items()},
        delta_softplus=softplus, reverse=reverse, return_last_state=True,
    )  # fmt: skip
    assert out.dtype == dtype and out.stride(1) == 1, "output must be channels-last in the input dtype"
    torch.testing.assert_close(out.double(), ref, **TOLERANCES[dtype])
    torch.testing.assert_close(last.double(), ref_last, **TOLERANCES[dtype])


@pytest.mark.parametrize(
    "batch, dim, state, groups",
    [
        (2, 32, 16, None),  # the specialised kernel: N = 16, whole blocks of 16 rows in one batch element
        (3, 24, 16, None),  # blocks of rows that straddle two batch elements, and a partial last block
        (2, 48, 16, 3),  # groups of B and C inside one block
        (1, 20, 64, None),  # the largest state
    ],
)
def test_row_blocking_matches_reference(batch, dim, state, groups):
    inputs = make_inputs(batch=batch, dim=dim, state=state, length=37, groups=groups, seed=dim)
    out = selective_scan(**inputs, delta_softplus=True, backend="native")
    ref = selective_scan_ref(**{k: v.double() for k, v in inputs.items()}, delta_softplus=True)
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
    assert not scan_native.native_available()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scan_native.native_forward(*canonical)  # no second warning


def test_build_is_cached_by_source_and_flags(monkeypatch, tmp_path):
    monkeypatch.setenv("VIM_KERNEL_CACHE", str(tmp_path))
    first = scan_native._build(scan_native._compiler())
    assert first.parent == tmp_path and first.suffix == ".so"
    assert scan_native._build(scan_native._compiler()) == first
    assert [p.name for p in tmp_path.iterdir()] == [first.name], "no scratch files are left behind"
