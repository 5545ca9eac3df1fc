"""Triton kernels for the fused residual add + RMSNorm / LayerNorm of a Mamba block, forward and backward.

The definition (:func:`vim.kernels.add_norm_ref`, the arrangement of the official Vision Mamba block)::

    residual_out = (hidden if residual is None else residual + hidden).float()
    normed = norm(residual_out.to(weight.dtype)) * weight (+ bias)

Design
------
Forward: a program owns ``BLOCK_ROWS`` rows of ``(B * L)`` and the whole width ``D`` (one
``(BLOCK_ROWS, BLOCK_D)`` tile), reads ``hidden`` and ``residual`` once through their strides, writes
the float32 stream and the normalised rows. The statistics are float32; the stream is rounded to
the weight's dtype before normalising, as ``norm(residual.to(weight.dtype))`` does.

Backward: a fixed number of programs each walk a contiguous range of rows in tiles, recompute the
statistics from the saved float32 stream (cheaper than storing them), and write the gradient of the
stream: ``dsum = dresidual_out + d norm / d x . dnormed`` (for RMSNorm ``rstd (g - xhat mean(g xhat))``,
for LayerNorm ``rstd (g - mean(g) - xhat mean(g xhat))``, ``g = dnormed * weight``), the gradient of
both ``hidden`` and ``residual``. The gradients of the weight and bias are summed over the program's
rows in registers and written per program; torch sums them (deterministic, no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .add_norm_reference import MAX_DIM
from .scan_triton import KernelLaunch

__all__ = ["backward_launch", "forward_launch", "triton_add_norm_backward", "triton_add_norm_forward"]

_TILE_ELEMENTS = 2048
_MAX_BLOCK_ROWS = 16
_MIN_BLOCK_D = 128
"""Narrower rows are masked in a tile of this width: few tiles in all (:func:`tile_choices`), each compiled in CI."""
_NUM_WARPS = 8
_BACKWARD_MAX_REGISTERS = 80
"""``maxnreg`` of the backward kernel: left to itself, ptxas caps some variants at 64 registers and spills
(LayerNorm with a residual and a bias in float32, rows of 257 to 512, on sm_90); under 80 none spills, and
three blocks of 8 warps still fit on a multiprocessor (tools/triton_resources.py)."""
_CPU_PROGRAMS = 4
"""Backward programs for CPU tensors under the interpreter: several, so the per-program sums are exercised."""


@triton.jit
def _load_rows(ptr, r, d, mask, length, stride_batch, stride_len, stride_dim):
    """Rows ``r`` of the flattened (B * L, D) view of a (B, L, D) tensor with any strides, as float32."""
    offsets = (r // length).to(tl.int64)[:, None] * stride_batch + (r % length)[:, None] * stride_len + d[None, :] * stride_dim
    return tl.load(ptr + offsets, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _normalise(x, mask, dim, eps, IS_RMS: tl.constexpr):
    """(xhat, rstd) of rows ``x`` (BLOCK_ROWS, BLOCK_D): RMS-normalised, or centred and normalised; 0 where masked."""
    centred = x if IS_RMS else tl.where(mask, x - (tl.sum(x, axis=1) / dim)[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / dim + eps)
    return centred * rstd[:, None], rstd


@triton.jit
def _add_norm_fwd_kernel(
    # Pointers to matrices
    hidden_ptr, residual_ptr, weight_ptr, bias_ptr, normed_ptr, residual_out_ptr,
    # Matrix dimensions
    rows, length, dim, eps,
    # Strides
    stride_h_batch, stride_h_len, stride_h_dim,
    stride_r_batch, stride_r_len, stride_r_dim,
    # Meta-parameters
    HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr, IS_RMS: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    r = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < dim
    mask = (r < rows)[:, None] & d_mask[None, :]
    dense = r.to(tl.int64)[:, None] * dim + d[None, :]  # offsets in the contiguous outputs

    stream = _load_rows(hidden_ptr, r, d, mask, length, stride_h_batch, stride_h_len, stride_h_dim)
    if HAS_RESIDUAL:
        stream += _load_rows(residual_ptr, r, d, mask, length, stride_r_batch, stride_r_len, stride_r_dim)
    tl.store(residual_out_ptr + dense, stream, mask=mask)

    x = stream.to(weight_ptr.dtype.element_ty).to(tl.float32)
    xhat, _ = _normalise(x, mask, dim, eps, IS_RMS)
    y = xhat * tl.load(weight_ptr + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(normed_ptr + dense, y.to(normed_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _add_norm_bwd_kernel(
    # Pointers to matrices
    dnormed_ptr, dresidual_out_ptr, residual_out_ptr, weight_ptr,
    dsum_ptr, dhidden_ptr, dweight_ptr, dbias_ptr,
    # Matrix dimensions
    rows, length, dim, eps, rows_per_program,
    # Strides
    stride_dn_batch, stride_dn_len, stride_dn_dim,
    stride_dr_batch, stride_dr_len, stride_dr_dim,
    # Meta-parameters
    HAS_DRESIDUAL: tl.constexpr, STORE_SUM: tl.constexpr, STORE_HIDDEN: tl.constexpr, HAS_BIAS: tl.constexpr,
    IS_RMS: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    d = tl.arange(0, BLOCK_D)
    d_mask = d < dim
    weight = tl.load(weight_ptr + d, mask=d_mask, other=0.0).to(tl.float32)
    dweight = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dbias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    first = tl.program_id(0) * rows_per_program
    last = tl.minimum(first + rows_per_program, rows)
    for start in range(first, last, BLOCK_ROWS):
        r = start + tl.arange(0, BLOCK_ROWS)
        mask = (r < last)[:, None] & d_mask[None, :]
        dense = r.to(tl.int64)[:, None] * dim + d[None, :]
        stream = tl.load(residual_out_ptr + dense, mask=mask, other=0.0)
        xhat, rstd = _normalise(stream.to(weight_ptr.dtype.element_ty).to(tl.float32), mask, dim, eps, IS_RMS)
        dy = _load_rows(dnormed_ptr, r, d, mask, length, stride_dn_batch, stride_dn_len, stride_dn_dim)
        dweight += tl.sum(dy * xhat, axis=0)
        if HAS_BIAS:
            dbias += tl.sum(dy, axis=0)
        g = dy * weight[None, :]
        correction = xhat * (tl.sum(g * xhat, axis=1) / dim)[:, None]
        if not IS_RMS:
            correction += (tl.sum(g, axis=1) / dim)[:, None]
        dx = tl.where(mask, (g - correction) * rstd[:, None], 0.0)
        if HAS_DRESIDUAL:
            dx += _load_rows(dresidual_out_ptr, r, d, mask, length, stride_dr_batch, stride_dr_len, stride_dr_dim)
        if STORE_SUM:
            tl.store(dsum_ptr + dense, dx, mask=mask)
        if STORE_HIDDEN:
            tl.store(dhidden_ptr + dense, dx.to(dhidden_ptr.dtype.element_ty), mask=mask)
    partial = tl.program_id(0).to(tl.int64) * dim + d
    tl.store(dweight_ptr + partial, dweight, mask=d_mask)
    if HAS_BIAS:
        tl.store(dbias_ptr + partial, dbias, mask=d_mask)


def _tile(dim: int) -> tuple[int, int, int]:
    """(BLOCK_ROWS, BLOCK_D, num_warps) for rows of width ``dim``: one of :func:`tile_choices`."""
    if dim > MAX_DIM:
        raise ValueError(f"add_norm: the Triton kernels take rows of at most {MAX_DIM} values, got dim {dim}")
    block_d = max(_MIN_BLOCK_D, triton.next_power_of_2(dim))
    return min(_MAX_BLOCK_ROWS, _TILE_ELEMENTS // block_d), block_d, _NUM_WARPS


def tile_choices() -> list[tuple[int, int, int]]:
    """Every tile the launchers can pick, (BLOCK_ROWS, BLOCK_D, num_warps): those compiled for each GPU target in CI.

    Compiled for sm_80 and sm_90 on every test run (tools/triton_resources.py): no spills, registers per
    thread and occupancy printed.
    """
    return list(dict.fromkeys(_tile(1 << k) for k in range(MAX_DIM.bit_length())))


def _strides(x: torch.Tensor | None) -> tuple[int, ...]:
    return (0, 0, 0) if x is None else x.stride()


def forward_launch(hidden, residual, weight, bias, eps: float, is_rms: bool) -> tuple[KernelLaunch, torch.Tensor, torch.Tensor]:
    """The forward launch for the inputs of :func:`triton_add_norm_forward`, with its outputs allocated:
    ``(launch, normed, residual_out)``."""
    batch, length, dim = hidden.shape
    rows = batch * length
    weight, bias = weight.contiguous(), None if bias is None else bias.contiguous()  # read with unit stride
    block_rows, block_d, num_warps = _tile(dim)
    normed = hidden.new_empty(hidden.shape, dtype=weight.dtype)
    residual_out = hidden.new_empty(hidden.shape, dtype=torch.float32)
    args = (
        hidden, residual, weight, bias, normed, residual_out,
        rows, length, dim, eps,
        *hidden.stride(), *_strides(residual),
    )  # fmt: skip
    flags = dict(
        HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None, IS_RMS=is_rms,
        BLOCK_ROWS=block_rows, BLOCK_D=block_d, num_warps=num_warps,
    )  # fmt: skip
    return KernelLaunch(_add_norm_fwd_kernel, (triton.cdiv(rows, block_rows),), args, flags), normed, residual_out


def triton_add_norm_forward(hidden, residual, weight, bias, eps: float, is_rms: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(normed (B, L, D) in ``weight.dtype``, residual_out (B, L, D) float32), both contiguous.

    Args:
        hidden: (B, L, D), any strides; residual: (B, L, D) float32, any strides, or None;
        weight, bias: (D,), bias None for none.
    """
    launch, normed, residual_out = forward_launch(hidden, residual, weight, bias, eps, is_rms)
    launch(hidden.device)
    return normed, residual_out


