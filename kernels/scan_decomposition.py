"""The selective scan in standard operations, for exporters: ONNX, and AOTInductor packages that run without vim.

The ``vim::selective_scan_fwd`` custom op is opaque to exporters: ONNX has no such operator, and an
AOTInductor package can only call it back through PyTorch's dispatcher, where this package must have
registered it first. :func:`decomposed_scan_forward` computes the op's outputs (the canonical contract
of :mod:`vim.kernels.scan_layout`) with standard operations and PyTorch's ``scan`` higher-order op,
which the ONNX exporter turns into one ONNX ``Scan`` node. It is a drop-in decomposition::

    table = torch.export.default_decompositions()
    table[torch.ops.vim.selective_scan_fwd.default] = decomposed_scan_forward
    program = torch.export.export(model, (x,)).run_decompositions(table)   # no vim op left in the graph

The graph: every direction's inputs are put in the loop's order by one transpose (time-major) and one gather of
constant rows (each direction's step order: reversed and column-major directions read their tokens by index, see
:func:`vim.kernels.scan_layout.step_tokens`), padded to a whole number of chunks of ``chunk`` steps (padding steps
have ``delta = 0``: they change no state). One loop then walks the chunks, all directions and batch rows together;
its body (:func:`_chunk_step`) computes the chunk's decays ``exp(delta_t * A)`` and drives ``delta_t u_t B_t`` with
one multiply and one ``Exp`` for the whole chunk, the ``chunk`` state updates ``h = a_t * h + b_t``, and the chunk's
outputs ``C_t . h_t`` as one ``MatMul``, carrying the state to the next chunk. One gather puts the outputs back in
grid order. The state is laid out ``(..., N, channels)``: the channels are the innermost axis of every tensor of the
state's size, so each broadcast multiplies whole rows, which onnxruntime does several times faster than a broadcast of
the innermost axis (in one interleaved run on a two-block Vim-Ti, the step loop with ``(..., channels, N)``
states took 65 ms, the same step loop with channels innermost 34 ms). ``chunk=1`` is the step-by-step loop (one step
per iteration), for runtimes that want the smallest body.

Why these steps and not a closed form of the chunk (cumulative sums of ``delta * A``, ``h_t = P_t (h_0 + sum_s
b_s / P_s)`` with ``P_t = exp(cumsum delta * A)``): the closed form divides by decays that underflow. One step with
``delta * |A| > 88`` (a trained model's "reset" steps do this) makes ``P_s`` zero in float32 and ``b_s / P_s``
infinite, and rebasing the sums at the chunk start does not help within the chunk; the exact alternative, pairwise
segment sums ``exp((S_t - S_s) A)``, costs ``chunk`` times the exponentials of the recurrence. The unrolled steps do
the recurrence's own arithmetic, so they stay exact for any decay (tests: 16384 steps in float32 with steps of
``delta * A`` near -500, against the float64 reference). Nor the chunked scan of :mod:`vim.kernels.scan_cpu` unrolled
into a graph: its passes over ``(L, dim, N)`` buffers leave the cache (on a two-block Vim-Ti, 72 ms against this
loop's 23 ms then).

Chunk length, measured on a two-block Vim-Ti at 224 px, onnxruntime 1.32, CPU, one thread (Intel Xeon, 2 cores
shared with other jobs; one interleaved run each, medians): chunks of 1, 8 and 16 steps 17.8, 16.8 and 17.0 ms (the
former step loop 25.2 ms, eager PyTorch 7.0 ms); in a busier run 1, 4, 8, 16 and 32 steps took 33.5, 23.9, 23.4, 26.2
and 43.7 ms (at 32 steps a chunk's decays, 1.5 MB, probably no longer stay in the cache). So ``EXPORT_CHUNK`` is
8. AOTInductor lowers the same loop to a ``while_loop`` in C++. PyTorch's ``scan`` is a prototype feature
(``torch._higher_order_ops``); run eagerly it is a Python loop over the chunks, slow but exact, which is what the
tests compare with the sequential reference.

The checkpoints output (the state after every chunk of ``CHUNK_SIZE`` steps, the final state last) comes from a
second loop with the same body that gives each chunk's end state instead of its outputs (every ``CHUNK_SIZE /
chunk``-th is a checkpoint). Inference graphs never read it, so exporters drop it as dead code (given by the first
loop, the end states cost Vim-Ti at 224 px 6 ms of copies in onnxruntime); it is there so that the decomposition
keeps the op's whole contract.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._higher_order_ops.scan import scan

from .scan_layout import CHUNK_SIZE, direction_orders, grid_shape, num_chunks, step_tokens

__all__ = ["EXPORT_CHUNK", "decomposed_scan_forward"]

Step = Callable[[Tensor, tuple[Tensor, ...]], tuple[Tensor, Tensor]]

EXPORT_CHUNK = 8
"""Steps per iteration of the exported loop (measured on Vim-Ti, see the module docstring)."""


def _loop_rows(codes: tuple[int, ...], grid: tuple[int, int], padded: int) -> Tensor:
    """The row of a (K * L, ...) direction-major, grid-ordered tensor that the loop reads at each (step, direction).

    Returns (padded * K,) int64 ordered step-major: entry ``s * K + k`` is ``k * L + t``, ``t`` the token direction
    ``k`` reads at step ``s`` (:func:`step_tokens`); steps past L read token 0 (their delta is zeroed).
    """
    length = grid[0] * grid[1]
    tokens = torch.stack([step_tokens(code, grid) for code in codes])  # (K, L)
    tokens = F.pad(tokens, (0, padded - length))
    return (tokens + torch.arange(len(codes))[:, None] * length).t().flatten()


def _token_rows(codes: tuple[int, ...], grid: tuple[int, int]) -> Tensor:
    """The inverse of :func:`_loop_rows`: (K * L,) the row of the loop's step-major output holding each (direction,
    token), direction-major."""
    steps = torch.stack([torch.argsort(step_tokens(code, grid)) for code in codes])  # (K, L): the step reading token t
    return (steps * len(codes) + torch.arange(len(codes))[:, None]).flatten()


def _to_loop(x: Tensor, rows: Tensor, chunk: int, shape: tuple[int, ...]) -> Tensor:
    """(K, batch, L, ...) in grid order -> (Lp / chunk, chunk, K, batch, *shape), each direction in its step order.

    One transpose to time-major and one gather of ``rows`` (:func:`_loop_rows`), whatever the directions.
    """
    K, batch = x.shape[:2]
    rows_of_x = x.transpose(1, 2).reshape(-1, batch, *shape)  # (K * L, batch, *shape)
    return rows_of_x.index_select(0, rows).view(-1, chunk, K, batch, *shape)


def _chunk_step(A: Tensor, batch: int | torch.SymInt | None, end_states: bool = False) -> Step:
    """The loop body: ``(h, (delta_c, delta_u_c, B_c, C_c)) -> (h', y_c)``, or ``(h', h')`` with ``end_states``: a
    whole chunk of T steps.

    Shapes: ``h`` (1, K, batch, G, N, dim // G); ``A`` (K, 1, G, N, dim // G), broadcast over the batch; per chunk,
    ``delta_c`` and ``delta_u_c`` (T, K, batch, G, 1, dim // G), ``B_c`` (T, K, batch, G, N, 1), ``C_c``
    (T, K, batch, G, 1, N); ``y_c`` (T, K, batch, G, 1, dim // G); the end state ``h'`` also without its leading
    axis. Channels are the innermost axis of every tensor of the state's size, so each broadcast multiplies whole
    rows (onnxruntime's fast broadcasting path).

    The chunk's decays ``exp(delta_t * A)`` and drives ``delta_t u_t B_t`` come from one multiply (and one ``Exp``)
    each for all T steps, the T state updates ``h = a_t * h + b_t`` follow, and the outputs ``y_t = C_t . h_t`` of
    the chunk are one batched ``MatMul``.

    The body views its inputs at ``batch`` (a no-op): that makes the batch size an input of the loop, which Inductor
    needs to lower the loop when the size is a symbol (a dynamic batch axis). A size that is an expression of symbols
    (MambaVision's windows: the dynamic batch times the windows per image) cannot be a loop input; for it ``batch``
    is None and the body reads no size, which torch.export and ONNX take (an AOTInductor build does not).
    """

    def step(state: Tensor, inputs: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        if batch is not None:
            inputs = tuple(x.view(x.shape[0], x.shape[1], batch, *x.shape[3:]) for x in inputs)
        delta_c, delta_u_c, B_c, C_c = inputs
        decays, drives = torch.exp(delta_c * A).split(1), (B_c * delta_u_c).split(1)  # T of (1, K, batch, G, N, dg)
        states = []
        for decay, drive in zip(decays, drives, strict=True):
            state = decay * state + drive
            states.append(state)
        return state, state.squeeze(0).clone() if end_states else torch.matmul(C_c, torch.cat(states))

    return step


def _loop_size(size: int | torch.SymInt) -> int | torch.SymInt | None:
    """``size`` when a loop body may read it (a number, or a single symbol), else None (see :func:`_chunk_step`)."""
    return size if not isinstance(size, torch.SymInt) or size.node.expr.is_Symbol else None


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
    padded = -(-length // chunk) * chunk
    rows = _loop_rows(codes, cells, padded).to(u.device)

    delta = delta.to(compute)
    if delta_bias is not None:
        delta = delta + delta_bias.to(compute)[:, None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)
    channels = (groups, 1, dim // groups)
    delta_c = _to_loop(delta.transpose(-1, -2), rows, chunk, channels)  # (Lp / T, T, K, batch, G, 1, dim // G)
    if padded != length:
        delta_c = delta_c * (torch.arange(padded, device=u.device) < length).to(compute).view(-1, chunk, 1, 1, 1, 1, 1)
    inputs = (
        delta_c,
        delta_c * _to_loop(u.to(compute).transpose(-1, -2), rows, chunk, channels),
        _to_loop(B.to(compute).movedim(-1, 2), rows, chunk, (groups, n_state, 1)),
        _to_loop(C.to(compute).movedim(-1, 2), rows, chunk, (groups, 1, n_state)),
    )
    A = A.to(compute).reshape(K, 1, groups, dim // groups, n_state).transpose(-1, -2).contiguous()
    initial = A.new_zeros(1, K, batch, groups, n_state, dim // groups)

    _, y = scan(_chunk_step(A, _loop_size(batch)), initial, inputs)  # (Lp / T, T, K, batch, G, 1, dim // G)
    y = y.reshape(padded * K, batch, dim).index_select(0, _token_rows(codes, cells).to(u.device))
    y = y.view(K, length, batch, dim).transpose(1, 2)  # (K, batch, L, dim) in grid order
    if D is not None:
        y = y + D.to(compute)[:, None, None, :] * u.to(compute).transpose(-1, -2)
    if z is not None:
        y = y * F.silu(z.to(compute).transpose(1, 2))

    final, ends = scan(_chunk_step(A, _loop_size(batch), end_states=True), initial, inputs)  # dead code in inference
    return y.to(u.dtype).transpose(-1, -2), _checkpoints(ends, final, length, chunk).float()
