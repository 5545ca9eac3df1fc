"""One residual Mamba block in the Add -> Norm -> Mixer arrangement of Vision Mamba.

API::

    block = MambaBlock(dim, drop_path=0.1, divide_out=True)                 # RMSNorm, two directions (Vim)
    block = MambaBlock(dim, norm_layer="layernorm", directions=1)           # LayerNorm, one direction (PointMamba)
    hidden, residual = block(hidden, residual)   # (B, L, D) each; residual None for the first block

The block first adds the previous block's mixer output to the residual stream (through
stochastic depth), keeps that stream in float32, then mixes the normalised stream:
``residual = residual + drop_path(hidden)``; ``hidden = mixer(norm(residual))``. A chain of these
blocks computes the pre-norm residual ``x + mixer(norm(x))`` of each block, as PointMamba writes it:
the addition is only deferred to the next block (or the trunk's final norm).
Parameter names (``norm.weight``, ``norm.bias`` for LayerNorm, ``mixer.*``) follow the official checkpoints.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from timm.layers import DropPath
from torch import nn

from .mixer import BiMambaMixer

__all__ = ["NORM_LAYERS", "MambaBlock", "NormLayer", "create_norm"]

NormLayer = Literal["rmsnorm", "layernorm"]
NORM_LAYERS: tuple[str, ...] = get_args(NormLayer)


def create_norm(norm_layer: str, dim: int, eps: float = 1e-5, device=None, dtype=None) -> nn.RMSNorm | nn.LayerNorm:
    """The trunk's normalisation: "rmsnorm" (Vim, VideoMamba) or "layernorm" (PointMamba), over the last axis D."""
    if norm_layer == "rmsnorm":
        return nn.RMSNorm(dim, eps=eps, device=device, dtype=dtype)
    if norm_layer == "layernorm":
        return nn.LayerNorm(dim, eps=eps, device=device, dtype=dtype)
    raise ValueError(f"norm_layer must be one of {NORM_LAYERS}, got {norm_layer!r}")


class MambaBlock(nn.Module):
    """Residual block around a :class:`BiMambaMixer`.

    Args:
        dim: token width D.
        drop_path: stochastic-depth rate applied to the incoming mixer output.
        norm_layer: "rmsnorm" or "layernorm".
        norm_eps: the norm's epsilon.
        mixer_kwargs: forwarded to :class:`BiMambaMixer` (d_state, expand, directions, divide_out, ...).
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
        self.mixer = BiMambaMixer(dim, **mixer_kwargs, **dd)
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
        residual = hidden_states if residual is None else residual + self.drop_path(hidden_states)
        residual = residual.float()
        hidden_states = self.mixer(self.norm(residual.to(self.norm.weight.dtype)))
        return hidden_states, residual
