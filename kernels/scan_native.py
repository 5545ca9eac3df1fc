"""The fused CPU scan, forward and backward: a small C kernel (``scan_native.c``) built on first use, called through ctypes.

Why C: the chunked PyTorch path (:mod:`vim.kernels.scan_cpu`) runs dozens of eager operations over
``(L, dim, N)`` buffers and is bound by those memory passes; this kernel walks the sequence once
with the state in registers and never stores anything of size ``(L, dim, N)``.

Building: the first call compiles the plain C source (no Python or PyTorch headers, about a
second) with ``$CC`` or the first of ``cc``, ``gcc``, ``clang`` on PATH, tuned for this CPU, and caches
the library under ``$VIM_KERNEL_CACHE`` (default ``~/.cache/vim-toolkit``). Nothing is compiled at
install time. A library found intact in the cache is loaded without a compiler (none need be installed,
and ``$CC`` is not read); only when none is cached is one needed. Without a cached library and a
working compiler both passes fall back to the chunked path, with one warning.

The cache may be shared (a home directory on several machines, a container image), so its key holds
the source, the flags, the machine and this CPU's instruction sets, read from the list the OS keeps
(``/proc/cpuinfo``'s flags): another CPU gets its own build instead of an illegal instruction, and
the key is found without a compiler. The compiler is not part of the key: any compiler's build from this
source and these flags runs correctly on this CPU, so a cached build serves whatever ``$CC`` names
(to rebuild with another compiler, delete the cached file). Where the OS keeps no such list the
compiler's predefined macros under the flags stand in for it (its version and the instruction sets
``-march=native`` enables), and then a compiler is needed to find the key. Beside each library a
``.sha256`` file records its size and checksum at build time; a library that does not match (a
truncated copy would kill the process with a bus error when loaded) is rebuilt instead of loaded.

Calling: the kernel reads the canonical tensors (:mod:`vim.kernels.scan_layout`) through their
strides, so nothing is copied or transposed on the way in, and it writes the channels-last output,
the checkpoints and the gradients in place. It runs on ``torch.get_num_threads()`` threads (ctypes
releases the GIL): those of torch's own OpenMP pool where torch runs on libgomp (the kernel is linked
against that very library, so no second runtime is loaded), else threads of its own. They claim
fixed slices of the work as they go (``SLICES_PER_THREAD``), so a thread descheduled on a busy
machine does not hold the others up, and the sums per slice keep results independent of timing.

Float16 and bfloat16 are widened to float32 first (float64 never gets here: the public API sends it
to the chunked path, whose arithmetic stays in float64). The backward pass recomputes the states
chunk by chunk from the forward's checkpoints, as the Triton kernels do.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import re
import shutil
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from .scan_cpu import chunked_backward, chunked_forward
from .scan_layout import (
    CHUNK_SIZE,
    MAX_DIRECTIONS,
    MAX_STATE,
    as_channels_last,
    direction_orders,
    empty_channels_last,
    empty_checkpoints,
    grid_shape,
)

__all__ = ["native_available", "native_backward", "native_forward"]

SOURCE = Path(__file__).with_name("scan_native.c")
_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_unavailable: str | None = None
NO_COMPILER = "no C compiler found (set $CC, or install gcc or clang)"

SLICES_PER_THREAD = 4
"""The kernels' jobs are cut into this many slices per thread, which the threads claim as they go: on a shared
machine a descheduled thread holds up a quarter of its share, not all of it (scan_native.c's parallel_slices)."""


POINTERS = (
    "u", "delta", "z", "B", "C", "A", "D", "bias", "out", "checkpoints",
    "dout", "du", "ddelta", "dz", "dB", "dC", "dA", "dD", "dbias",
)  # fmt: skip
"""The tensors of ScanArgs, in the order of its fields."""


class ScanArgs(ctypes.Structure):
    """The kernel's argument block (``ScanArgs`` in scan_native.c): float32 pointers, strides in elements."""

    _fields_ = [
        *((name, ctypes.c_int64) for name in ("length", "batch", "dim", "groups", "n_state", "directions", "chunk")),
        ("threads", ctypes.c_int64),
        ("slices", ctypes.c_int64),
        ("reverse", ctypes.c_int64),
        ("delta_softplus", ctypes.c_int64),
        ("height", ctypes.c_int64),
        ("width", ctypes.c_int64),
        ("orders", ctypes.c_int64 * MAX_DIRECTIONS),
        *((name, ctypes.c_void_p) for name in POINTERS),
        ("u_stride", ctypes.c_int64 * 4),
        ("delta_stride", ctypes.c_int64 * 4),
        ("dout_stride", ctypes.c_int64 * 4),
        ("z_stride", ctypes.c_int64 * 3),
        ("B_stride", ctypes.c_int64 * 5),
        ("C_stride", ctypes.c_int64 * 5),
    ]


def _compiler() -> str | None:
    """``$CC``, else the first of cc, gcc, clang on ``$PATH``; None if there is none."""
    return _find_compiler(os.environ.get("CC"), os.environ.get("PATH"))


@functools.lru_cache(maxsize=8)
def _find_compiler(cc: str | None, search_path: str | None) -> str | None:
    """Looked up once per ($CC, $PATH): ``auto`` asks on every CPU call until the kernel is loaded, and only when
    no library is cached. Finding none warns (once per lookup): CPU scans then take the chunked PyTorch path."""
    candidates = [cc] if cc else ["cc", "gcc", "clang"]
    found = next((found for name in candidates if (found := shutil.which(name, path=search_path))), None)
    if found is None:
        warnings.warn(
            f"vim.kernels: no C compiler found ({'$CC=' + cc if cc else 'cc, gcc or clang on $PATH'}), so CPU scans run "
            "the chunked PyTorch path instead of the fused C kernel (several times slower); install gcc or set $CC",
            stacklevel=2,
        )
    return found


def _cache_dir() -> Path:
    return Path(os.environ.get("VIM_KERNEL_CACHE", Path.home() / ".cache" / "vim-toolkit"))


def _loaded_libraries() -> list[str]:
    """Paths of the shared libraries loaded in this process (empty where /proc is missing)."""
    maps = Path("/proc/self/maps")
    return [line.rsplit(" ", 1)[-1] for line in maps.read_text().splitlines()] if maps.exists() else []


def _torch_libgomp() -> str | None:
    """The GNU OpenMP runtime torch runs its intra-op threads on (Linux wheels ship one), or None."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    runtimes = sorted({path for path in _loaded_libraries() if re.fullmatch(r"libgomp[\w.-]*\.so[\d.]*", Path(path).name)})
    package = Path(torch.__file__).resolve().parent
    shipped = [path for path in runtimes if Path(path).resolve().parent in (package / "lib", package.parent / "torch.libs")]
    # torch's own copy; else the only one loaded (a system torch linked against the system's libgomp)
    return shipped[0] if shipped else runtimes[0] if len(runtimes) == 1 else None


def _variants() -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    """(compile flags, link flags) to try in order.

    First, where torch runs on libgomp, an OpenMP build linked against that very library, so that the
    kernel's threads are torch's own pool (threads of our own would compete with torch's OpenMP workers,
    which spin for a while after each operation); then our own threads, tuned for this CPU; then portable.
    """
    tuned = ("-O3", "-march=native", "-ffast-math", "-fPIC")
    libgomp = _torch_libgomp()
    openmp = [((*tuned, "-fopenmp"), (libgomp,))] if libgomp else []
    return [*openmp, ((*tuned, "-pthread"), ("-pthread",)), (("-O3", "-ffast-math", "-fPIC", "-pthread"), ("-pthread",))]


@functools.cache
def _cpu_features() -> str | None:
    """This CPU's instruction sets as the OS lists them (``/proc/cpuinfo``'s flags, Features or isa line), sorted;
    None where there is no such list."""
    try:
        listing = re.search(r"^(?:flags|Features|isa)\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
    except OSError:
        return None
    return " ".join(sorted(set(listing.group(1).split()))) if listing else None


def _instruction_sets(compiler: str, compile_flags: tuple[str, ...]) -> str:
    """The compiler's predefined macros under ``compile_flags``: its version and, for ``-march=native``,
    the instruction sets of this CPU (``__AVX2__``, ``__AVX512F__``, ...). RuntimeError if the compiler fails."""
    command = [compiler, *compile_flags, "-dM", "-E", "-x", "c", os.devnull]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{' '.join(command)}: {result.stderr.strip()[-500:]}")
    return "\n".join(sorted(result.stdout.splitlines()))


def _this_cpu(compile_flags: tuple[str, ...]) -> str:
    """This CPU's instruction sets for the cache key: the OS's list, else the compiler's macros under ``compile_flags``
    (RuntimeError without a compiler)."""
    features = _cpu_features()
    if features is not None:
        return features
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError(NO_COMPILER)
    return _instruction_sets(compiler, compile_flags)


def _cache_key(compile_flags: tuple[str, ...], link_flags: tuple[str, ...]) -> str:
    """Hex key of a build: the source, the flags, the machine and this CPU's instruction sets (no compiler: see above)."""
    identity = repr((compile_flags, link_flags, platform.machine())) + _this_cpu(compile_flags)
    return hashlib.sha256(SOURCE.read_bytes() + identity.encode()).hexdigest()[:20]


