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

__all__ = ["decomposed_scan_forward"]

Step = Callable[[Tensor, tuple[Tensor, ...]], tuple[Tensor, Tensor]]


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


def _recurrence_step(A: Tensor, batch: int | torch.SymInt | None, keep_state: bool) -> Step:
    """The loop body: ``(h, (delta_t, delta_u_t, B_t, C_t)) -> (h', y_t)``, or ``(h', h')`` with ``keep_state``.

    Shapes: ``h`` (K, batch, G, dim // G, N); ``A`` (K, 1, G, dim // G, N), broadcast over the batch; per step,
    ``delta_t`` and ``delta_u_t`` (K, batch, G, dim // G), ``B_t`` and ``C_t`` (K, batch, G, N); ``y_t``
    (K, batch, G, dim // G).

    The body views its inputs at ``batch`` (a no-op): that makes the batch size an input of the loop, which Inductor
    needs to lower the loop when the size is a symbol (a dynamic batch axis). A size that is an expression of symbols
    (MambaVision's windows: the dynamic batch times the windows per image) cannot be a loop input; for it ``batch``
    is None and the body reads no size, which torch.export and ONNX take (an AOTInductor build does not).
    """

    def step(state: Tensor, inputs: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        if batch is not None:
            inputs = tuple(x.view(x.shape[0], batch, *x.shape[2:]) for x in inputs)
        delta_t, delta_u_t, B_t, C_t = inputs
        state = torch.exp(delta_t.unsqueeze(-1) * A) * state + delta_u_t.unsqueeze(-1) * B_t.unsqueeze(-2)
        return state, state.clone() if keep_state else (state * C_t.unsqueeze(-2)).sum(-1)

    return step


def _loop_size(size: int | torch.SymInt) -> int | torch.SymInt | None:
    """``size`` when a loop body may read it (a number, or a single symbol), else None (see :func:`_recurrence_step`)."""
    return size if not isinstance(size, torch.SymInt) or size.node.expr.is_Symbol else None


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

    Returns:
        ``out`` (K, batch, dim, L) in ``u.dtype`` with channels-last memory, and ``checkpoints``
        (K, batch, num_chunks(L), dim, N) float32: the state after the last step of each chunk of CHUNK_SIZE steps.
    """
    del backend
    K, batch, dim, length = u.shape
    groups, n_state = B.shape[2], B.shape[3]
    compute = torch.float64 if u.dtype == torch.float64 else torch.float32
    codes, cells = direction_orders(K, reverse, orders), grid_shape(length, grid)

    def scan_order(x: Tensor) -> Tensor:
        """(K, batch, ..., L) -> (K, batch, L, ...) in the compute dtype, each direction in the order it scans."""
        return _to_steps(x.to(compute).movedim(-1, 2), codes, cells)

    def time_major(x: Tensor, *shape: int) -> Tensor:
        """(K, batch, L, ...) -> (L, K, batch, *shape): the loop runs over axis 0."""
        return x.reshape(K, batch, length, *shape).movedim(2, 0).contiguous()

    delta = delta.to(compute)
    if delta_bias is not None:
        delta = delta + delta_bias.to(compute)[:, None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)
    delta, u_t = scan_order(delta), scan_order(u)  # (K, batch, L, dim)
    grouped = (groups, dim // groups)
    inputs = (
        time_major(delta, *grouped),
        time_major(delta * u_t, *grouped),
        time_major(scan_order(B), groups, n_state),
        time_major(scan_order(C), groups, n_state),
    )
    A = A.to(compute).reshape(K, 1, *grouped, n_state)
    initial = A.new_zeros(K, batch, *grouped, n_state)

    _, y = scan(_recurrence_step(A, _loop_size(batch), keep_state=False), initial, inputs)  # (L, K, batch, G, dim // G)
    y = y.movedim(0, 2).reshape(K, batch, length, dim)
    if D is not None:
        y = y + D.to(compute)[:, None, None, :] * u_t
    y = _to_tokens(y, codes, cells)  # back in grid order
    if z is not None:
        y = y * F.silu(z.to(compute).transpose(1, 2))

    _, states = scan(_recurrence_step(A, _loop_size(batch), keep_state=True), initial, inputs)  # (L, K, batch, G, dim // G, N)
    last_steps = [min((j + 1) * CHUNK_SIZE, length) - 1 for j in range(num_chunks(length))]
    checkpoints = states[last_steps].movedim(0, 2).reshape(K, batch, len(last_steps), dim, n_state)
    return y.to(u.dtype).transpose(-1, -2), checkpoints.float()
