"""The chunked PyTorch selective scan: the fast path for CPU tensors, forward and backward.

It follows the canonical contract of :mod:`vim.kernels.scan_layout` (leading direction axis ``K``).
For one direction and a slice of the batch it materialises, time-major and padded to ``Lp``
steps, the decays ``a = exp(delta * A)`` and the drives ``b = delta * u * B`` as
``(b, Lp, dim, N)`` tensors and solves the linear recurrence ``h_s = a_s * h_{s-1} + b_s`` with
:func:`linear_recurrence_`: the ``Lp`` steps are cut into chunks of ``T ~ sqrt(L)`` steps that
all advance together, so a scan costs about ``2T + L/T`` tensor operations instead of one per
step, with no division by cumulative products (long sequences with fast decay stay finite).

Reversed directions never flip anything: they walk the same time-major buffers from the last
step to the first. Padding steps (``t >= L``) have ``a = 1`` and ``b = 0``, so they change no
state in either direction. Column-major directions of a 2-D grid (order codes 1 and 3) are the one
place where this path copies in step order: their time-major buffers are gathered column by column
(``index_select``; the buffers are copies anyway) and their results scattered back into grid
order, which keeps the recurrence code the same for every order.

The backward pass recomputes the states from scratch in the compute dtype (it does not need the
float32 checkpoints, so float64 gradients stay exact), runs the adjoint recurrence
``g_t = C_t dy_t + a_{t'} g_{t'}`` (``t'`` the next step of the scan) with the same routine in
the opposite order, and forms every gradient with ``w = g * a_t * h_{t-1}``.

Memory: the batch is processed in slices of at most :data:`SLICE_ELEMENTS` state elements
(``b * Lp * dim * N``), so the peak stays a few such buffers whatever the input size; small
slices also keep the working set in cache.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .scan_layout import (
    CHUNK_SIZE,
    COLUMN,
    ROW_REVERSED,
    direction_orders,
    empty_channels_last,
    empty_checkpoints,
    grid_shape,
    num_chunks,
    step_tokens,
)

__all__ = ["chunked_backward", "chunked_forward", "linear_recurrence_"]

SLICE_ELEMENTS = 1 << 21
"""Largest ``batch_slice * Lp * dim * N`` handled at once (three float32 buffers of 8 MiB)."""


# ---------------------------------------------------------------------------------------------
# the chunked linear recurrence
# ---------------------------------------------------------------------------------------------


def chunk_length(length: int) -> int:
    """Steps per chunk for a sequence of ``length`` steps: about sqrt(L), with little padding."""
    return _ceil_div(length, max(1, math.isqrt(length)))


def padded_length(length: int) -> int:
    """``Lp``: ``length`` rounded up to a whole number of chunks."""
    return _ceil_div(length, chunk_length(length)) * chunk_length(length)


def linear_recurrence_(x: Tensor, m: Tensor, chunk: int, reverse: bool) -> Tensor:
    """Solve ``x_s <- m_s * x_{s-1} + x_s`` in place along axis 1, from a zero state.

    ``s - 1`` is the previous step of the scan: the previous index, or the next one if
    ``reverse``. All chunks of ``chunk`` steps advance side by side: (1) each chunk from a zero
    state, keeping only its end state, (2) a sequential carry of the chunk end states, (3) each
    chunk again from its carried entry state, writing every step.

    Args:
        x: (b, Lp, F), ``Lp`` a multiple of ``chunk``; overwritten with the solution.
        m: (b, Lp, F) multipliers, any strides; not modified.

    Returns:
        ``x``.
    """
    batch, length, features = x.shape
    xs = x.view(batch, length // chunk, chunk, features)
    ms = m.unflatten(1, (length // chunk, chunk))
    steps = list(range(chunk))
    chunks = list(range(length // chunk))
    if reverse:
        steps.reverse()
        chunks.reverse()
    first = steps[0]
    end = xs[:, :, first]
    for step in steps[1:]:
        end = torch.addcmul(xs[:, :, step], ms[:, :, step], end)
    decay = ms.prod(2)
    entry = torch.zeros_like(end)
    for previous, current in itertools.pairwise(chunks):
        torch.addcmul(end[:, previous], decay[:, previous], entry[:, previous], out=entry[:, current])
    xs[:, :, first].addcmul_(ms[:, :, first], entry)
    for previous, step in itertools.pairwise(steps):
        xs[:, :, step].addcmul_(ms[:, :, step], xs[:, :, previous])
    return x


# ---------------------------------------------------------------------------------------------
# one direction of one batch slice, time-major
# ---------------------------------------------------------------------------------------------


def _time_major(x: Tensor, padded_length: int, dtype: torch.dtype) -> Tensor:
    """(b, *rest, L) -> (b, padded_length, *rest) in ``dtype``, zero after step L."""
    length = x.shape[-1]
    out = x.new_empty(x.shape[0], padded_length, *x.shape[1:-1], dtype=dtype)
    out[:, :length] = x.movedim(-1, 1)
    out[:, length:] = 0
    return out


def _optional(x: Tensor | None, index: int, dtype: torch.dtype) -> Tensor | None:
    return None if x is None else x[index].to(dtype)


@dataclass
class _Direction:
    """One scan direction over a slice of the batch: inputs time-major, padded to ``Lp`` steps.

    Shapes: ``delta``, ``u``, ``delta_u`` (b, Lp, dim); ``B``, ``C`` (b, Lp, G, N); ``A`` (G, dim // G, N);
    ``D`` (dim,) or None; ``softplus_slope`` (b, Lp, dim), d softplus / d input, or None.

    Time-major buffers are in the direction's row-major step order: token order, walked backwards if
    ``reverse``. A column-major direction has them gathered column by column: ``columns`` (L,) holds the
    token of each such step (None for a row-major direction), see :meth:`read` and :meth:`to_tokens`.
    """

    reverse: bool
    columns: Tensor | None
    chunk: int
    length: int
    delta: Tensor
    u: Tensor
    delta_u: Tensor
    B: Tensor
    C: Tensor
    A: Tensor
    D: Tensor | None
    softplus_slope: Tensor | None

    @classmethod
    def prepare(cls, u, delta, A, B, C, D, delta_bias, delta_softplus, order, grid, k, rows, dtype, for_backward) -> _Direction:
        """Direction ``k`` of the canonical inputs (see scan_layout), walked in ``order`` over ``grid``, batch elements
        ``rows``.

        ``for_backward`` also keeps the slope of the softplus (if any) for the gradient of delta.
        """
        length = u.shape[-1]
        padded = padded_length(length)
        groups = B.shape[2]
        columns = step_tokens(order & ~ROW_REVERSED, grid, u.device) if order & COLUMN else None

        def read(x: Tensor) -> Tensor:  # per-token (b, ..., L) in the direction's forward step order, time-major
            return _time_major(x if columns is None else x.index_select(-1, columns), padded, dtype)

        delta_t = read(delta[k, rows])
        if delta_bias is not None:
            delta_t[:, :length] += delta_bias[k].to(dtype)
        slope = torch.sigmoid(delta_t[:, :length]) if delta_softplus and for_backward else None
        if delta_softplus:
            delta_t[:, :length] = F.softplus(delta_t[:, :length])
        u_t = read(u[k, rows])
        return cls(
            reverse=bool(order & ROW_REVERSED),
            columns=columns,
            chunk=chunk_length(length),
            length=length,
            delta=delta_t,
            u=u_t,
            delta_u=delta_t * u_t,
            B=read(B[k, rows]),
            C=read(C[k, rows]),
            A=A[k].to(dtype).unflatten(0, (groups, -1)),
            D=_optional(D, k, dtype),
            softplus_slope=slope,
        )

    def read(self, x: Tensor) -> Tensor:
        """A time-major (b, L, ...) tensor in grid order, in this direction's step order (a column-major direction's
        is gathered)."""
        return x if self.columns is None else x.index_select(1, self.columns)

    def to_tokens(self, x: Tensor) -> Tensor:
        """A time-major (b, L, ...) result in this direction's step order, back in grid order."""
        return x if self.columns is None else x.index_select(1, torch.argsort(self.columns))

    @property
    def grouped_shape(self) -> tuple[int, ...]:
        """(b, Lp, G, dim // G): the channel axis split by the groups of B and C."""
        return (*self.u.shape[:2], *self.A.shape[:2])

    def decays(self, spare_step: bool) -> tuple[Tensor, Tensor]:
        """``a = exp(delta * A)`` (b, Lp, G, dim // G, N), and the buffer holding it.

        Computed as ``exp2(delta * A * log2(e))``: exp2 is about 3x faster than exp on CPU.

        With ``spare_step`` the buffer has one more step (value 1) so that a view shifted by one
        step, ``a`` of the next step of the scan, is also available (see :meth:`next_decays`).
        """
        batch, padded = self.u.shape[:2]
        offset = int(spare_step and self.reverse)
        buffer = self.u.new_empty(batch, padded + int(spare_step), *self.A.shape)
        a = buffer[:, offset : offset + padded]
        torch.mul(self.delta.view(self.grouped_shape).unsqueeze(-1), self.A * math.log2(math.e), out=a).exp2_()
        if spare_step:
            buffer[:, padded if offset == 0 else 0] = 1
        return a, buffer

    def next_decays(self, buffer: Tensor) -> Tensor:
        """From :meth:`decays`' buffer: at each step, ``a`` of the following step of the scan."""
        padded = self.u.shape[1]
        return buffer[:, :padded] if self.reverse else buffer[:, 1:]

    def states(self, a: Tensor) -> Tensor:
        """The states h (b, Lp, G, dim // G, N) of every step, given the decays ``a``."""
        drive = self.delta_u.view(self.grouped_shape).unsqueeze(-1) * self.B.unsqueeze(-2)
        return _recur_(drive, a, self.chunk, self.reverse)

    def output(self, h: Tensor) -> Tensor:
        """y = C.h + D*u (b, Lp, dim), before the gate."""
        y = _sum_state(h, self.C)
        return y if self.D is None else y.addcmul_(self.u, self.D)

    def gradients(self, dy: Tensor, a: Tensor, buffer: Tensor, h: Tensor) -> dict[str, Tensor]:
        """Gradients of this direction, given dL/dy (b, Lp, dim) (zero after step L) and the forward pass.

        ``a``, ``buffer``: from :meth:`decays` with a spare step; ``h``: :meth:`states`. ``a`` and
        ``buffer`` are overwritten. Per-step gradients are (b, L, ...), parameter gradients summed
        over the slice: du, ddelta (b, L, dim); dB, dC (b, L, G, N); dA (dim, N); dD, ddelta_bias (dim,).
        """
        length = self.length
        g = dy.view(self.grouped_shape).unsqueeze(-1) * self.C.unsqueeze(-2)
        _recur_(g, self.next_decays(buffer), self.chunk, not self.reverse)
        w = _times_previous_states_(a, h, self.reverse).mul_(g)
        g_B = _sum_state(g, self.B)
        grads = {"B": _sum_channels(g, self.delta_u), "C": _sum_channels(h, dy)}
        w_A = torch.mul(w, self.A, out=g).sum(-1).flatten(2)
        ddelta = (g_B * self.u + w_A)[:, :length]
        if self.softplus_slope is not None:
            ddelta *= self.softplus_slope
        du = g_B * self.delta
        if self.D is not None:
            du.addcmul_(dy, self.D)
        w_delta = torch.mul(w, self.delta.view(self.grouped_shape).unsqueeze(-1), out=g)
        return {
            "u": du[:, :length],
            "delta": ddelta,
            "A": w_delta[:, :length].sum((0, 1)).flatten(0, 1),
            "B": grads["B"][:, :length],
            "C": grads["C"][:, :length],
            "D": (dy * self.u).sum((0, 1)),
            "delta_bias": ddelta.sum((0, 1)),
        }


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _recur_(x: Tensor, m: Tensor, chunk: int, reverse: bool) -> Tensor:
    """:func:`linear_recurrence_` on (b, Lp, G, dg, N) tensors, in place on ``x``."""
    linear_recurrence_(x.flatten(2), m.flatten(2), chunk, reverse)
    return x


