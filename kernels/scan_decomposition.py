"""The selective scan in standard operations, for exporters: ONNX, and AOTInductor packages that run without vim.

The ``vim::selective_scan_fwd`` custom op is opaque to exporters: ONNX has no such operator, and an
AOTInductor package can only call it back through PyTorch's dispatcher, where this package must have
registered it first. :func:`decomposed_scan_forward` computes the op's outputs (the canonical contract
of :mod:`vim.kernels.scan_layout`) with standard operations and PyTorch's ``scan`` higher-order op,
which the ONNX exporter turns into one ONNX ``Scan`` node. It is a drop-in decomposition::

    table = torch.export.default_decompositions()
    table[torch.ops.vim.selective_scan_fwd.default] = decomposed_scan_forward
    program = torch.export.export(model, (x,)).run_decompositions(table)   # no vim op left in the graph

Formulation: reversed directions are flipped in time once (a column-major direction of a 2-D grid is gathered by
its constant token indices), so that every direction and every batch
row advance together, one step per iteration, through one loop over the ``L`` steps whose body does
a whole step of the recurrence: ``h = exp(delta_t * A) * h + delta_t * u_t * B_t``, ``y_t = C_t . h``.
Nothing of size ``(L, dim, N)`` is stored, and the graph has the same few nodes for any sequence length
and batch.

Why a loop and not the chunked parallel scan of :mod:`vim.kernels.scan_cpu` unrolled into the graph:
on a two-block Vim-Ti at 224 px (197 tokens), onnxruntime 1.32 (CPU, one thread) ran the chunked
graph (549 nodes, 4.4 MB) in 72 ms per image (625 ms per batch of 8) and this one (237 nodes,
4.1 MB) in 23 ms (237 ms); the chunked form also materialises several ``(L, dim, N)`` buffers and
its graph grows with ``sqrt(L)``. Computing every step's decay and drive before the loop (a body of
two fused multiply-adds) took 33 ms, and four steps per iteration 25 ms. AOTInductor lowers the same
loop to a ``while_loop`` in C++.
PyTorch's ``scan`` is a prototype feature (``torch._higher_order_ops``); run eagerly it is a Python
loop, slow but exact, which is what the tests compare with the sequential reference.

The checkpoints output (the state at the end of every chunk of ``CHUNK_SIZE`` steps) comes from a
second loop that keeps every state. Inference graphs never read it, so exporters drop it as dead code;
it is there so that the decomposition keeps the op's whole contract.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._higher_order_ops.scan import scan

from .scan_layout import CHUNK_SIZE, ROW, ROW_REVERSED, direction_orders, grid_shape, num_chunks, step_tokens

__all__ = ["EXPORT_CHUNK", "decomposed_scan_forward"]

Step = Callable[[Tensor, tuple[Tensor, ...]], tuple[Tensor, tuple[Tensor, Tensor]]]

EXPORT_CHUNK = 8
"""Steps per iteration of the exported loop (measured on Vim-Ti, see the module docstring)."""


def _to_steps(x: Tensor, codes: tuple[int, ...], grid: tuple[int, int]) -> Tensor:
    """(K, batch, L, ...) in grid (token) order -> each direction in its step order (see :func:`step_tokens`): reversed
    row directions flipped in time, column directions gathered by their constant token indices."""
    if all(code == ROW for code in codes):
        return x
    return torch.stack([_direction_to_steps(x[k], code, grid) for k, code in enumerate(codes)])


def _direction_to_steps(x: Tensor, code: int, grid: tuple[int, int]) -> Tensor:
    if code == ROW:
        return x
    if code == ROW_REVERSED:
        return x.flip(1)
    return x.index_select(1, step_tokens(code, grid, x.device))


def _to_tokens(y: Tensor, codes: tuple[int, ...], grid: tuple[int, int]) -> Tensor:
    """The inverse of :func:`_to_steps`: (K, batch, L, ...) in each direction's step order -> grid order."""
    if all(code == ROW for code in codes):
        return y
    return torch.stack([_direction_to_tokens(y[k], code, grid) for k, code in enumerate(codes)])


