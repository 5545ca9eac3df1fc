"""The fused C kernels built for an older x86 instruction set than this CPU's, so that every SIMD width of the source
(16 lanes with AVX-512, 8 with AVX2, 4 without AVX) runs on the machine the tests run on."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest

from vim.kernels import scan_native

SIMD_LEVELS = {"x86-64": "sse2", "x86-64-v3": "avx2"}
"""-march levels below AVX-512, with the CPU flag each needs: 4 and 8 lanes a job."""


def use_build_for(march: str, monkeypatch: pytest.MonkeyPatch, cache: Path) -> None:
    """Make the native kernels a fresh ``-march=march`` build, cached under ``cache``, for the rest of the test;
    skip where this CPU cannot run it or no compiler is found."""
    features = (scan_native._cpu_features() or "").split()  # the OS's list, as the kernel cache keys builds
    if platform.machine() not in ("x86_64", "AMD64") or SIMD_LEVELS[march] not in features:
        pytest.skip(f"-march={march} builds run on x86 CPUs with {SIMD_LEVELS[march]}")
    monkeypatch.setattr(scan_native, "_library", None)
    monkeypatch.setattr(scan_native, "_unavailable", None)
    monkeypatch.setenv("VIM_KERNEL_CACHE", str(cache))
    build = (("-O3", f"-march={march}", "-ffast-math", "-fPIC", "-pthread"), ("-pthread",))
    monkeypatch.setattr(scan_native, "_variants", lambda: [build])
    if not scan_native.native_available():
        pytest.skip(f"no -march={march} build: {scan_native._unavailable}")