def _programs(x: torch.Tensor, tiles: int) -> int:
    """How many backward programs: a few per SM on a GPU."""
    target = 4 * torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else _CPU_PROGRAMS
    return max(1, min(tiles, target))


def backward_launch(
    dnormed, dresidual_out, residual_out, weight, bias, eps: float, is_rms: bool, store_sum: bool, hidden_dtype
) -> tuple[KernelLaunch, tuple[torch.Tensor, ...]]:
    """The backward launch for the inputs of :func:`triton_add_norm_backward`, with its outputs allocated.

    Returns:
        ``(launch, (dsum, dhidden, dweight, dbias))``: dsum and dhidden as :func:`triton_add_norm_backward` returns
        them, dweight and dbias (programs, D) float32 per-program sums (dbias empty without a bias).
    """
    batch, length, dim = residual_out.shape
    rows = batch * length
    weight, bias = weight.contiguous(), None if bias is None else bias.contiguous()  # read with unit stride
    block_rows, block_d, num_warps = _tile(dim)
    programs = _programs(residual_out, triton.cdiv(rows, block_rows))
    # at least one tile per program: no rows (an empty batch) then means no programs, and zero sums of the parameters
    rows_per_program = triton.cdiv(triton.cdiv(max(rows, 1), programs), block_rows) * block_rows
    programs = triton.cdiv(rows, rows_per_program)

    def empty() -> torch.Tensor:
        return residual_out.new_empty(0)

    dsum = torch.empty_like(residual_out) if store_sum else empty()
    dhidden = residual_out.new_empty(residual_out.shape, dtype=hidden_dtype) if hidden_dtype is not None else empty()
    dweight = residual_out.new_empty(programs, dim)
    dbias = residual_out.new_empty(programs, dim) if bias is not None else empty()
    args = (
        dnormed, dresidual_out, residual_out, weight, dsum, dhidden, dweight, dbias,
        rows, length, dim, eps, rows_per_program,
        *dnormed.stride(), *_strides(dresidual_out),
    )  # fmt: skip
    flags = dict(
        HAS_DRESIDUAL=dresidual_out is not None, STORE_SUM=store_sum, STORE_HIDDEN=hidden_dtype is not None,
        HAS_BIAS=bias is not None, IS_RMS=is_rms, BLOCK_ROWS=block_rows, BLOCK_D=block_d, num_warps=num_warps,
        maxnreg=_BACKWARD_MAX_REGISTERS,
    )  # fmt: skip
    return KernelLaunch(_add_norm_bwd_kernel, (programs,), args, flags), (dsum, dhidden, dweight, dbias)


def triton_add_norm_backward(
    dnormed,
    dresidual_out,
    residual_out,
    weight,
    bias,
    eps: float,
    is_rms: bool,
    store_sum: bool,
    hidden_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`triton_add_norm_forward` from the saved float32 ``residual_out``.

    Args:
        dnormed: (B, L, D), any strides; dresidual_out: (B, L, D), any strides, or None (no gradient).
        store_sum: write the float32 gradient of the stream (needed for ``residual``, or for float32 ``hidden``).
        hidden_dtype: also write that gradient in this dtype (for ``hidden``), or None.

    Returns:
        (dsum (B, L, D) float32 or empty, dhidden (B, L, D) in ``hidden_dtype`` or empty, dweight (D,), dbias (D,)
        or empty); dweight and dbias in their parameter's dtype.
    """
    inputs = (dnormed, dresidual_out, residual_out, weight, bias, eps, is_rms, store_sum, hidden_dtype)
    launch, (dsum, dhidden, dweight, dbias) = backward_launch(*inputs)
    launch(residual_out.device)
    dweight = dweight.sum(0).to(weight.dtype)
    return dsum, dhidden, dweight, dbias.sum(0).to(bias.dtype) if bias is not None else dbias
