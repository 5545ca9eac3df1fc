"""Triton selective-scan kernels, forward and backward, for up to four scan directions per launch.

Both functions follow the canonical contract of :mod:`vim.kernels.scan_layout` (leading direction
axis ``K``; direction ``k`` walks the tokens in its order code, by default ``(0, 2)[:K]``, and
``reverse`` swaps forward and reversed; ``z`` shared).

Design
------
Grid ``(batch * G * dim_blocks, K)``: a program owns ``BLOCK_D`` channels of one group of one batch
element, for one direction (the second grid axis). Every channel of a program uses the same B/C
group, so B and C are loaded once per time step as ``(BLOCK_T, BLOCK_N)`` tiles. Tensors are read
through their strides (no copies); with channels-last memory (``stride(dim) == 1``) a
``(BLOCK_T, BLOCK_D)`` tile is coalesced. A reversed direction reads time index ``t = L - 1 - s`` at
logical step ``s``: nothing is flipped. A column-major direction of an ``(H, W)`` grid reads token
``(s % H) * W + s // H`` (of ``s`` reversed or not) by index arithmetic on the tile's ``BLOCK_T``
step indices: nothing is cross-scanned into a copy. The order codes reach the kernels as one
runtime integer (two bits per direction) with the grid, so no variant is added for them.

Forward: the state ``h`` (BLOCK_D, BLOCK_N) lives in fp32 registers. The sequence is walked in tiles
of ``BLOCK_T`` logical steps; per tile ``a = 2^(delta * A * log2 e)`` and ``b = delta * u * B`` are
built as (BLOCK_T, BLOCK_D, BLOCK_N) and combined by ``tl.associative_scan`` over time with the
affine operator ``(a1, b1), (a2, b2) -> (a1 a2, a2 b1 + b2)``; the carried state enters as
``cumprod(a) * h``. Steps past the end of the sequence load ``delta = 0``, i.e. ``a = 1, b = 0``,
so they leave the state unchanged. The state after each chunk of ``CHUNK_SIZE`` steps is saved.

Backward: chunks are visited in reverse logical order. Pass 1 rebuilds the state at the start of
each tile of the chunk from the chunk's checkpoint (``tl.reduce`` with the same operator) and parks
it in a per-program scratch buffer; pass 2 walks the tiles backwards, recomputes the states inside
the tile, and runs the adjoint ``g_t = C_t dy_t + a_{t+1} g_{t+1}`` as a reversed associative scan
(``a_{t+1}`` from delta loaded one logical step ahead; ``g`` of the tile's first step is carried
to the previous tile). With ``w = g (h - b) = g a_t h_{t-1}``::

    dA = sum_t w delta          ddelta = sum_n (g u B + w A)     du = sum_n g delta B + D dy
    dB = sum_d g delta u        dC = sum_d dy h                  dD = sum_t dy u

Reductions: nothing uses atomics, so results are deterministic. Sums over time stay in registers;
each program writes its partial sums (dA, dD, ddelta_bias per batch element; dB, dC per block of
channels; dz per direction) to fp32 buffers that torch sums afterwards.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .scan_layout import CHUNK_SIZE, direction_orders, empty_channels_last, empty_checkpoints, grid_shape

__all__ = [
    "GPU_LIMITS", "GpuLimits", "Tiles", "backward_launch", "forward_launch", "tile_choices", "triton_backward", "triton_forward",
]  # fmt: skip

LOG2E = tl.constexpr(1.4426950408889634)
"""log2(e): the kernels compute exp(delta A) as exp2(delta A log2 e)."""
_FORWARD_TILE_ELEMENTS = 8192
"""Budget of BLOCK_T * BLOCK_D * BLOCK_N fp32 values per tile in the forward kernel."""
_BACKWARD_TILE_ELEMENTS = 4096
"""The backward kernel keeps about twice as many tiles live; the budget halves again for N > 16."""
_MAX_BLOCK_T = 32
_MAX_BACKWARD_BLOCK_T = 8
"""The backward's registers grow fastest with the steps of a tile (its scans over time run twice): at 16 or 32
steps some tiles spill on sm_80 (tools/triton_resources.py)."""
_BACKWARD_MAX_REGISTERS = 255
"""``maxnreg`` of the backward kernel: left to itself, ptxas caps some variants at 128 registers and spills."""


# ---------------------------------------------------------------------------------------------
# device functions
# ---------------------------------------------------------------------------------------------


@triton.jit
def _affine_combine(a_first, b_first, a_second, b_second):
    """Compose two steps ``h -> a h + b``: first ``(a_first, b_first)``, then the second one."""
    return a_first * a_second, a_second * b_first + b_second


@triton.jit
def _program_channels(dim_per_group, n_groups, dim_blocks, BLOCK_D: tl.constexpr):
    """(batch index, group, channel indices (BLOCK_D,), channel mask) owned by this program."""
    pid = tl.program_id(0)
    block = pid % dim_blocks
    group = (pid // dim_blocks) % n_groups
    batch_idx = pid // (dim_blocks * n_groups)
    in_group = block * BLOCK_D + tl.arange(0, BLOCK_D)
    return batch_idx, group, group * dim_per_group + in_group, in_group < dim_per_group


@triton.jit
def _direction_order(orders, direction, REVERSE: tl.constexpr):
    """(whether it runs in reverse, whether it reads column by column) of ``direction``, whose order code is
    bits ``2 direction`` and up of ``orders`` (see scan_layout)."""
    order = (orders >> (2 * direction)) & 3
    return (order >= 2) != REVERSE, (order & 1) == 1


@triton.jit
def _tile_steps(first_step, length, is_reversed, is_column, height, width, BLOCK_T: tl.constexpr):
    """Token indices (BLOCK_T,) read at logical steps ``first_step ...`` and the mask of steps < length.

    Column-major step ``s = w * height + h`` reads token ``h * width + w`` of the (height, width) grid.
    """
    steps = first_step + tl.arange(0, BLOCK_T)
    s = tl.where(is_reversed, length - 1 - steps, steps)
    return tl.where(is_column, (s % height) * width + s // height, s), steps < length


@triton.jit
def _load_tile(ptr, rows, cols, mask, stride_rows, stride_cols):
    """Load ``ptr[rows, cols]`` as a (len(rows), len(cols)) fp32 tile, 0 where masked."""
    return tl.load(ptr + rows[:, None] * stride_rows + cols[None, :] * stride_cols, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _load_delta(delta_ptr, bias, t, d, mask, stride_l, stride_d, SOFTPLUS: tl.constexpr):
    """(delta + bias before softplus, delta used by the scan), both (BLOCK_T, BLOCK_D); 0 where masked."""
    pre = _load_tile(delta_ptr, t, d, mask, stride_l, stride_d) + bias[None, :]
    delta = tl.where(pre <= 20.0, tl.log(1.0 + tl.exp(pre)), pre) if SOFTPLUS else pre
    return pre, tl.where(mask, delta, 0.0)


@triton.jit
def _tile_dynamics(
    u_ptr, delta_ptr, B_ptr, bias, A2, t, d, n, td_mask, tn_mask,
    stride_u_len, stride_u_dim, stride_delta_len, stride_delta_dim, stride_B_len, stride_B_state,
    SOFTPLUS: tl.constexpr,
):  # fmt: skip
    """Inputs of the tile's steps ``h -> a h + b``: u, delta before and after softplus, B, a and b.

    u and the deltas are (BLOCK_T, BLOCK_D), B is (BLOCK_T, BLOCK_N), ``a = exp(delta A)`` and
    ``b = delta u B`` are (BLOCK_T, BLOCK_D, BLOCK_N); masked steps give ``a = 1, b = 0``.
    """
    u = _load_tile(u_ptr, t, d, td_mask, stride_u_len, stride_u_dim)
    delta_pre, delta = _load_delta(delta_ptr, bias, t, d, td_mask, stride_delta_len, stride_delta_dim, SOFTPLUS)
    Bt = _load_tile(B_ptr, t, n, tn_mask, stride_B_len, stride_B_state)
    a = tl.exp2(delta[:, :, None] * A2[None, :, :])
    return u, delta_pre, delta, Bt, a, (delta * u)[:, :, None] * Bt[:, None, :]


@triton.jit
def _scan_states(a, b, h):
    """States (BLOCK_T, BLOCK_D, BLOCK_N) of the tile's steps ``h -> a h + b`` starting from ``h``."""
    cum_a, h_local = tl.associative_scan((a, b), 0, _affine_combine)
    return h_local + cum_a * h[None, :, :]


