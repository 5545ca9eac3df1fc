"""The canonical form in which every selective-scan backend receives its tensors.

The public functions in :mod:`vim.kernels.selective_scan` turn user input into this form with
views only (no copies), so each backend implements exactly one contract:

``K`` is the number of scan directions in one launch (1, 2 for a bidirectional block, 4 for the
cross scan of a 2-D grid; at most :data:`MAX_DIRECTIONS`).

========================  ==================================  =====================================
argument                  shape                               notes
========================  ==================================  =====================================
``u``, ``delta``          ``(K, batch, dim, L)``              any strides (a stride-0 ``K`` axis
                                                              shares one ``u``); fp32, fp16 or bf16
``A``                     ``(K, dim, N)``                     float32
``B``, ``C``              ``(K, batch, G, N, L)``             any strides; ``dim % G == 0``
``D``, ``delta_bias``     ``(K, dim)`` or ``None``            float32
``z``                     ``(batch, dim, L)`` or ``None``     shared by the K directions
``orders``                ``K`` order codes or ``None``       default ``(0, 2)[:K]``
``grid``                  ``(H, W)`` with ``H * W == L``      or ``None``: ``(1, L)``
========================  ==================================  =====================================

Every per-token tensor (u, delta, B, C, z, out and the gradients) is indexed by token ``t`` in grid
order (row-major over ``(H, W)``). Direction ``k`` walks the tokens in the order ``orders[k]``, with
``reverse`` swapping forward and reversed (code ``^ 2``); its logical step ``s`` reads token

* ``0`` (:data:`ROW`): ``t = s``;
* ``1`` (:data:`COLUMN`): column-major, step ``s = w * H + h`` reads ``t = h * W + w``;
* ``2`` (:data:`ROW_REVERSED`): step ``s`` reads token ``L - 1 - s`` of order 0;
* ``3`` (:data:`COLUMN_REVERSED`): step ``s`` reads token ``L - 1 - s`` of order 1.

So today's contract is the special case ``orders=None, grid=None``: direction ``k`` runs in reverse
(last token first) iff ``reverse != (k == 1)``. The four codes in order are VMamba's cross scan.
Backends read the steps through index arithmetic: nothing is copied into a cross-scanned tensor
(the chunked path excepted, see :mod:`vim.kernels.scan_cpu`).

``forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, orders=None, grid=None)`` returns

* ``out``: ``(K, batch, dim, L)`` in ``u.dtype``, channels-last memory (``stride(-2) == 1``), each
  direction's output at its tokens' own positions (grid order);
* ``checkpoints``: ``(K, batch, num_chunks(L), dim, N)`` float32, contiguous: the state after the
  last logical step of each chunk of :data:`CHUNK_SIZE` steps. ``checkpoints[:, :, -1]`` is the
  final state.

``backward(dout, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, checkpoints, orders=None, grid=None)``
returns ``(du, ddelta, dA, dB, dC, dD, dz, ddelta_bias)`` with

* ``du``, ``ddelta``: ``(K, batch, dim, L)``, dtype of ``u``/``delta``, channels-last memory;
* ``dA``: ``(K, dim, N)`` float32; ``dB``, ``dC``: ``(K, batch, G, N, L)`` contiguous, dtype of B/C;
* ``dD``, ``ddelta_bias``: ``(K, dim)`` float32, or an empty tensor when the input was ``None``;
* ``dz``: ``(batch, dim, L)`` channels-last, summed over directions, or empty when ``z`` is None.
"""

from __future__ import annotations

import torch

CHUNK_SIZE = 64
"""Steps between two saved states: the backward pass recomputes the states inside a chunk."""

MAX_STATE = 64
"""Largest state size N the kernels support."""

MAX_DIRECTIONS = 4
"""Most directions one launch scans (the four of a 2-D cross scan)."""

ROW, COLUMN, ROW_REVERSED, COLUMN_REVERSED = 0, 1, 2, 3
"""Order codes of a direction (see the module docstring); ``code ^ ROW_REVERSED`` reverses one."""

CROSS_SCAN_ORDERS = (ROW, COLUMN, ROW_REVERSED, COLUMN_REVERSED)
"""VMamba's four directions: row by row, column by column, and both of those reversed."""


def direction_orders(directions: int, reverse: bool, orders=None) -> tuple[int, ...]:
    """The order code of each of ``directions`` directions: ``orders`` (default ``(ROW, ROW_REVERSED)[:K]``),
    each reversed if ``reverse``."""
    codes = (ROW, ROW_REVERSED)[:directions] if orders is None else tuple(int(code) for code in orders)
    return tuple(code ^ ROW_REVERSED if reverse else code for code in codes)


def grid_shape(length: int, grid=None) -> tuple[int, int]:
    """``(H, W)`` of a grid of ``length`` tokens: ``grid``, or one row ``(1, L)`` when None."""
    return (1, length) if grid is None else (int(grid[0]), int(grid[1]))


def step_tokens(order: int, grid: tuple[int, int], device: torch.device | str = "cpu") -> torch.Tensor:
    """The token each logical step of a direction reads: (L,) int64, ``t = step_tokens(order, grid)[s]``.

    The definition of the order codes by index arithmetic on an ``(H, W)`` grid of token indices.
    """
    height, width = grid
    tokens = torch.arange(height * width, device=device).view(height, width)
    steps = (tokens.t() if order & COLUMN else tokens).flatten()
    return steps.flip(0) if order & ROW_REVERSED else steps


def num_chunks(length: int) -> int:
    """Number of checkpointed chunks for a sequence of ``length`` steps."""
    return -(-length // CHUNK_SIZE)


def empty_checkpoints(like: torch.Tensor, directions: int, batch: int, length: int, dim: int, n_state: int) -> torch.Tensor:
    """An empty ``checkpoints`` buffer of the contract: (K, batch, num_chunks(L), dim, N) float32 on ``like``'s device."""
    return like.new_empty(directions, batch, num_chunks(length), dim, n_state, dtype=torch.float32)


def empty_channels_last(*shape: int, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An empty tensor of ``shape`` (..., dim, L) whose memory is laid out as (..., L, dim)."""
    *lead, dim, length = shape
    out = torch.empty(*lead, length, dim, device=like.device, dtype=dtype or like.dtype)
    return out.transpose(-1, -2)


def as_channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` (..., dim, L) unchanged if its memory is already channels-last and dense, else a copy."""
    if x.stride(-2) == 1 and x.transpose(-1, -2).is_contiguous():
        return x
    return x.transpose(-1, -2).contiguous().transpose(-1, -2)
