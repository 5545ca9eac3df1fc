"""One residual Mamba block in the Add -> RMSNorm -> Mixer arrangement of Vision Mamba.

API::

    block = MambaBlock(dim, drop_path=0.1, divide_out=True)
    hidden, residual = block(hidden, residual)   # (B, L, D) each; residual None for the first block

The block first adds the previous block's mixer output to the residual stream (through
stochastic depth), keeps that stream in float32, then mixes the RMS-normalised stream:
``residual = residual + drop_path(hidden)``; ``hidden = mixer(norm(residual))``.
Parameter names (``norm.weight``, ``mixer.*``) follow the official checkpoints.
"""

from __future__ import annotations

import torch
from timm.layers import DropPath
from torch import nn

from .mixer import BiMambaMixer

__all__ = ["MambaBlock"]


class MambaBlock(nn.Module):
    """Residual block around a :class:`BiMambaMixer`.

    Args:
        dim: token width D.
        drop_path: stochastic-depth rate applied to the incoming mixer output.
        norm_eps: RMSNorm epsilon.
        mixer_kwargs: forwarded to :class:`BiMambaMixer` (d_state, expand, divide_out, ...).
    """

    def __init__(self, dim: int, drop_path: float = 0.0, norm_eps: float = 1e-5, device=None, dtype=None, **mixer_kwargs):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.norm = nn.RMSNorm(dim, eps=norm_eps, **dd)
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
