"""Residual add + RMSNorm / LayerNorm in PyTorch ops: the definition the fused kernels are tested against, and what runs
on CPU, for float64 and for rows wider than :data:`MAX_DIM` (:mod:`vim.kernels.add_norm` dispatches).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

MAX_DIM = 2048
"""Widest rows the Triton kernels take: a row is held in one tile, and wider ones would spill registers."""

__all__ = ["MAX_DIM", "NORMS", "add_norm_ref"]

NORMS = ("rms", "layer")


def add_norm_ref(
    hidden: Tensor,
    residual: Tensor | None,
    weight: Tensor,
    bias: Tensor | None = None,
    eps: float | None = 1e-5,
    norm: str = "rms",
) -> tuple[Tensor, Tensor]:
    """The definition in PyTorch ops: (normed in ``weight.dtype``, residual_out float32), both (B, L, D).

    ``residual_out = (hidden if residual is None else residual + hidden).float()``, then ``normed`` is
    ``torch.nn.RMSNorm`` (plus ``bias`` if given) or ``F.layer_norm`` of ``residual_out.to(weight.dtype)``.
    """
    residual_out = (hidden if residual is None else residual + hidden).float()
    x = residual_out.to(weight.dtype)
    if norm == "rms":
        normed = F.rms_norm(x, weight.shape, weight, eps)
        normed = normed if bias is None else normed + bias
    elif eps is None:
        raise ValueError("add_norm_ref: eps=None (the default of torch.nn.RMSNorm) is for norm='rms'; LayerNorm needs a number")
    else:
        normed = F.layer_norm(x, weight.shape, weight, bias, eps)
    return normed, residual_out