def _library_path(compile_flags: tuple[str, ...], link_flags: tuple[str, ...]) -> Path:
    """Where the build for these flags on this CPU is cached."""
    return _cache_dir() / f"scan_native-{_cache_key(compile_flags, link_flags)}.so"


def _fingerprint(library: Path) -> str:
    """Size and sha256 of a file, as "<size> <sha256>": what a cached library must still match to be loaded."""
    data = library.read_bytes()
    return f"{len(data)} {hashlib.sha256(data).hexdigest()}"


def _checksum_file(library: Path) -> Path:
    return library.with_name(library.name + ".sha256")


def _intact(library: Path) -> bool:
    """Whether ``library`` exists and matches the size and checksum recorded when it was built."""
    record = _checksum_file(library)
    return library.exists() and record.exists() and record.read_text().strip() == _fingerprint(library)


def _cached(compile_flags: tuple[str, ...], link_flags: tuple[str, ...]) -> Path | None:
    """The library of this build if it is intact in the cache, else None (also where its key needs a missing compiler)."""
    try:
        target = _library_path(compile_flags, link_flags)
    except (RuntimeError, subprocess.SubprocessError):
        return None
    return target if _intact(target) else None


@functools.lru_cache(maxsize=8)
def _found_in_cache(cache_dir: Path) -> bool:
    """Whether a build of any variant is intact in ``cache_dir``: looked up once per cache directory, as the compiler is."""
    return any(_cached(*flags) is not None for flags in _variants())


