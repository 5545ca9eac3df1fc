"""The fused CPU conv + SiLU of both scan directions, forward and backward: C functions in ``scan_native.c``.

The functions (``vim_conv_silu_forward`` and ``vim_conv_silu_backward``, at the end of that file) live in
the fused scan's library, so they are built, cached and threaded by :mod:`vim.kernels.scan_native`
(first use loads the cached library or compiles it; without either they are unavailable and the PyTorch path runs).

Contract (one or two directions, ``K``): ``x`` (B, L, C) float32 with any strides; per direction taps
``(C, W)`` and a bias ``(C,)`` or None. The forward writes ``out`` (K, B, L, C) contiguous; the backward
reads ``dout`` (K, B, L, C) through its strides and writes ``dx`` (B, L, C) contiguous and the gradients
of the taps and biases per (batch element, segment of the sequence), summed here. Other dtypes than
float32 are widened first (float64 takes the PyTorch path instead, so its arithmetic stays float64).
"""

from __future__ import annotations

import ctypes
import functools
from typing import overload

import torch
from torch import Tensor

from . import scan_native
from .conv_silu_reference import MAX_WIDTH, causal_conv1d_silu_ref, reference_backward, split_param_sums

__all__ = ["native_conv_backward", "native_conv_forward"]

_LANES = 16
"""Channels per job (``LANES`` in scan_native.c)."""
_MIN_SEGMENT = 16
"""Fewest rows of the sequence one job walks: shorter segments spend more on the backward's halo."""


class ConvArgs(ctypes.Structure):
    """The kernels' argument block (``ConvArgs`` in scan_native.c): float32 pointers, strides in elements."""

    _fields_ = [
        *((name, ctypes.c_int64) for name in ("batch", "length", "channels", "width", "directions", "segments", "threads")),
        ("x", ctypes.c_void_p),
        ("weight", ctypes.c_void_p * 2),
        ("bias", ctypes.c_void_p * 2),
        *((name, ctypes.c_void_p) for name in ("out", "dout", "dx", "dparams")),
        ("x_stride", ctypes.c_int64 * 3),
        ("dout_stride", ctypes.c_int64 * 4),
    ]


@functools.cache
def _entries(library: ctypes.CDLL) -> tuple:
    """(forward, backward) entry points of the library, with their argument types declared."""
    entries = (library.vim_conv_silu_forward, library.vim_conv_silu_backward)
    for entry in entries:
        entry.restype = ctypes.c_int
        entry.argtypes = [ctypes.POINTER(ConvArgs)]
    return entries


def _kernels(x: Tensor) -> tuple | None:
    """The C entry points for ``x``, or None where the PyTorch path must run (float64, no compiler)."""
    library = None if x.dtype == torch.float64 else scan_native._load()
    return None if library is None else _entries(library)


@overload
def _dense_float32(x: Tensor) -> Tensor: ...
@overload
def _dense_float32(x: Tensor | None) -> Tensor | None: ...
def _dense_float32(x: Tensor | None) -> Tensor | None:
    return None if x is None else x.to(torch.float32, memory_format=torch.contiguous_format).contiguous()


def _segments(batch: int, length: int, channels: int, threads: int) -> int:
    """Pieces to cut the sequence into so that every thread gets a few jobs (batch 1 on many cores)."""
    jobs = max(1, batch * -(-channels // _LANES))  # an empty batch has no jobs: any count of segments does
    wanted = -(-4 * threads // jobs)
    return max(1, min(wanted, length // _MIN_SEGMENT))


def _launch(
    entry, x: Tensor, weights: tuple[Tensor, Tensor | None], biases: tuple[Tensor | None, Tensor | None], segments: int, **buffers
) -> None:
    """Run ``entry`` on ``torch.get_num_threads()`` threads; ``buffers`` are float32 tensors named as in ConvArgs."""
    batch, length, channels = x.shape
    directions = sum(w is not None for w in weights)
    pointers = {name: None if t is None else t.data_ptr() for name, t in buffers.items()}
    args = ConvArgs(
        batch=batch, length=length, channels=channels, width=weights[0].shape[-1], directions=directions,
        segments=segments, threads=torch.get_num_threads(), x=x.data_ptr(),
        weight=(ctypes.c_void_p * 2)(*(None if w is None else w.data_ptr() for w in weights)),
        bias=(ctypes.c_void_p * 2)(*(None if b is None else b.data_ptr() for b in biases)),
        x_stride=x.stride(), dout_stride=buffers["dout"].stride() if "dout" in buffers else (0,) * 4, **pointers,
    )  # fmt: skip
    status = entry(ctypes.byref(args))
    if status == -1:
        raise ValueError(f"the fused CPU conv supports widths 1..{MAX_WIDTH}, got {weights[0].shape[-1]}")
    if status:
        raise MemoryError("the fused CPU conv could not allocate its scratch buffer")


def native_conv_forward(x: Tensor, weight: Tensor, bias: Tensor | None, weight_b: Tensor | None, bias_b: Tensor | None) -> Tensor:
    """(K, B, L, C) contiguous in ``x.dtype``: SiLU of the causal conv (and of the anti-causal one with ``weight_b``).

    Args:
        x: (B, L, C), any strides. weight, weight_b: (C, W); bias, bias_b: (C,) or None.
    """
    kernels = _kernels(x)
    if kernels is None:
        return causal_conv1d_silu_ref(x, weight, bias, weight_b, bias_b)
    batch, length, channels = x.shape
    x32 = x if x.dtype == torch.float32 else x.float()
    out = x.new_empty(1 if weight_b is None else 2, batch, length, channels, dtype=torch.float32)
    weights, biases = (_dense_float32(weight), _dense_float32(weight_b)), (_dense_float32(bias), _dense_float32(bias_b))
    segments = _segments(batch, length, channels, torch.get_num_threads())
    _launch(kernels[0], x32, weights, biases, segments, out=out)
    return out.to(x.dtype)


def native_conv_backward(
    dout: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None, weight_b: Tensor | None, bias_b: Tensor | None
) -> tuple[Tensor | None, ...]:
    """Gradients for ``dout`` (K, B, L, C), any strides: (dx, dweight, dbias, dweight_b, dbias_b).

    ``dx`` is (B, L, C) contiguous in ``x.dtype``; the others have their input's shape and dtype, None
    where the input is None.
    """
    kernels = _kernels(x)
    if kernels is None:
        return reference_backward(dout, x, weight, bias, weight_b, bias_b)
    batch, length, channels = x.shape
    directions, width = dout.shape[0], weight.shape[-1]
    x32 = x if x.dtype == torch.float32 else x.float()
    dout32 = dout if dout.dtype == torch.float32 else dout.float()
    segments = _segments(batch, length, channels, torch.get_num_threads())
    dx = x.new_empty(batch, length, channels, dtype=torch.float32)
    dparams = x.new_empty(batch * segments, directions, width + 1, channels, dtype=torch.float32)
    weights, biases = (_dense_float32(weight), _dense_float32(weight_b)), (_dense_float32(bias), _dense_float32(bias_b))
    _launch(kernels[1], x32, weights, biases, segments, dout=dout32, dx=dx, dparams=dparams)
    return split_param_sums(dparams.sum(0), dx.to(x.dtype), weight, bias, weight_b, bias_b)