@triton.jit
def _row(x, index, BLOCK_T: tl.constexpr):
    """Row ``index`` of a (BLOCK_T, ...) tile."""
    rows = tl.arange(0, BLOCK_T)[:, None, None]
    return tl.sum(tl.where(rows == index, x, 0.0), axis=0)


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _selective_scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr, ckpt_ptr,
    length, n_state, dim_per_group, n_groups, dim_blocks, orders, height, width,
    stride_u_dir, stride_u_batch, stride_u_dim, stride_u_len,
    stride_delta_dir, stride_delta_batch, stride_delta_dim, stride_delta_len,
    stride_A_dir, stride_A_dim, stride_A_state,
    stride_B_dir, stride_B_batch, stride_B_group, stride_B_state, stride_B_len,
    stride_C_dir, stride_C_batch, stride_C_group, stride_C_state, stride_C_len,
    stride_D_dir, stride_D_dim,
    stride_z_batch, stride_z_dim, stride_z_len,
    stride_bias_dir, stride_bias_dim,
    stride_out_dir, stride_out_batch, stride_out_dim, stride_out_len,
    stride_ckpt_dir, stride_ckpt_batch, stride_ckpt_chunk, stride_ckpt_dim, stride_ckpt_state,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    REVERSE: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    direction = tl.program_id(1)
    batch_idx, group, d, d_mask = _program_channels(dim_per_group, n_groups, dim_blocks, BLOCK_D)
    is_reversed, is_column = _direction_order(orders, direction, REVERSE)
    k = direction.to(tl.int64)
    b = batch_idx.to(tl.int64)
    n = tl.arange(0, BLOCK_N)
    n_mask = n < n_state
    dn_mask = d_mask[:, None] & n_mask[None, :]

    A2 = _load_tile(A_ptr + k * stride_A_dir, d, n, dn_mask, stride_A_dim, stride_A_state) * LOG2E
    bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + k * stride_bias_dir + d * stride_bias_dim, mask=d_mask, other=0.0).to(tl.float32)
    if HAS_D:
        D = tl.load(D_ptr + k * stride_D_dir + d * stride_D_dim, mask=d_mask, other=0.0).to(tl.float32)
    u_ptr += k * stride_u_dir + b * stride_u_batch
    delta_ptr += k * stride_delta_dir + b * stride_delta_batch
    B_ptr += k * stride_B_dir + b * stride_B_batch + group * stride_B_group
    C_ptr += k * stride_C_dir + b * stride_C_batch + group * stride_C_group
    out_ptr += k * stride_out_dir + b * stride_out_batch
    ckpt_ptr += k * stride_ckpt_dir + b * stride_ckpt_batch + d[:, None] * stride_ckpt_dim + n[None, :] * stride_ckpt_state

    h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    for first_step in range(0, length, BLOCK_T):
        t, t_mask = _tile_steps(first_step, length, is_reversed, is_column, height, width, BLOCK_T)
        td_mask = t_mask[:, None] & d_mask[None, :]
        tn_mask = t_mask[:, None] & n_mask[None, :]
        u, _, _, _, a, b_in = _tile_dynamics(
            u_ptr, delta_ptr, B_ptr, bias, A2, t, d, n, td_mask, tn_mask,
            stride_u_len, stride_u_dim, stride_delta_len, stride_delta_dim, stride_B_len, stride_B_state, SOFTPLUS,
        )  # fmt: skip
        hs = _scan_states(a, b_in, h)
        Ct = _load_tile(C_ptr, t, n, tn_mask, stride_C_len, stride_C_state)
        y = tl.sum(hs * Ct[:, None, :], axis=2)
        if HAS_D:
            y += D[None, :] * u
        if HAS_Z:
            z = _load_tile(z_ptr + b * stride_z_batch, t, d, td_mask, stride_z_len, stride_z_dim)
            y *= z * tl.sigmoid(z)
        out_offsets = t[:, None] * stride_out_len + d[None, :] * stride_out_dim
        tl.store(out_ptr + out_offsets, y.to(out_ptr.dtype.element_ty), mask=td_mask)

        h = _row(hs, BLOCK_T - 1, BLOCK_T)
        next_step = first_step + BLOCK_T
        if (next_step % CHUNK == 0) | (next_step >= length):
            tl.store(ckpt_ptr + (first_step // CHUNK) * stride_ckpt_chunk, h, mask=dn_mask)


@triton.jit
def _selective_scan_bwd_kernel(
    dout_ptr, u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, ckpt_ptr, scratch_ptr,
    du_ptr, ddelta_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dz_ptr, dbias_ptr,
    length, n_state, dim_per_group, n_groups, dim_blocks, orders, height, width,
    stride_dout_dir, stride_dout_batch, stride_dout_dim, stride_dout_len,
    stride_u_dir, stride_u_batch, stride_u_dim, stride_u_len,
    stride_delta_dir, stride_delta_batch, stride_delta_dim, stride_delta_len,
    stride_A_dir, stride_A_dim, stride_A_state,
    stride_B_dir, stride_B_batch, stride_B_group, stride_B_state, stride_B_len,
    stride_C_dir, stride_C_batch, stride_C_group, stride_C_state, stride_C_len,
    stride_D_dir, stride_D_dim,
    stride_z_batch, stride_z_dim, stride_z_len,
    stride_bias_dir, stride_bias_dim,
    stride_ckpt_dir, stride_ckpt_batch, stride_ckpt_chunk, stride_ckpt_dim, stride_ckpt_state,
    stride_du_dir, stride_du_batch, stride_du_dim, stride_du_len,
    stride_ddelta_dir, stride_ddelta_batch, stride_ddelta_dim, stride_ddelta_len,
    stride_dz_dir, stride_dz_batch, stride_dz_dim, stride_dz_len,
    stride_dBC_dir, stride_dBC_batch, stride_dBC_group, stride_dBC_block, stride_dBC_state, stride_dBC_len,
    stride_dA_dir, stride_dA_batch, stride_dA_dim, stride_dA_state,
    stride_dvec_dir, stride_dvec_batch, stride_dvec_dim,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    REVERSE: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    TILES_PER_CHUNK: tl.constexpr = CHUNK // BLOCK_T
    direction = tl.program_id(1)
    batch_idx, group, d, d_mask = _program_channels(dim_per_group, n_groups, dim_blocks, BLOCK_D)
    is_reversed, is_column = _direction_order(orders, direction, REVERSE)
    k = direction.to(tl.int64)
    b = batch_idx.to(tl.int64)
    n = tl.arange(0, BLOCK_N)
    n_mask = n < n_state
    dn_mask = d_mask[:, None] & n_mask[None, :]

    A = _load_tile(A_ptr + k * stride_A_dir, d, n, dn_mask, stride_A_dim, stride_A_state)
    A2 = A * LOG2E
    bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + k * stride_bias_dir + d * stride_bias_dim, mask=d_mask, other=0.0).to(tl.float32)
    if HAS_D:
        D = tl.load(D_ptr + k * stride_D_dir + d * stride_D_dim, mask=d_mask, other=0.0).to(tl.float32)
    dout_ptr += k * stride_dout_dir + b * stride_dout_batch
    u_ptr += k * stride_u_dir + b * stride_u_batch
    delta_ptr += k * stride_delta_dir + b * stride_delta_batch
    B_ptr += k * stride_B_dir + b * stride_B_batch + group * stride_B_group
    C_ptr += k * stride_C_dir + b * stride_C_batch + group * stride_C_group
    ckpt_ptr += k * stride_ckpt_dir + b * stride_ckpt_batch + d[:, None] * stride_ckpt_dim + n[None, :] * stride_ckpt_state
    program = k * tl.num_programs(0) + tl.program_id(0)
    scratch_ptr += program * (TILES_PER_CHUNK * BLOCK_D * BLOCK_N)
    scratch_ptr += tl.arange(0, BLOCK_D)[:, None] * BLOCK_N + n[None, :]
    du_ptr += k * stride_du_dir + b * stride_du_batch
    ddelta_ptr += k * stride_ddelta_dir + b * stride_ddelta_batch
    block = tl.program_id(0) % dim_blocks
    dB_ptr += k * stride_dBC_dir + b * stride_dBC_batch + group * stride_dBC_group + block * stride_dBC_block
    dC_ptr += k * stride_dBC_dir + b * stride_dBC_batch + group * stride_dBC_group + block * stride_dBC_block

    g_next = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)  # adjoint of the step after the current tile
    dA = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    dD = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dbias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    n_chunks = tl.cdiv(length, CHUNK)
    for chunk_from_end in range(0, n_chunks):
        chunk = n_chunks - 1 - chunk_from_end
        # pass 1: the state before each tile of the chunk, from the previous chunk's checkpoint
        previous = tl.load(ckpt_ptr + tl.maximum(chunk - 1, 0) * stride_ckpt_chunk, mask=dn_mask, other=0.0)
        h = tl.where(chunk > 0, previous, 0.0)
        for tile in range(0, TILES_PER_CHUNK):
            tl.store(scratch_ptr + tile * (BLOCK_D * BLOCK_N), h)
            first_step = chunk * CHUNK + tile * BLOCK_T
            if first_step < length:
                t, t_mask = _tile_steps(first_step, length, is_reversed, is_column, height, width, BLOCK_T)
                _, _, _, _, a, b_in = _tile_dynamics(
                    u_ptr, delta_ptr, B_ptr, bias, A2, t, d, n,
                    t_mask[:, None] & d_mask[None, :], t_mask[:, None] & n_mask[None, :],
                    stride_u_len, stride_u_dim, stride_delta_len, stride_delta_dim, stride_B_len, stride_B_state, SOFTPLUS,
                )  # fmt: skip
                prod_a, sum_b = tl.reduce((a, b_in), 0, _affine_combine)
                h = sum_b + prod_a * h
        tl.debug_barrier()
        # pass 2: tiles in reverse logical order
        for tile_from_end in range(0, TILES_PER_CHUNK):
            tile = TILES_PER_CHUNK - 1 - tile_from_end
            first_step = chunk * CHUNK + tile * BLOCK_T
            if first_step < length:
                t, t_mask = _tile_steps(first_step, length, is_reversed, is_column, height, width, BLOCK_T)
                td_mask = t_mask[:, None] & d_mask[None, :]
                tn_mask = t_mask[:, None] & n_mask[None, :]
                u, delta_pre, delta, Bt, a, b_in = _tile_dynamics(
                    u_ptr, delta_ptr, B_ptr, bias, A2, t, d, n, td_mask, tn_mask,
                    stride_u_len, stride_u_dim, stride_delta_len, stride_delta_dim, stride_B_len, stride_B_state, SOFTPLUS,
                )  # fmt: skip
                hs = _scan_states(a, b_in, tl.load(scratch_ptr + tile * (BLOCK_D * BLOCK_N)))
                Ct = _load_tile(C_ptr, t, n, tn_mask, stride_C_len, stride_C_state)
                dout = _load_tile(dout_ptr, t, d, td_mask, stride_dout_len, stride_dout_dim)
                dy = dout
                if HAS_Z:
                    z = _load_tile(z_ptr + b * stride_z_batch, t, d, td_mask, stride_z_len, stride_z_dim)
                    y = tl.sum(hs * Ct[:, None, :], axis=2)
                    if HAS_D:
                        y += D[None, :] * u
                    sig_z = tl.sigmoid(z)
                    dy = dout * z * sig_z
                    dz = dout * y * sig_z * (1.0 + z * (1.0 - sig_z))
                    dz_offsets = k * stride_dz_dir + b * stride_dz_batch + t[:, None] * stride_dz_len + d[None, :] * stride_dz_dim
                    tl.store(dz_ptr + dz_offsets, dz, mask=td_mask)

                # adjoint g_t = C_t dy_t + a_{t+1} g_{t+1}, with a_{t+1} from delta one logical step ahead
                t_ahead, ahead_mask = _tile_steps(first_step + 1, length, is_reversed, is_column, height, width, BLOCK_T)
                ahead_mask = ahead_mask[:, None] & d_mask[None, :]
                _, delta_ahead = _load_delta(
                    delta_ptr, bias, t_ahead, d, ahead_mask, stride_delta_len, stride_delta_dim, SOFTPLUS
                )
                a_ahead = tl.exp2(delta_ahead[:, :, None] * A2[None, :, :])
                cum_a, g = tl.associative_scan((a_ahead, Ct[:, None, :] * dy[:, :, None]), 0, _affine_combine, reverse=True)
                g += cum_a * g_next[None, :, :]
                g_next = _row(g, 0, BLOCK_T)

                w = g * (hs - b_in)
                dA += tl.sum(w * delta[:, :, None], axis=0)
                g_B = tl.sum(g * Bt[:, None, :], axis=2)
                ddelta = u * g_B + tl.sum(w * A[None, :, :], axis=2)
                du = delta * g_B
                if HAS_D:
                    du += D[None, :] * dy
                    dD += tl.sum(dy * u, axis=0)
                if SOFTPLUS:
                    ddelta *= tl.where(delta_pre <= 20.0, tl.sigmoid(delta_pre), 1.0)
                if HAS_BIAS:
                    dbias += tl.sum(tl.where(td_mask, ddelta, 0.0), axis=0)
                du_offsets = t[:, None] * stride_du_len + d[None, :] * stride_du_dim
                tl.store(du_ptr + du_offsets, du.to(du_ptr.dtype.element_ty), mask=td_mask)
                ddelta_offsets = t[:, None] * stride_ddelta_len + d[None, :] * stride_ddelta_dim
                tl.store(ddelta_ptr + ddelta_offsets, ddelta.to(ddelta_ptr.dtype.element_ty), mask=td_mask)
                dBC_offsets = t[:, None] * stride_dBC_len + n[None, :] * stride_dBC_state
                tl.store(dB_ptr + dBC_offsets, tl.sum(g * (delta * u)[:, :, None], axis=1), mask=tn_mask)
                tl.store(dC_ptr + dBC_offsets, tl.sum(hs * dy[:, :, None], axis=1), mask=tn_mask)
        tl.debug_barrier()

    dA_offsets = k * stride_dA_dir + b * stride_dA_batch + d[:, None] * stride_dA_dim + n[None, :] * stride_dA_state
    tl.store(dA_ptr + dA_offsets, dA, mask=dn_mask)
    dvec_offsets = k * stride_dvec_dir + b * stride_dvec_batch + d * stride_dvec_dim
    if HAS_D:
        tl.store(dD_ptr + dvec_offsets, dD, mask=d_mask)
    if HAS_BIAS:
        tl.store(dbias_ptr + dvec_offsets, dbias, mask=d_mask)


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuLimits:
    """A GPU as the tile choice (multiprocessors) and its compile check (shared memory per block) see it."""

    capability: int
    multiprocessors: int
    smem_per_block: int


GPU_LIMITS = {
    80: GpuLimits(80, 108, 163 * 1024),  # A100
    90: GpuLimits(90, 132, 227 * 1024),  # H100, H200
}
"""The targets every tile choice is compiled for without a GPU on each CI run (tools/triton_resources.py)."""


@functools.cache
def _cuda_limits(index: int) -> GpuLimits:
    props = torch.cuda.get_device_properties(index)
    smem = getattr(props, "shared_memory_per_block_optin", 48 * 1024)  # not reported by older PyTorch: CUDA's default
    return GpuLimits(props.major * 10 + props.minor, props.multi_processor_count, smem)


def device_limits(device: torch.device) -> GpuLimits:
    """The limits of ``device``'s GPU; for CPU tensors (Triton's interpreter) those of an H100."""
    if device.type != "cuda":
        return GPU_LIMITS[90]
    return _cuda_limits(device.index if device.index is not None else torch.cuda.current_device())


@dataclass(frozen=True)
class Tiles:
    """Block sizes of one launch: BLOCK_T steps x BLOCK_D channels x BLOCK_N states per program."""

    block_t: int
    block_d: int
    block_n: int
    num_warps: int


_NARROWEST_BLOCK_D = 8


def _widest_block_d(block_n: int) -> int:
    """Channels per program when the grid fills the GPU: 32, fewer for large states (registers)."""
    return min(32, max(_NARROWEST_BLOCK_D, 512 // block_n))


def tiles_for(block_d: int, block_n: int, backward: bool) -> Tiles:
    """The tile of ``block_d`` channels and ``block_n`` states: as many steps as the kernel's register budget allows.

    BLOCK_T is a power of two dividing :data:`CHUNK_SIZE`, so checkpoints fall on tile ends.
    """
    if backward:
        tile_elements = _BACKWARD_TILE_ELEMENTS if block_n <= 16 else _BACKWARD_TILE_ELEMENTS // 2
        most_steps = _MAX_BACKWARD_BLOCK_T
    else:
        tile_elements, most_steps = _FORWARD_TILE_ELEMENTS, _MAX_BLOCK_T
    largest_divisor = CHUNK_SIZE & -CHUNK_SIZE
    block_t = max(2, min(tile_elements // (block_d * block_n), most_steps, largest_divisor))
    num_warps = 8 if block_t * block_d * block_n >= 2048 else 4
    return Tiles(block_t, block_d, block_n, num_warps)


def tile_choices(n_state: int, backward: bool) -> list[Tiles]:
    """Every tile :func:`_choose_tiles` can pick for a state size: those compiled for each GPU target in CI."""
    block_n = triton.next_power_of_2(n_state)
    widths = [_widest_block_d(block_n)]
    while widths[-1] > _NARROWEST_BLOCK_D:
        widths.append(widths[-1] // 2)
    return [tiles_for(block_d, block_n, backward) for block_d in widths]


def _choose_tiles(dim_per_group: int, n_state: int, backward: bool, programs_per_block: int, limits: GpuLimits) -> Tiles:
    """The tile of one launch on the GPU of ``limits``, one of :func:`tile_choices`.

    The widest programs (32 channels) make the fewest partial sums of dB and dC, the kernels' extra
    memory traffic; a grid of ``programs_per_block * cdiv(dim_per_group, BLOCK_D)`` programs that would
    not fill the GPU's multiprocessors twice gets narrower programs, more of them. The tile's steps
    follow from the register budget, the same on every target (64K registers per multiprocessor);
    every tile is compiled for sm_80 and sm_90 in CI (tools/triton_resources.py): no spills, shared
    memory (at most 33 KiB) within any target's limit, registers per thread and occupancy printed.
    """
    for tiles in tile_choices(n_state, backward):
        if programs_per_block * triton.cdiv(dim_per_group, tiles.block_d) >= 2 * limits.multiprocessors:
            return tiles
    return tiles


@dataclass(frozen=True)
class KernelLaunch:
    """One launch as the launchers issue it: the kernel, its grid, arguments and compile-time options.

    Built apart from running it, so that the exact variant a call picks can also be compiled for a GPU
    target without a GPU (tests/kernels/test_triton_targets.py).
    """

    kernel: triton.runtime.JITFunction
    grid: tuple[int, ...]
    args: tuple
    options: dict

    def __call__(self, device: torch.device) -> None:
        with on_device(device):
            self.kernel[self.grid](*self.args, **self.options)


def on_device(device: torch.device):
    """Make ``device`` the current GPU while launching (a no-op for a CPU device): Triton launches on the current one."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _strides(x: torch.Tensor | None, ndim: int) -> tuple[int, ...]:
    """Strides of ``x``, or zeros for an absent optional input."""
    return (0,) * ndim if x is None else x.stride()


def _flags(D, z, delta_bias, delta_softplus: bool, reverse: bool, tiles: Tiles) -> dict:
    """Compile-time switches and block sizes shared by the two kernels."""
    return dict(
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=bool(delta_softplus), REVERSE=bool(reverse), CHUNK=CHUNK_SIZE,
        BLOCK_T=tiles.block_t, BLOCK_D=tiles.block_d, BLOCK_N=tiles.block_n, num_warps=tiles.num_warps,
    )  # fmt: skip


def _order_arguments(directions: int, length: int, orders, grid) -> tuple[int, int, int]:
    """The kernels' runtime ``orders, height, width``: each direction's order code packed in two bits (direction
    ``k`` at bit ``2 k``; ``REVERSE`` still applies on top), and the grid."""
    packed = sum(code << 2 * k for k, code in enumerate(direction_orders(directions, False, orders)))
    return (packed, *grid_shape(length, grid))


def forward_launch(
    u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool, reverse: bool, limits: GpuLimits, tiles: Tiles | None = None,
    orders=None, grid=None,
):  # fmt: skip
    """The forward launch for the canonical inputs (see :func:`triton_forward`), with its outputs allocated.

    ``tiles`` (one of :func:`tile_choices`) overrides the choice for ``limits``' GPU.

    Returns:
        ``(launch, out, checkpoints)``.
    """
    n_dir, batch, dim, length = u.shape
    n_groups, n_state = B.shape[2], A.shape[-1]
    tiles = tiles or _choose_tiles(dim // n_groups, n_state, False, n_dir * batch * n_groups, limits)
    dim_blocks = triton.cdiv(dim // n_groups, tiles.block_d)
    out = empty_channels_last(n_dir, batch, dim, length, like=u)
    checkpoints = empty_checkpoints(u, n_dir, batch, length, dim, n_state)
    args = (
        u, delta, A, B, C, D, z, delta_bias, out, checkpoints,
        length, n_state, dim // n_groups, n_groups, dim_blocks, *_order_arguments(n_dir, length, orders, grid),
        *u.stride(), *delta.stride(), *A.stride(), *B.stride(), *C.stride(),
        *_strides(D, 2), *_strides(z, 3), *_strides(delta_bias, 2), *out.stride(), *checkpoints.stride(),
    )  # fmt: skip
    grid = (batch * n_groups * dim_blocks, n_dir)
    flags = _flags(D, z, delta_bias, delta_softplus, reverse, tiles)
    return KernelLaunch(_selective_scan_fwd_kernel, grid, args, flags), out, checkpoints


def backward_launch(
    dout, u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool, reverse: bool, checkpoints,
    limits: GpuLimits, tiles: Tiles | None = None, orders=None, grid=None,
):  # fmt: skip
    """The backward launch for the canonical inputs (see :func:`triton_backward`), with its buffers allocated.

    ``tiles`` (one of :func:`tile_choices`) overrides the choice for ``limits``' GPU.

    Returns:
        ``(launch, buffers)``: ``buffers`` holds du, ddelta (complete) and the per-program partial sums
        dA, dB, dC, dD, dbias, dz (per direction), each None where the input is absent.
    """
    n_dir, batch, dim, length = u.shape
    n_groups, n_state = B.shape[2], A.shape[-1]
    tiles = tiles or _choose_tiles(dim // n_groups, n_state, True, n_dir * batch * n_groups, limits)
    dim_blocks = triton.cdiv(dim // n_groups, tiles.block_d)
    n_programs = batch * n_groups * dim_blocks
    f32 = dict(device=u.device, dtype=torch.float32)
    dD_part, dbias_part = torch.empty(2, n_dir, batch, dim, **f32)
    du = empty_channels_last(n_dir, batch, dim, length, like=u)
    ddelta = empty_channels_last(n_dir, batch, dim, length, like=delta)
    dz = empty_channels_last(n_dir, batch, dim, length, like=u, dtype=torch.float32) if z is not None else None
    dB = torch.empty(n_dir, batch, n_groups, dim_blocks, n_state, length, **f32)
    dC = torch.empty(n_dir, batch, n_groups, dim_blocks, n_state, length, **f32)
    dA = torch.empty(n_dir, batch, dim, n_state, **f32)
    buffers = dict(
        du=du, ddelta=ddelta, dz=dz, dB=dB, dC=dC, dA=dA,
        dD=dD_part if D is not None else None, dbias=dbias_part if delta_bias is not None else None,
    )  # fmt: skip
    scratch = torch.empty(n_dir * n_programs, CHUNK_SIZE // tiles.block_t, tiles.block_d, tiles.block_n, **f32)
    args = (
        dout, u, delta, A, B, C, D, z, delta_bias, checkpoints, scratch,
        du, ddelta, dA, dB, dC, dD_part, dz, dbias_part,
        length, n_state, dim // n_groups, n_groups, dim_blocks, *_order_arguments(n_dir, length, orders, grid),
        *dout.stride(), *u.stride(), *delta.stride(), *A.stride(), *B.stride(), *C.stride(),
        *_strides(D, 2), *_strides(z, 3), *_strides(delta_bias, 2), *checkpoints.stride(),
        *du.stride(), *ddelta.stride(), *_strides(dz, 4), *dB.stride(), *dA.stride(),
        *dD_part.stride(),
    )  # fmt: skip
    flags = _flags(D, z, delta_bias, delta_softplus, reverse, tiles) | dict(maxnreg=_BACKWARD_MAX_REGISTERS)
    return KernelLaunch(_selective_scan_bwd_kernel, (n_programs, n_dir), args, flags), buffers


def triton_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool, reverse: bool, orders=None, grid=None):
    """Selective scan forward in the canonical form of :mod:`.scan_layout`.

    Args:
        u, delta: (K, batch, dim, L); A: (K, dim, N); B, C: (K, batch, G, N, L);
        D, delta_bias: (K, dim) or None; z: (batch, dim, L) or None; orders: K order codes or None;
        grid: (H, W) or None (see :mod:`.scan_layout`).

    Returns:
        ``out`` (K, batch, dim, L) in ``u.dtype``, channels-last, and ``checkpoints``
        (K, batch, num_chunks(L), dim, N) float32: the state after each chunk of CHUNK_SIZE steps.
    """
    inputs = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse)
    launch, out, checkpoints = forward_launch(*inputs, limits=device_limits(u.device), orders=orders, grid=grid)
    launch(u.device)
    return out, checkpoints


def triton_backward(
    dout, u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool, reverse: bool, checkpoints, orders=None, grid=None
):
    """Gradients of :func:`triton_forward` for every input, recomputing states from ``checkpoints``.

    Args:
        dout: (K, batch, dim, L), the gradient of ``out``, any strides; the other inputs as in :func:`triton_forward`.

    Returns:
        ``(du, ddelta, dA, dB, dC, dD, dz, ddelta_bias)`` as documented in :mod:`.scan_layout`.
    """
    inputs = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse)
    launch, grads = backward_launch(dout, *inputs, checkpoints, limits=device_limits(u.device), orders=orders, grid=grid)
    launch(u.device)

    def summed(name: str, axis: int) -> torch.Tensor:
        return u.new_empty(0, dtype=torch.float32) if grads[name] is None else grads[name].sum(axis)

    return (
        grads["du"],
        grads["ddelta"],
        grads["dA"].sum(1),
        grads["dB"].sum(3).to(B.dtype),
        grads["dC"].sum(3).to(C.dtype),
        summed("dD", 1),
        u.new_empty(0, dtype=torch.float32) if z is None else grads["dz"].sum(0).to(z.dtype),
        summed("dbias", 1),
    )