def _build(compile_flags: tuple[str, ...], link_flags: tuple[str, ...]) -> Path:
    """The library's path: found intact in the cache, else compiled and linked, only then with a compiler.
    RuntimeError if there is none or it fails."""
    target = _library_path(compile_flags, link_flags)
    if _intact(target):
        return target
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError(NO_COMPILER)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built, objects = Path(scratch) / target.name, Path(scratch) / "scan_native.o"
        for command in (
            [compiler, *compile_flags, "-c", str(SOURCE), "-o", str(objects)],
            [compiler, "-shared", str(objects), *link_flags, "-lm", "-o", str(built)],
        ):
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode:
                raise RuntimeError(f"{' '.join(command)}: {result.stderr.strip()[-500:]}")
        record = _checksum_file(built)
        record.write_text(_fingerprint(built) + "\n")
        # atomic renames: a concurrent build of the same key is harmless, and a reader that finds the record
        # of one build beside the library of another rebuilds
        record.replace(_checksum_file(target))
        built.replace(target)
    return target


def _candidates(errors: list[str]) -> Iterator[Path]:
    """Libraries to try loading, best first: the builds found intact in the cache (no compiler is looked up for
    them), then each variant built; a build that fails is noted in ``errors``."""
    variants = _variants()
    yield from (path for flags in variants if (path := _cached(*flags)) is not None)
    for flags in variants:
        try:
            yield _build(*flags)
        except (OSError, RuntimeError, subprocess.SubprocessError) as error:
            errors.append(str(error))


def _load() -> ctypes.CDLL | None:
    """The kernel library, from the cache or built on first use; None (after one warning) if it cannot be built."""
    global _library, _unavailable
    with _lock:
        if _library is not None or _unavailable is not None:
            return _library
        library: ctypes.CDLL | None = None
        errors: list[str] = []
        for path in _candidates(errors):
            try:
                library = ctypes.CDLL(str(path))
                break
            except OSError as error:
                errors.append(str(error))
        if library is None:
            _unavailable = "\n".join(dict.fromkeys(errors))
            warnings.warn(f"vim.kernels: the fused CPU scan is unavailable, using the chunked path: {_unavailable}", stacklevel=3)
            return None
        for entry in (library.vim_scan_forward, library.vim_scan_backward):
            entry.restype = ctypes.c_int
            entry.argtypes = [ctypes.POINTER(ScanArgs)]
        _library = library
        return library


def native_available() -> bool:
    """Whether the fused kernel is loaded, cached (no compiler needed) or can be built here (a C compiler is found)."""
    return _library is not None or (_unavailable is None and (_found_in_cache(_cache_dir()) or _compiler() is not None))


def _float32(x: Tensor | None) -> Tensor | None:
    """``x`` itself if float32 (any strides), else a float32 copy; None stays None."""
    return x if x is None or x.dtype == torch.float32 else x.float()


def _dense_float32(x: Tensor | None) -> Tensor | None:
    """``x`` as dense float32 (the parameters A, D and delta_bias are read without strides)."""
    return None if x is None else x.to(torch.float32, memory_format=torch.contiguous_format).contiguous()


def _pointer(x: Tensor | None) -> int | None:
    return None if x is None else x.data_ptr()


