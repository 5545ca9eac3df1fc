"""The fused CPU forward: a small C kernel (``scan_native.c``) built on first use and called through ctypes.

Why C: the chunked PyTorch path (:mod:`vim.kernels.scan_cpu`) runs dozens of eager operations over
``(L, dim, N)`` buffers and is bound by those memory passes; this kernel walks the sequence once
with the state in registers and never stores anything of size ``(L, dim, N)``.

Building: the first call compiles the plain C source (no Python or PyTorch headers, about a
second) with ``$CC`` or the first of ``cc``, ``gcc``, ``clang`` on PATH, tuned for this CPU, and caches
the library under ``$VIM_KERNEL_CACHE`` (default ``~/.cache/vim-toolkit``), keyed by the source,
the flags and the machine. Nothing is compiled at install time. Without a working compiler the
forward falls back to the chunked path, with one warning.

Threads: the rows (``batch * dim`` channels) are split into ``torch.get_num_threads()`` ranges,
each scanned by a worker thread (ctypes releases the GIL), so no second OpenMP runtime is loaded.

Float64 input takes the chunked path (its arithmetic stays in float64); other dtypes are scanned
in float32. The backward pass is the chunked path's (:func:`chunked_backward`), which recomputes
the states itself.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

from .scan_cpu import chunked_backward, chunked_forward
from .scan_layout import CHUNK_SIZE, MAX_STATE, empty_channels_last, num_chunks

__all__ = ["native_available", "native_backward", "native_forward"]

SOURCE = Path(__file__).with_name("scan_native.c")
FLAG_SETS = (
    ("-O3", "-march=native", "-ffast-math", "-shared", "-fPIC"),
    ("-O3", "-ffast-math", "-shared", "-fPIC"),
)
"""Compiler flags to try in order: tuned for this CPU first, then portable."""

LANES = 16
"""Rows scanned together by the kernel (keep equal to LANES in the C source)."""

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_unavailable: str | None = None
_pool: ThreadPoolExecutor | None = None
_pool_size = 0


def _compiler() -> str | None:
    candidates = [os.environ["CC"]] if os.environ.get("CC") else ["cc", "gcc", "clang"]
    return next((path for name in candidates if (path := shutil.which(name))), None)


def _cache_dir() -> Path:
    return Path(os.environ.get("VIM_KERNEL_CACHE", Path.home() / ".cache" / "vim-toolkit"))


def _build(compiler: str) -> Path:
    """Compile the kernel (or find it in the cache); the library's path."""
    source = SOURCE.read_bytes()
    errors = []
    for flags in FLAG_SETS:
        key = hashlib.sha256(source + repr((flags, compiler, platform.machine(), platform.processor())).encode())
        target = _cache_dir() / f"scan_native-{key.hexdigest()[:20]}.so"
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
            built = Path(scratch) / target.name
            result = subprocess.run([compiler, *flags, str(SOURCE), "-o", str(built), "-lm"], capture_output=True, text=True)
            if result.returncode == 0:
                os.replace(built, target)  # atomic: a concurrent build of the same key is harmless
                return target
            errors.append(f"{' '.join(flags)}: {result.stderr.strip()[-500:]}")
    raise RuntimeError("compiling scan_native.c failed:\n" + "\n".join(errors))


def _load() -> ctypes.CDLL | None:
    """The kernel library, building it on first use; None (after one warning) if it cannot be built."""
    global _library, _unavailable
    with _lock:
        if _library is not None or _unavailable is not None:
            return _library
        compiler = _compiler()
        try:
            if compiler is None:
                raise RuntimeError("no C compiler found (set $CC, or install gcc or clang)")
            library = ctypes.CDLL(str(_build(compiler)))
        except (OSError, RuntimeError, subprocess.SubprocessError) as error:
            _unavailable = str(error)
            warnings.warn(f"vim.kernels: the fused CPU scan is unavailable, using the chunked path: {error}", stacklevel=3)
            return None
        pointer, i64 = ctypes.c_void_p, ctypes.c_int64
        library.vim_scan_forward.restype = ctypes.c_int
        library.vim_scan_forward.argtypes = [i64, i64, i64, i64, i64, ctypes.c_int, ctypes.c_int] + [pointer] * 11 + [i64, i64]
        _library = library
        return library


