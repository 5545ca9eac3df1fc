"""One residual Mamba block in the Add -> Norm -> Mixer arrangement of Vision Mamba.

API::

    block = MambaBlock(dim, drop_path=0.1, divide_out=True)                 # RMSNorm, two directions (Vim)
    block = MambaBlock(dim, norm_layer="layernorm", directions=1)           # LayerNorm, one direction (PointMamba)
    hidden, residual = block(hidden, residual)   # (B, L, D) each; residual None for the first block

The block first adds the previous block's mixer output to the residual stream (through
stochastic depth), keeps that stream in float32, then mixes the normalised stream:
``residual = residual + drop_path(hidden)``; ``hidden = mixer(norm(residual))``. A chain of these
blocks computes the pre-norm residual ``x + mixer(norm(x))`` of each block, as PointMamba writes it:
the addition is only deferred to the next block (or the trunk's final norm). The add and the norm run
as one :func:`vim.kernels.add_norm` (a fused kernel on CUDA, the PyTorch ops on CPU).
Parameter names (``norm.weight``, ``norm.bias`` for LayerNorm, ``mixer.*``) follow the official checkpoints.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from timm.layers import DropPath
from torch import nn

from vim.kernels import add_norm

from .mixer import MambaMixer

__all__ = ["NORM_LAYERS", "MambaBlock", "NormLayer", "add_and_norm", "create_norm"]

# a leaf for torch.fx (timm's feature extraction): its argument checks cannot run on symbolic tensors
torch.fx.wrap("add_norm")

NormLayer = Literal["rmsnorm", "layernorm"]
NORM_LAYERS: tuple[str, ...] = get_args(NormLayer)


def create_norm(norm_layer: str, dim: int, eps: float = 1e-5, device=None, dtype=None) -> nn.RMSNorm | nn.LayerNorm:
    """The trunk's normalisation: "rmsnorm" (Vim, VideoMamba) or "layernorm" (PointMamba), over the last axis D."""
    if norm_layer == "rmsnorm":
        return nn.RMSNorm(dim, eps=eps, device=device, dtype=dtype)
    if norm_layer == "layernorm":
        return nn.LayerNorm(dim, eps=eps, device=device, dtype=dtype)
    raise ValueError(f"norm_layer must be one of {NORM_LAYERS}, got {norm_layer!r}")


def add_and_norm(
    norm: nn.RMSNorm | nn.LayerNorm, hidden: torch.Tensor, residual: torch.Tensor | None, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``norm`` of the float32 stream ``residual + hidden`` (``hidden`` alone for None), in the norm's dtype.

    Args:
        norm: the block's or the trunk's norm (its weight, bias and eps are used; RMSNorm has no bias).
        hidden: (B, L, D) a mixer's output (after stochastic depth) or the embedded tokens.
        residual: (B, L, D) float32 residual stream, or None.
        backend: :func:`vim.kernels.add_norm`'s backend.

    Returns:
        The normalised stream (B, L, D) in ``norm.weight.dtype`` and the float32 stream (B, L, D).
    """
    kind = "rms" if isinstance(norm, nn.RMSNorm) else "layer"
    return add_norm(hidden, residual, norm.weight, getattr(norm, "bias", None), norm.eps, norm=kind, backend=backend)


class MambaBlock(nn.Module):
    """Residual block around a :class:`MambaMixer`.

    Args:
        dim: token width D.
        drop_path: stochastic-depth rate applied to the incoming mixer output.
        norm_layer: "rmsnorm" or "layernorm".
        norm_eps: the norm's epsilon.
        mixer_kwargs: forwarded to :class:`MambaMixer` (d_state, expand, directions, divide_out, ...).
    """

    def __init__(
        self,
        dim: int,
        drop_path: float = 0.0,
        norm_layer: NormLayer = "rmsnorm",
        norm_eps: float = 1e-5,
        device=None,
        dtype=None,
        **mixer_kwargs,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.norm = create_norm(norm_layer, dim, eps=norm_eps, **dd)
        self.mixer = MambaMixer(dim, **mixer_kwargs, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Advance the residual stream by one block.

        Args:
            hidden_states: (B, L, D) the previous block's mixer output, or the embedded tokens for
                the first block.
            residual: (B, L, D) the residual stream, None for the first block.

        Returns:
            This block's mixer output (B, L, D) and the float32 residual stream (B, L, D).
        """
        if residual is not None:
            hidden_states = self.drop_path(hidden_states)
        normed, residual = add_and_norm(self.norm, hidden_states, residual, self.mixer.kernel_backend)
        return self.mixer(normed), residual