def _times_previous_states_(a: Tensor, h: Tensor, reverse: bool) -> Tensor:
    """In place a_t <- a_t * h_{t-1}, ``t - 1`` the previous step of the scan (h before the first is 0)."""
    if reverse:
        a[:, :-1].mul_(h[:, 1:])
        a[:, -1] = 0
    else:
        a[:, 1:].mul_(h[:, :-1])
        a[:, 0] = 0
    return a


def _sum_state(s: Tensor, v: Tensor) -> Tensor:
    """sum_n s * v: s (b, Lp, G, dg, N), v (b, Lp, G, N) -> (b, Lp, dim). (einsum: 5x faster than matmul here.)"""
    return torch.einsum("blgdn,blgn->blgd", s, v).flatten(2)


def _sum_channels(s: Tensor, v: Tensor) -> Tensor:
    """Sum over the channels of each group of s * v: s (b, Lp, G, dg, N), v (b, Lp, dim) -> (b, Lp, G, N)."""
    return torch.matmul(v.view(s.shape[:-1]).unsqueeze(-2), s).squeeze(-2)


# ---------------------------------------------------------------------------------------------
# the backend entry points (canonical form, see scan_layout)
# ---------------------------------------------------------------------------------------------


def _compute_dtype(u: Tensor) -> torch.dtype:
    return torch.float64 if u.dtype == torch.float64 else torch.float32