def _launch(entry, threads: int, inputs: tuple, orders, grid, **buffers: Tensor | None) -> None:
    """Run ``entry`` (the library's forward or backward) on up to ``threads`` threads.

    ``inputs`` are the canonical ``(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse)``, ``orders`` and
    ``grid`` those of the contract; ``buffers`` the other tensors, named as in ScanArgs (float32 outputs, and for the
    backward ``dout`` and ``checkpoints``).
    """
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse = inputs
    K, batch, dim, length = u.shape
    height, width = grid_shape(length, grid)
    tensors = dict(zip(("u", "delta", "z", "B", "C"), (_float32(x) for x in (u, delta, z, B, C))))
    tensors |= dict(zip(("A", "D", "bias"), (_dense_float32(x) for x in (A, D, delta_bias))))
    tensors |= {name: _float32(x) for name, x in buffers.items()}
    strides = {
        f"{name}_stride": x.stride() for name in ("u", "delta", "dout", "z", "B", "C") if (x := tensors.get(name)) is not None
    }
    args = ScanArgs(
        length=length, batch=batch, dim=dim, groups=B.shape[2], n_state=A.shape[-1], directions=K, chunk=CHUNK_SIZE,
        threads=threads, slices=SLICES_PER_THREAD * threads, reverse=int(reverse), delta_softplus=int(delta_softplus),
        height=height, width=width, orders=(ctypes.c_int64 * MAX_DIRECTIONS)(*direction_orders(K, False, orders)),
        **{name: _pointer(x) for name, x in tensors.items()}, **strides,
    )  # fmt: skip
    status = entry(ctypes.byref(args))
    if status == -1:
        raise ValueError(f"the fused CPU scan supports at most {MAX_STATE} states (scan_native.c's MAX_STATE)")
    if status:
        raise MemoryError("the fused CPU scan could not allocate its scratch buffers")


def native_forward(
    u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool, reverse: bool, orders=None, grid=None
) -> tuple[Tensor, Tensor]:
    """Forward pass in the canonical form (see scan_layout): ``out`` (K, batch, dim, L), ``checkpoints``."""
    inputs = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse)
    library = _load()
    if library is None:
        return chunked_forward(*inputs, orders=orders, grid=grid)
    K, batch, dim, length = u.shape
    out = empty_channels_last(K, batch, dim, length, like=u, dtype=torch.float32)
    checkpoints = empty_checkpoints(u, K, batch, length, dim, A.shape[-1])
    _launch(library.vim_scan_forward, torch.get_num_threads(), inputs, orders, grid, out=out, checkpoints=checkpoints)
    return out.to(u.dtype), checkpoints


def native_backward(
    dout, u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool, reverse: bool, checkpoints, orders=None, grid=None
) -> tuple[Tensor, ...]:
    """Backward pass in the canonical form (see scan_layout): (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias).

    The states are recomputed chunk by chunk from the forward's float32 ``checkpoints``. The kernel's vector path reads
    a step's channels side by side: a ``dout`` laid out channels-first is copied channels-last once, not gathered a
    channel at a time on every step (Vim-Ti's backward scan, batch 8: 16.5 -> 12.4 ms a block).
    """
    if dout.stride(-2) != 1:
        dout = as_channels_last(dout)
    inputs = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse)
    library = _load()
    if library is None:
        return chunked_backward(dout, *inputs, checkpoints, orders=orders, grid=grid)
    K, batch, dim, length = u.shape
    groups, n_state = B.shape[2], A.shape[-1]
    threads = torch.get_num_threads()
    slices = SLICES_PER_THREAD * threads  # the partial sums of dB and dC: one per slice

    def buffer(*shape: int) -> Tensor:
        return u.new_empty(*shape, dtype=torch.float32)

    def channels_last(*shape: int) -> Tensor:
        return empty_channels_last(*shape, like=u, dtype=torch.float32)

    du, ddelta = channels_last(K, batch, dim, length), channels_last(K, batch, dim, length)
    dz = None if z is None else channels_last(batch, dim, length)
    dB = buffer(slices, K, batch, groups, n_state, length)  # per slice, summed below
    dC = buffer(slices, K, batch, groups, n_state, length)
    dA = buffer(K, batch, dim, n_state)  # per batch element, summed below
    dD = None if D is None else buffer(K, batch, dim)
    dbias = None if delta_bias is None else buffer(K, batch, dim)
    _launch(
        library.vim_scan_backward, threads, inputs, orders, grid, checkpoints=checkpoints, dout=dout,
        du=du, ddelta=ddelta, dz=dz, dB=dB, dC=dC, dA=dA, dD=dD, dbias=dbias,
    )  # fmt: skip

    def summed(per_batch: Tensor | None) -> Tensor:
        return buffer(0) if per_batch is None else per_batch.sum(1)

    return (
        du.to(u.dtype),
        ddelta.to(delta.dtype),
        summed(dA),
        dB.sum(0).to(B.dtype),
        dC.sum(0).to(C.dtype),
        summed(dD),
        buffer(0) if z is None or dz is None else dz.to(z.dtype),
        summed(dbias),
    )