def native_available() -> bool:
    """Whether the fused kernel is built or can be built here (a C compiler is on PATH)."""
    return _library is not None or (_unavailable is None and _compiler() is not None)


def _row_ranges(rows: int) -> list[tuple[int, int]]:
    """Split ``rows`` into one range per thread, on multiples of LANES."""
    blocks = -(-rows // LANES)
    workers = max(1, min(torch.get_num_threads(), blocks))
    bounds = [min(rows, LANES * (blocks * i // workers)) for i in range(workers + 1)]
    return [(lo, hi) for lo, hi in zip(bounds, bounds[1:]) if hi > lo]


def _run(library: ctypes.CDLL, args: tuple, rows: int) -> None:
    """Call the kernel over all rows, one range per worker thread."""
    global _pool, _pool_size
    ranges = _row_ranges(rows)
    if len(ranges) == 1:
        status = [library.vim_scan_forward(*args, *ranges[0])]
    else:
        if _pool_size < len(ranges):  # more threads than before: replace the pool, releasing the old one's threads
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool, _pool_size = ThreadPoolExecutor(len(ranges), thread_name_prefix="vim-scan"), len(ranges)
        status = list(_pool.map(lambda bounds: library.vim_scan_forward(*args, *bounds), ranges))
    if any(status):
        raise ValueError(f"the fused CPU scan supports at most {MAX_STATE} states (scan_native.c's MAX_STATE)")


def _time_major(x: Tensor) -> Tensor:
    """(batch, *rest, L) -> contiguous (L, batch, *rest) float32."""
    return x.movedim(-1, 0).to(torch.float32, memory_format=torch.contiguous_format).contiguous()


def _one_direction(library, u, delta, A, B, C, D, z_t, delta_bias, delta_softplus: bool, reverse: bool, checkpoints) -> Tensor:
    """One direction: u, delta (batch, dim, L); A (dim, N); B, C (batch, G, N, L); D, delta_bias (dim,) or None;
    z_t (L, batch * dim) float32 or None.

    Fills ``checkpoints`` (batch, chunks, dim, N) and returns ``(C . h + D u) * silu(z)`` as (L, batch, dim) float32.
    """
    batch, dim, length = u.shape
    groups, n_state = B.shape[1], B.shape[2]
    rows = batch * dim
    delta_t, u_t, B_t, C_t = (_time_major(x) for x in (delta, u, B, C))
    A2 = (A.float() * math.log2(math.e)).repeat(batch, 1)
    D_rows, bias_rows = (u_t.new_zeros(rows) if x is None else x.float().repeat(batch) for x in (D, delta_bias))
    group = torch.arange(rows, device=u.device) // (dim // groups)
    y = torch.empty_like(u_t)
    saved = u_t.new_empty(num_chunks(length), batch, dim, n_state)
    pointers = [x.data_ptr() for x in (delta_t, u_t)] + [None if z_t is None else z_t.data_ptr()]
    pointers += [x.data_ptr() for x in (B_t, C_t, A2, D_rows, bias_rows, group, y, saved)]
    shape = (length, rows, batch * groups, n_state, CHUNK_SIZE, int(reverse), int(delta_softplus))
    _run(library, (*shape, *pointers), rows)
    checkpoints.copy_(saved.transpose(0, 1))
    return y


def native_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool, reverse: bool) -> tuple[Tensor, Tensor]:
    """Forward pass in the canonical form (see scan_layout): ``out`` (K, batch, dim, L), ``checkpoints``."""
    library = None if u.dtype == torch.float64 else _load()
    if library is None:
        return chunked_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse)
    K, batch, dim, length = u.shape
    out = empty_channels_last(K, batch, dim, length, like=u)
    checkpoints = u.new_empty(K, batch, num_chunks(length), dim, A.shape[-1], dtype=torch.float32)
    z_t = None if z is None else _time_major(z)
    for k in range(K):
        y = _one_direction(
            library, u[k], delta[k], A[k], B[k], C[k], None if D is None else D[k], z_t,
            None if delta_bias is None else delta_bias[k], delta_softplus, reverse != (k == 1), checkpoints[k],
        )  # fmt: skip
        out[k].copy_(y.permute(1, 2, 0))
    return out, checkpoints


native_backward = chunked_backward
"""The backward pass: the chunked path's, which recomputes the states itself."""