def _batch_slices(batch: int, length: int, dim: int, state: int) -> list[slice]:
    """Slices of the batch whose (b, Lp, dim, N) buffers hold at most :data:`SLICE_ELEMENTS` elements."""
    step = max(1, SLICE_ELEMENTS // (padded_length(length) * dim * state))
    return [slice(start, min(start + step, batch)) for start in range(0, batch, step)]


def _checkpoint_steps(length: int, reverse: bool) -> list[int]:
    """Time index of the last logical step of each chunk of CHUNK_SIZE steps."""
    steps = [min((j + 1) * CHUNK_SIZE, length) - 1 for j in range(num_chunks(length))]
    return [length - 1 - s for s in steps] if reverse else steps


def _channels_first(x: Tensor) -> Tensor:
    """A (b, L, dim) time-major result as the (b, dim, L) view the contract indexes by."""
    return x.transpose(1, 2)


def chunked_forward(
    u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool, reverse: bool, orders=None, grid=None
) -> tuple[Tensor, Tensor]:
    """Forward pass in the canonical form: ``out`` (K, batch, dim, L) and ``checkpoints`` (K, batch, chunks, dim, N)."""
    K, batch, dim, length = u.shape
    codes, grid = direction_orders(K, reverse, orders), grid_shape(length, grid)
    state = A.shape[-1]
    dtype = _compute_dtype(u)
    out = empty_channels_last(K, batch, dim, length, like=u)
    checkpoints = empty_checkpoints(u, K, batch, length, dim, state)
    for rows in _batch_slices(batch, length, dim, state):
        gate = None if z is None else F.silu(_channels_first(z[rows]).to(dtype))
        for k in range(K):
            direction = _Direction.prepare(
                u, delta, A, B, C, D, delta_bias, delta_softplus, codes[k], grid, k, rows, dtype, False
            )
            a, _ = direction.decays(spare_step=False)
            h = direction.states(a)
            y = direction.to_tokens(direction.output(h)[:, :length])
            _channels_first(out[k, rows]).copy_(y if gate is None else y * gate)
            checkpoints[k, rows] = h[:, _checkpoint_steps(length, direction.reverse)].flatten(2, 3)
    return out, checkpoints


def chunked_backward(
    dout, u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool, reverse: bool, checkpoints, orders=None, grid=None
) -> tuple[Tensor, ...]:
    """Backward pass in the canonical form: (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias).

    ``checkpoints`` are not used: the states are recomputed in the compute dtype.
    """
    del checkpoints
    K, batch, dim, length = u.shape
    codes, grid = direction_orders(K, reverse, orders), grid_shape(length, grid)
    state = A.shape[-1]
    dtype = _compute_dtype(u)
    grads = {
        "u": empty_channels_last(K, batch, dim, length, like=u),
        "delta": empty_channels_last(K, batch, dim, length, like=delta),
        "B": torch.empty_like(B, memory_format=torch.contiguous_format),
        "C": torch.empty_like(C, memory_format=torch.contiguous_format),
        "A": A.new_zeros(K, dim, state, dtype=dtype),
        "D": A.new_zeros(K, dim, dtype=dtype) if D is not None else None,
        "delta_bias": A.new_zeros(K, dim, dtype=dtype) if delta_bias is not None else None,
    }
    dz = None if z is None else empty_channels_last(batch, dim, length, like=z)
    for rows in _batch_slices(batch, length, dim, state):
        z_rows = None if z is None else _channels_first(z[rows]).to(dtype)
        dz_rows = None if z_rows is None else torch.zeros_like(z_rows)
        for k in range(K):
            direction = _Direction.prepare(u, delta, A, B, C, D, delta_bias, delta_softplus, codes[k], grid, k, rows, dtype, True)
            dy = _time_major(dout[k, rows], direction.u.shape[1], dtype)  # in grid order
            a, buffer = direction.decays(spare_step=True)
            h = direction.states(a)
            if z_rows is not None and dz_rows is not None:  # both or neither
                y = direction.to_tokens(direction.output(h)[:, :length])
                dz_rows += dy[:, :length] * y * _silu_slope(z_rows)
                dy[:, :length] *= F.silu(z_rows)
            dy[:, :length] = direction.read(dy[:, :length])  # in step order, as the recurrence reads it
            found = direction.gradients(dy, a, buffer, h)
            found |= {name: direction.to_tokens(found[name]) for name in _PER_STEP}
            _channels_first(grads["u"][k, rows]).copy_(found["u"])
            _channels_first(grads["delta"][k, rows]).copy_(found["delta"])
            grads["B"][k, rows] = found["B"].permute(0, 2, 3, 1)
            grads["C"][k, rows] = found["C"].permute(0, 2, 3, 1)
            for name in ("A", "D", "delta_bias"):
                if grads[name] is not None:
                    grads[name][k] += found[name]
        if dz is not None and dz_rows is not None:
            _channels_first(dz[rows]).copy_(dz_rows)
    return (
        grads["u"], grads["delta"], grads["A"].to(dtype), grads["B"], grads["C"],
        _parameter_or_empty(grads["D"], like=u),
        u.new_empty(0, dtype=torch.float32) if dz is None else dz,
        _parameter_or_empty(grads["delta_bias"], like=u),
    )  # fmt: skip


_PER_STEP = ("u", "delta", "B", "C")
"""The gradients :meth:`_Direction.gradients` gives per step (the others are summed over the steps)."""


def _parameter_or_empty(grad: Tensor | None, like: Tensor) -> Tensor:
    """A parameter gradient in the compute dtype of ``like`` (float64 stays float64, anything else float32), or a
    fresh empty float32 tensor for an input that was None (outputs may not alias)."""
    return like.new_empty(0, dtype=torch.float32) if grad is None else grad.to(_compute_dtype(like))


def _silu_slope(z: Tensor) -> Tensor:
    """d silu(z) / dz."""
    sigmoid = torch.sigmoid(z)
    return sigmoid * (1 + z * (1 - sigmoid))
