"""The depthwise causal conv + SiLU of both scan directions in plain PyTorch: the definition the fused kernels match.

Direction 0 is the causal conv of the forward scan; direction 1 is the backward scan's causal conv seen
from the original token order, i.e. an anti-causal conv with the flipped taps, so the backward
direction never needs a reversed copy of the sequence::

    out[0, b, t] = silu(bias[c]   + sum_i weight[c, i]   * x[b, t - (W - 1) + i])
    out[1, b, t] = silu(bias_b[c] + sum_i weight_b[c, i] * x[b, t + (W - 1) - i])

with ``x`` zero outside ``0 <= t < L``. :func:`causal_conv1d_silu_ref` is differentiable by autograd;
:func:`reference_backward` is its backward pass written out (a custom op's implementation runs
without autograd), the "torch" backend's. :func:`split_param_sums` unpacks the gradients of the taps
and biases as both fused kernels (Triton and C) sum them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["MAX_WIDTH", "causal_conv1d_silu_ref", "reference_backward", "split_param_sums"]

MAX_WIDTH = 8
"""Widest conv the fused kernels take (``CONV_MAX_WIDTH`` in scan_native.c)."""


def _conv(x: Tensor, weight: Tensor, bias: Tensor | None, anti_causal: bool) -> Tensor:
    """One direction's depthwise conv before the SiLU: x (B, L, C), weight (C, W) -> (B, L, C)."""
    length, (channels, width) = x.shape[1], weight.shape
    taps = weight.reshape(channels, 1, width)
    padded = F.conv1d(x.transpose(1, 2), taps.flip(-1) if anti_causal else taps, bias, padding=width - 1, groups=channels)
    return (padded[..., width - 1 :] if anti_causal else padded[..., :length]).transpose(1, 2)


def _directions(weight: Tensor, bias: Tensor | None, weight_b: Tensor | None, bias_b: Tensor | None) -> list:
    """(weight, bias, anti-causal) of each direction present."""
    return [(weight, bias, False)] + ([] if weight_b is None else [(weight_b, bias_b, True)])


def _taps(weight: Tensor, dtype: torch.dtype) -> Tensor:
    """(C, W) or (C, 1, W) taps as (C, W) in ``dtype``."""
    return weight.reshape(weight.shape[0], -1).to(dtype)


def causal_conv1d_silu_ref(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, weight_b: Tensor | None = None, bias_b: Tensor | None = None
) -> Tensor:
    """Depthwise causal conv + SiLU of one or both directions, differentiable by autograd.

    Args:
        x: (B, L, C), any strides.
        weight, weight_b: (C, W) or (C, 1, W) as ``nn.Conv1d`` stores them; ``weight_b`` None for one direction.
        bias, bias_b: (C,) or None.

    Returns:
        (K, B, L, C) contiguous in ``x.dtype``, K = 2 with ``weight_b`` else 1. The arithmetic runs in the
        promoted dtype of ``x`` and the weights (float32 for bfloat16 ``x`` and float32 weights).
    """
    compute = torch.promote_types(x.dtype, weight.dtype)
    outputs = [
        F.silu(_conv(x.to(compute), _taps(w, compute), None if b is None else b.to(compute), anti))
        for w, b, anti in _directions(weight, bias, weight_b, bias_b)
    ]
    return torch.stack(outputs).to(x.dtype)


def reference_backward(
    dout: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None, weight_b: Tensor | None, bias_b: Tensor | None
) -> tuple[Tensor | None, ...]:
    """Gradients of :func:`causal_conv1d_silu_ref` for ``dout`` (K, B, L, C): (dx, dweight, dbias, dweight_b, dbias_b).

    With ``dpre = dout * silu'(pre)``: x fed direction 0 through tap i at row ``t + (W-1) - i``, so its
    gradient is the anti-causal conv of ``dpre0`` with the same taps (and the causal conv of ``dpre1``);
    tap i's gradient is ``sum dpre * x`` shifted as in the forward. Each gradient has its input's shape
    and dtype; None where the input is None.
    """
    compute = torch.promote_types(x.dtype, weight.dtype)
    xc = x.to(compute)
    width, length = weight.shape[-1], x.shape[1]
    padded = F.pad(xc, (0, 0, width - 1, width - 1))  # (B, L + 2 (W-1), C): x[t] at row t + W - 1
    dx = torch.zeros_like(xc)
    grads: list[Tensor | None] = [None] * 4
    for k, (w, b, anti) in enumerate(_directions(weight, bias, weight_b, bias_b)):
        taps = _taps(w, compute)
        pre = _conv(xc, taps, None if b is None else b.to(compute), anti)
        sig = torch.sigmoid(pre)
        dpre = dout[k].to(compute) * sig * (1 + pre * (1 - sig))
        dx += _conv(dpre, taps, None, not anti)
        first_rows = [2 * (width - 1) - i if anti else i for i in range(width)]  # where tap i's rows of x start in `padded`
        dw = torch.stack([(dpre * padded[:, s : s + length]).sum((0, 1)) for s in first_rows], dim=-1)
        grads[2 * k] = dw.to(w.dtype).reshape(w.shape)
        grads[2 * k + 1] = None if b is None else dpre.sum((0, 1)).to(b.dtype)
    return (dx.to(x.dtype), *grads)


def split_param_sums(
    sums: Tensor, dx: Tensor, weight: Tensor, bias: Tensor | None, weight_b: Tensor | None, bias_b: Tensor | None
) -> tuple[Tensor | None, ...]:
    """(dx, dweight, dbias, dweight_b, dbias_b) from a fused kernel's summed parameter gradients.

    ``sums`` is (K, W + 1, C) float32: per direction the W taps' gradients, then the bias's. Each gradient
    comes back in its parameter's dtype, taps as (C, W); None where the parameter is None.
    """
    width = weight.shape[-1]
    grads: list[Tensor | None] = [dx]
    for k, (w, b) in enumerate(((weight, bias), (weight_b, bias_b))):  # copies: no gradient may alias another
        grads.append(None if w is None else sums[k, :width].t().clone(memory_format=torch.contiguous_format).to(w.dtype))
        grads.append(None if b is None else sums[k, width].clone().to(b.dtype))
    return tuple(grads)