def _direction_to_tokens(y: Tensor, code: int, grid: tuple[int, int]) -> Tensor:
    if code in (ROW, ROW_REVERSED):
        return _direction_to_steps(y, code, grid)  # a flip is its own inverse
    return y.index_select(1, torch.argsort(step_tokens(code, grid, y.device)))


def _chunk_step(A: Tensor, batch: int | torch.SymInt | None) -> Step:
    """The loop body: ``(h, (delta_c, delta_u_c, B_c, C_c)) -> (h', (y_c, h'))``, a whole chunk of T steps.

    Shapes: ``h`` (1, K, batch, G, N, dim // G); ``A`` (K, 1, G, N, dim // G), broadcast over the batch; per chunk,
    ``delta_c`` and ``delta_u_c`` (T, K, batch, G, 1, dim // G), ``B_c`` (T, K, batch, G, N, 1), ``C_c``
    (T, K, batch, G, 1, N); ``y_c`` (T, K, batch, G, 1, dim // G); the end state ``h'`` also without its leading axis. Channels are the innermost axis of every
    tensor of the state's size, so each broadcast multiplies whole rows (onnxruntime's fast broadcasting path).

    The chunk's decays ``exp(delta_t * A)`` and drives ``delta_t u_t B_t`` come from one multiply (and one ``Exp``)
    each for all T steps, the T state updates ``h = a_t * h + b_t`` follow, and the outputs ``y_t = C_t . h_t`` of
    the chunk are one batched ``MatMul``.

    The body views its inputs at ``batch`` (a no-op): that makes the batch size an input of the loop, which Inductor
    needs to lower the loop when the size is a symbol (a dynamic batch axis). A size that is an expression of symbols
    (MambaVision's windows: the dynamic batch times the windows per image) cannot be a loop input; for it ``batch``
    is None and the body reads no size, which torch.export and ONNX take (an AOTInductor build does not).
    """

    def step(state: Tensor, inputs: tuple[Tensor, ...]) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        if batch is not None:
            inputs = tuple(x.view(x.shape[0], x.shape[1], batch, *x.shape[3:]) for x in inputs)
        delta_c, delta_u_c, B_c, C_c = inputs
        decays, drives = torch.exp(delta_c * A).split(1), (B_c * delta_u_c).split(1)  # T of (1, K, batch, G, N, dg)
        states = []
        for decay, drive in zip(decays, drives, strict=True):
            state = decay * state + drive
            states.append(state)
        return state, (torch.matmul(C_c, torch.cat(states)), state.squeeze(0).clone())

    return step


def _loop_size(size: int | torch.SymInt) -> int | torch.SymInt | None:
    """``size`` when a loop body may read it (a number, or a single symbol), else None (see :func:`_recurrence_step`)."""
    return size if not isinstance(size, torch.SymInt) or size.node.expr.is_Symbol else None


