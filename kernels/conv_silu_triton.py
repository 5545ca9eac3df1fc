"""Triton kernels for the depthwise causal conv + SiLU of one or both scan directions, forward and backward.

The definition is in :mod:`.conv_silu_reference`: direction 0 is the causal conv, direction 1 the
anti-causal conv with the backward direction's taps (its causal conv seen from the original order)::

    pre0[t] = b0 + sum_i w0[i] x[t - (W-1) + i]        pre1[t] = b1 + sum_i w1[i] x[t + (W-1) - i]
    out[k, t] = silu(pre_k[t])

Design
------
Grid ``(batch * cdiv(L, BLOCK_L), cdiv(C, BLOCK_C))``: a program owns a ``(BLOCK_L, BLOCK_C)`` tile of
rows and channels of one batch element. The tile is the same for every call (16 rows x 64 channels, 4
warps; a short sequence or few channels leave lanes masked), so the kernels a launch can pick differ only
in W, the directions, the biases and the dtypes: each is compiled for sm_80 and sm_90 on every test run
(tools/triton_resources.py). ``x`` is read through its strides (in a Mamba mixer it is the
first half of the input projection, rows ``2C`` apart); with channel stride 1 each shifted tile is
coalesced, and the W shifted loads of a tile hit the cache after the first. Both directions are
written in one launch, so nothing is stacked afterwards.

Backward: the pre-activations are recomputed from ``x`` (W multiply-adds, no stored activations).
``dx[t] = sum_i w0[i] dpre0[t + (W-1) - i] + w1[i] dpre1[t - (W-1) + i]`` needs ``dpre`` at W shifted
rows, each recomputed from the shifted tiles of ``x`` and ``dout``. A backward program walks up to
``BACKWARD_TILES`` tiles down the sequence and sums the gradients of the taps and biases in registers; it writes them
to a float32 buffer of per-program sums that torch adds up afterwards (deterministic, no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .conv_silu_reference import split_param_sums
from .scan_triton import KernelLaunch

__all__ = ["backward_launch", "forward_launch", "triton_conv_backward", "triton_conv_forward"]

BLOCK_L = 16
BLOCK_C = 64
NUM_WARPS = 4
"""The one tile of every launch: BLOCK_L rows x BLOCK_C channels, NUM_WARPS warps."""
BACKWARD_TILES = 4
"""Tiles of rows one backward program walks: fewer per-program sums of the parameters to add up."""
_BACKWARD_MAX_REGISTERS = 255
"""``maxnreg`` of the backward kernel: left to itself, ptxas caps some variants below what they need and spills
(both directions at W 3 in float32 on sm_80: 168 registers and a stack frame)."""


# ---------------------------------------------------------------------------------------------
# device functions
# ---------------------------------------------------------------------------------------------


@triton.jit
def _tap_rows(t, i, WIDTH: tl.constexpr, ANTI: tl.constexpr):
    """Rows read by tap ``i`` for output rows ``t``: ``t - (W-1) + i`` (causal) or ``t + (W-1) - i`` (anti-causal)."""
    if ANTI:
        return t + (WIDTH - 1 - i)
    else:
        return t - (WIDTH - 1 - i)


@triton.jit
def _load_rows(ptr, rows, c, c_mask, length, stride_len, stride_ch):
    """``ptr[rows, c]`` as a (len(rows), BLOCK_C) float32 tile, 0 outside the sequence and past the channels."""
    mask = ((rows >= 0) & (rows < length))[:, None] & c_mask[None, :]
    return tl.load(ptr + rows[:, None] * stride_len + c[None, :] * stride_ch, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _tap(w_ptr, i, c, c_mask, stride_w_ch, stride_w_tap):
    """Tap ``i`` of every channel of the tile, (BLOCK_C,) float32."""
    return tl.load(w_ptr + c * stride_w_ch + i * stride_w_tap, mask=c_mask, other=0.0).to(tl.float32)


@triton.jit
def _pre_activation(
    x_ptr, w_ptr, bias_ptr, t, c, c_mask, length,
    stride_x_len, stride_x_ch, stride_w_ch, stride_w_tap,
    WIDTH: tl.constexpr, ANTI: tl.constexpr, HAS_BIAS: tl.constexpr,
):  # fmt: skip
    """One direction's conv before the SiLU at rows ``t``, (BLOCK_L, BLOCK_C) float32."""
    pre = tl.zeros((t.shape[0], c.shape[0]), dtype=tl.float32)
    if HAS_BIAS:
        pre += tl.load(bias_ptr + c, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    for i in tl.static_range(WIDTH):
        rows = _tap_rows(t, i, WIDTH, ANTI)
        pre += _tap(w_ptr, i, c, c_mask, stride_w_ch, stride_w_tap)[None, :] * _load_rows(
            x_ptr, rows, c, c_mask, length, stride_x_len, stride_x_ch
        )
    return pre


@triton.jit
def _silu_grad(pre):
    sig = tl.sigmoid(pre)
    return sig * (1.0 + pre * (1.0 - sig))


@triton.jit
def _direction_backward(
    x_ptr, w_ptr, bias_ptr, dout_ptr, t, c, c_mask, length, param_sums,
    stride_x_len, stride_x_ch, stride_w_ch, stride_w_tap, stride_dout_len, stride_dout_ch,
    WIDTH: tl.constexpr, ANTI: tl.constexpr, HAS_BIAS: tl.constexpr,
):  # fmt: skip
    """One direction's share of dx at rows ``t`` (BLOCK_L, BLOCK_C), and ``param_sums`` (BLOCK_W, BLOCK_C) plus the
    rows' gradients of the W taps and (row W) of the bias.

    Through tap ``i``, ``x[t]`` fed the pre-activation at row ``s = t + (W-1) - i`` (causal) or
    ``t - (W-1) + i`` (anti-causal), i.e. the rows of tap ``i`` in the other direction's sense.
    """
    dx = tl.zeros((t.shape[0], c.shape[0]), dtype=tl.float32)
    for i in range(WIDTH):  # a loop, not unrolled: W copies of the recomputed conv would crowd the registers
        s = _tap_rows(t, i, WIDTH, not ANTI)
        pre = _pre_activation(
            x_ptr, w_ptr, bias_ptr, s, c, c_mask, length,
            stride_x_len, stride_x_ch, stride_w_ch, stride_w_tap, WIDTH, ANTI, HAS_BIAS,
        )  # fmt: skip
        dpre = _load_rows(dout_ptr, s, c, c_mask, length, stride_dout_len, stride_dout_ch) * _silu_grad(pre)
        dx += _tap(w_ptr, i, c, c_mask, stride_w_ch, stride_w_tap)[None, :] * dpre
    # the gradients of the taps and the bias from the rows themselves
    pre = _pre_activation(
        x_ptr, w_ptr, bias_ptr, t, c, c_mask, length,
        stride_x_len, stride_x_ch, stride_w_ch, stride_w_tap, WIDTH, ANTI, HAS_BIAS,
    )  # fmt: skip
    dpre = _load_rows(dout_ptr, t, c, c_mask, length, stride_dout_len, stride_dout_ch) * _silu_grad(pre)
    param_row = tl.arange(0, param_sums.shape[0])[:, None]
    for i in range(WIDTH):
        x = _load_rows(x_ptr, _tap_rows(t, i, WIDTH, ANTI), c, c_mask, length, stride_x_len, stride_x_ch)
        param_sums += tl.where(param_row == i, tl.sum(dpre * x, axis=0)[None, :], 0.0)
    param_sums += tl.where(param_row == WIDTH, tl.sum(dpre, axis=0)[None, :], 0.0)
    return dx, param_sums


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _conv_silu_fwd_kernel(
    # Pointers to matrices
    x_ptr, w0_ptr, b0_ptr, w1_ptr, b1_ptr, out_ptr,
    # Matrix dimensions
    length, channels, l_blocks,
    # Strides
    stride_x_batch, stride_x_len, stride_x_ch,
    stride_w0_ch, stride_w0_tap, stride_w1_ch, stride_w1_tap,
    stride_out_dir, stride_out_batch, stride_out_len,
    # Meta-parameters
    WIDTH: tl.constexpr, HAS_BIAS0: tl.constexpr, TWO_DIRECTIONS: tl.constexpr, HAS_BIAS1: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    b = (tl.program_id(0) // l_blocks).to(tl.int64)
    t = (tl.program_id(0) % l_blocks) * BLOCK_L + tl.arange(0, BLOCK_L)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < channels
    x_ptr += b * stride_x_batch
    out_ptr += b * stride_out_batch + t[:, None] * stride_out_len + c[None, :]
    mask = (t < length)[:, None] & c_mask[None, :]

    pre = _pre_activation(
        x_ptr, w0_ptr, b0_ptr, t, c, c_mask, length, stride_x_len, stride_x_ch, stride_w0_ch, stride_w0_tap,
        WIDTH, False, HAS_BIAS0,
    )  # fmt: skip
    tl.store(out_ptr, (pre * tl.sigmoid(pre)).to(out_ptr.dtype.element_ty), mask=mask)
    if TWO_DIRECTIONS:
        pre = _pre_activation(
            x_ptr, w1_ptr, b1_ptr, t, c, c_mask, length, stride_x_len, stride_x_ch, stride_w1_ch, stride_w1_tap,
            WIDTH, True, HAS_BIAS1,
        )  # fmt: skip
        tl.store(out_ptr + stride_out_dir, (pre * tl.sigmoid(pre)).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _conv_silu_bwd_kernel(
    # Pointers to matrices
    x_ptr, w0_ptr, b0_ptr, w1_ptr, b1_ptr, dout_ptr, dx_ptr, dparams_ptr,
    # Matrix dimensions
    length, channels, l_blocks,
    # Strides
    stride_x_batch, stride_x_len, stride_x_ch,
    stride_w0_ch, stride_w0_tap, stride_w1_ch, stride_w1_tap,
    stride_dout_dir, stride_dout_batch, stride_dout_len, stride_dout_ch,
    stride_dx_batch, stride_dx_len,
    stride_dparams_program, stride_dparams_dir, stride_dparams_tap,
    # Meta-parameters
    WIDTH: tl.constexpr, HAS_BIAS0: tl.constexpr, TWO_DIRECTIONS: tl.constexpr, HAS_BIAS1: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr, TILES: tl.constexpr, BLOCK_W: tl.constexpr,
):  # fmt: skip
    """A program walks up to TILES tiles of BLOCK_L rows, so that fewer programs write partial sums of the parameters;
    those of a direction are held as (BLOCK_W, BLOCK_C), BLOCK_W >= W + 1: a row per tap, then the bias."""
    b = (tl.program_id(0) // l_blocks).to(tl.int64)
    first_row = (tl.program_id(0) % l_blocks) * (BLOCK_L * TILES)
    last_row = tl.minimum(first_row + BLOCK_L * TILES, length)  # the last program's tiles stop at the sequence's end
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < channels
    x_ptr += b * stride_x_batch
    dout_ptr += b * stride_dout_batch
    dx_ptr += b * stride_dx_batch

    sums0 = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
    sums1 = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
    for tile_row in range(first_row, last_row, BLOCK_L):
        t = tile_row + tl.arange(0, BLOCK_L)
        dx, sums0 = _direction_backward(
            x_ptr, w0_ptr, b0_ptr, dout_ptr, t, c, c_mask, length, sums0,
            stride_x_len, stride_x_ch, stride_w0_ch, stride_w0_tap, stride_dout_len, stride_dout_ch,
            WIDTH, False, HAS_BIAS0,
        )  # fmt: skip
        if TWO_DIRECTIONS:
            dx_b, sums1 = _direction_backward(
                x_ptr, w1_ptr, b1_ptr, dout_ptr + stride_dout_dir, t, c, c_mask, length, sums1,
                stride_x_len, stride_x_ch, stride_w1_ch, stride_w1_tap, stride_dout_len, stride_dout_ch,
                WIDTH, True, HAS_BIAS1,
            )  # fmt: skip
            dx += dx_b
        tl.store(dx_ptr + t[:, None] * stride_dx_len + c[None, :], dx.to(dx_ptr.dtype.element_ty),
                 mask=(t < length)[:, None] & c_mask[None, :])  # fmt: skip

    param_row = tl.arange(0, BLOCK_W)[:, None]
    dparams_ptr += tl.program_id(0).to(tl.int64) * stride_dparams_program + param_row * stride_dparams_tap + c[None, :]
    param_mask = (param_row <= WIDTH) & c_mask[None, :]
    tl.store(dparams_ptr, sums0, mask=param_mask)
    if TWO_DIRECTIONS:
        tl.store(dparams_ptr + stride_dparams_dir, sums1, mask=param_mask)


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------


def _grid(batch: int, length: int, channels: int, backward: bool) -> tuple[tuple[int, int], int]:
    """(grid, programs along the sequence of one batch element)."""
    l_blocks = triton.cdiv(length, BLOCK_L * (BACKWARD_TILES if backward else 1))
    return (batch * l_blocks, triton.cdiv(channels, BLOCK_C)), l_blocks


def _dense(bias: torch.Tensor | None) -> torch.Tensor | None:
    """The kernels read a bias with unit stride."""
    return None if bias is None else bias.contiguous()


def _weight_strides(weight: torch.Tensor | None) -> tuple[int, ...]:
    return (0, 0) if weight is None else weight.stride()


def _flags(weight: torch.Tensor, bias, weight_b, bias_b) -> dict:
    return dict(
        WIDTH=weight.shape[-1], HAS_BIAS0=bias is not None, TWO_DIRECTIONS=weight_b is not None,
        HAS_BIAS1=bias_b is not None, BLOCK_L=BLOCK_L, BLOCK_C=BLOCK_C, num_warps=NUM_WARPS,
    )  # fmt: skip


def forward_launch(x: torch.Tensor, weight, bias, weight_b, bias_b) -> tuple[KernelLaunch, torch.Tensor]:
    """The forward launch for the inputs of :func:`triton_conv_forward`, with its output allocated: ``(launch, out)``."""
    batch, length, channels = x.shape
    bias, bias_b = _dense(bias), _dense(bias_b)
    out = x.new_empty(1 if weight_b is None else 2, batch, length, channels)
    grid, l_blocks = _grid(batch, length, channels, backward=False)
    args = (
        x, weight, bias, weight_b, bias_b, out,
        length, channels, l_blocks,
        *x.stride(), *weight.stride(), *_weight_strides(weight_b), *out.stride()[:3],
    )  # fmt: skip
    return KernelLaunch(_conv_silu_fwd_kernel, grid, args, _flags(weight, bias, weight_b, bias_b)), out


def backward_launch(
    dout: torch.Tensor, x: torch.Tensor, weight, bias, weight_b, bias_b
) -> tuple[KernelLaunch, torch.Tensor, torch.Tensor]:
    """The backward launch for the inputs of :func:`triton_conv_backward`, with its outputs allocated.

    Returns:
        ``(launch, dx, dparams)``: ``dx`` (B, L, C) contiguous in ``x.dtype``; ``dparams`` (programs, K, W + 1, C)
        float32, each program's sums of the gradients of the taps and (row W) the bias.
    """
    batch, length, channels = x.shape
    directions, width = dout.shape[0], weight.shape[-1]
    bias, bias_b = _dense(bias), _dense(bias_b)
    grid, l_blocks = _grid(batch, length, channels, backward=True)
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    dparams = x.new_empty(grid[0], directions, width + 1, channels, dtype=torch.float32)
    args = (
        x, weight, bias, weight_b, bias_b, dout, dx, dparams,
        length, channels, l_blocks,
        *x.stride(), *weight.stride(), *_weight_strides(weight_b), *dout.stride(), *dx.stride()[:2],
        *dparams.stride()[:3],
    )  # fmt: skip
    flags = _flags(weight, bias, weight_b, bias_b) | dict(
        TILES=BACKWARD_TILES, BLOCK_W=triton.next_power_of_2(width + 1), maxnreg=_BACKWARD_MAX_REGISTERS
    )
    return KernelLaunch(_conv_silu_bwd_kernel, grid, args, flags), dx, dparams


def triton_conv_forward(x: torch.Tensor, weight, bias, weight_b, bias_b) -> torch.Tensor:
    """(K, B, L, C) contiguous in ``x.dtype``; x (B, L, C) any strides, weights (C, W), biases (C,) or None."""
    launch, out = forward_launch(x, weight, bias, weight_b, bias_b)
    launch(x.device)
    return out


def triton_conv_backward(dout: torch.Tensor, x: torch.Tensor, weight, bias, weight_b, bias_b) -> tuple:
    """Gradients for ``dout`` (K, B, L, C), any strides: (dx, dweight, dbias, dweight_b, dbias_b).

    ``dx`` is (B, L, C) contiguous in ``x.dtype``; the others have their input's shape and dtype, None
    where the input is None.
    """
    launch, dx, dparams = backward_launch(dout, x, weight, bias, weight_b, bias_b)
    launch(x.device)
    sums = dparams.sum(0)  # (K, W + 1, C)
    return split_param_sums(sums, dx, weight, bias, weight_b, bias_b)
