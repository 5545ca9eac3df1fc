"""The canonical form in which every selective-scan backend receives its tensors.

The public functions in :mod:`vim.kernels.selective_scan` turn user input into this form with
views only (no copies), so each backend implements exactly one contract:

``K`` is the number of scan directions in one launch (1, or 2 for a bidirectional block).

========================  ==================================  =====================================
argument                  shape                               notes
========================  ==================================  =====================================
``u``, ``delta``          ``(K, batch, dim, L)``              any strides; fp32, fp16 or bf16
``A``                     ``(K, dim, N)``                     float32
``B``, ``C``              ``(K, batch, G, N, L)``             any strides; ``dim % G == 0``
``D``, ``delta_bias``     ``(K, dim)`` or ``None``            float32
``z``                     ``(batch, dim, L)`` or ``None``     shared by the K directions
========================  ==================================  =====================================

Direction ``k`` runs in reverse (last token first) iff ``reverse != (k == 1)``. Logical step
``s`` of a direction reads time index ``t = s`` (forward) or ``t = L - 1 - s`` (reverse).

``forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse)`` returns

* ``out``: ``(K, batch, dim, L)`` in ``u.dtype``, channels-last memory (``stride(-2) == 1``);
* ``checkpoints``: ``(K, batch, num_chunks(L), dim, N)`` float32, contiguous: the state after the
  last logical step of each chunk of :data:`CHUNK_SIZE` steps. ``checkpoints[:, :, -1]`` is the
  final state.

``backward(dout, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, checkpoints)``
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