def _time_chunks(x: Tensor, chunk: int, shape: tuple[int, ...]) -> Tensor:
    """(K, batch, L, ...) -> (Lp / chunk, chunk, K, batch, *shape), zero after step L: the loop runs over axis 0."""
    K, batch, length = x.shape[:3]
    padded = -(-length // chunk) * chunk
    x = x.reshape(K, batch, length, -1)
    if padded != length:
        x = F.pad(x, (0, 0, 0, padded - length))
    return x.reshape(K, batch, padded // chunk, chunk, *shape).permute(2, 3, 0, 1, *range(4, 4 + len(shape))).contiguous()


def _checkpoints(ends: Tensor, final: Tensor, length: int, chunk: int) -> Tensor:
    """The contract's checkpoints from the loop's end state of each chunk of ``chunk`` steps.

    ``ends`` (Lp / chunk, K, batch, G, N, dim // G) and ``final`` (1, K, batch, G, N, dim // G) ->
    (K, batch, num_chunks(L), dim, N): the state after each CHUNK_SIZE steps (``chunk`` divides CHUNK_SIZE), and last
    the final one (padding steps change no state).
    """
    per_checkpoint = CHUNK_SIZE // chunk
    inner = ends[per_checkpoint - 1 : (num_chunks(length) - 1) * per_checkpoint : per_checkpoint]
    states = torch.cat([inner, final])  # (chunks, K, batch, G, N, dim // G)
    return states.permute(1, 2, 0, 3, 5, 4).flatten(3, 4)


def decomposed_scan_forward(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    delta_softplus: bool,
    reverse: bool,
    backend: str = "",
    orders: list[int] | None = None,
    grid: list[int] | None = None,
    *,
    chunk: int = EXPORT_CHUNK,
) -> tuple[Tensor, Tensor]:
    """``vim::selective_scan_fwd`` in standard ops: the same arguments (canonical form, see scan_layout) and outputs.

    Args:
        u, delta: (K, batch, dim, L).
        A: (K, dim, N).
        B, C: (K, batch, G, N, L).
        D, delta_bias: (K, dim) or None.
        z: (batch, dim, L) or None, shared by the K directions.
        delta_softplus: apply softplus to ``delta + delta_bias``.
        reverse: direction ``k`` runs last token first iff ``reverse != (k == 1)`` (without ``orders``), or each of
            ``orders`` reversed.
        backend: ignored (the op's choice of kernel means nothing here).
        orders, grid: each direction's order code over the ``(H, W)`` token grid (see :mod:`vim.kernels.scan_layout`);
            None: rows, directions 0 and 1 (one row of ``L`` tokens).
        chunk: steps per loop iteration, a divisor of CHUNK_SIZE (1: the step-by-step loop).

    Returns:
        ``out`` (K, batch, dim, L) in ``u.dtype`` with channels-last memory, and ``checkpoints``
        (K, batch, num_chunks(L), dim, N) float32: the state after the last step of each chunk of CHUNK_SIZE steps.
    """
    del backend
    if CHUNK_SIZE % chunk:
        raise ValueError(f"chunk={chunk} must divide CHUNK_SIZE={CHUNK_SIZE}")
    K, batch, dim, length = u.shape
    groups, n_state = B.shape[2], B.shape[3]
    chunk = min(chunk, length)
    compute = torch.float64 if u.dtype == torch.float64 else torch.float32
    codes, cells = direction_orders(K, reverse, orders), grid_shape(length, grid)

    def scan_order(x: Tensor) -> Tensor:
        """(K, batch, ..., L) -> (K, batch, L, ...) in the compute dtype, each direction in the order it scans."""
        return _to_steps(x.to(compute).movedim(-1, 2), codes, cells)

    delta = delta.to(compute)
    if delta_bias is not None:
        delta = delta + delta_bias.to(compute)[:, None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)
    delta, u_t = scan_order(delta), scan_order(u)  # (K, batch, L, dim)
    channels = (groups, 1, dim // groups)
    inputs = (
        _time_chunks(delta, chunk, channels),
        _time_chunks(delta * u_t, chunk, channels),
        _time_chunks(scan_order(B), chunk, (groups, n_state, 1)),
        _time_chunks(scan_order(C), chunk, (groups, 1, n_state)),
    )
    A = A.to(compute).reshape(K, 1, groups, dim // groups, n_state).transpose(-1, -2).contiguous()
    initial = A.new_zeros(1, K, batch, groups, n_state, dim // groups)

    final, (y, ends) = scan(_chunk_step(A, _loop_size(batch)), initial, inputs)  # y (Lp / T, T, K, batch, G, 1, dim // G)
    y = y.flatten(0, 1)[:length].movedim(0, 2).reshape(K, batch, length, dim)
    if D is not None:
        y = y + D.to(compute)[:, None, None, :] * u_t
    y = _to_tokens(y, codes, cells)  # back in grid order
    if z is not None:
        y = y * F.silu(z.to(compute).transpose(1, 2))
    return y.to(u.dtype).transpose(-1, -2), _checkpoints(ends, final, length, chunk).float()
