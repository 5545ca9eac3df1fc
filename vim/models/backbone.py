"""The residual Mamba trunk shared by the image, video and point-cloud backbones.

API (a base class; a modality's backbone subclasses it and adds its own tokenizer and head)::

    class MyBackbone(MambaBackbone):
        def __init__(self, ..., device=None, dtype=None):
            super().__init__()
            ...  # tokenizer
            self.build_trunk(embed_dim, depth, drop_path_rate=0.1, divide_out=True, device=device, dtype=dtype)
            self.init_trunk_weights()

        def forward_features(self, x):
            return self.forward_trunk(tokens)                                    # (B, L, D) normalised

    final, inter = self.forward_trunk_intermediates(tokens, take_indices, norm=True)

The trunk owns ``layers`` (a ModuleList of :class:`MambaBlock`), ``norm_f`` (the final
RMSNorm) and ``drop_path`` (the full-rate stochastic depth before ``norm_f``), all at the
backbone's top level so official checkpoints map 1:1 (``layers.{i}.mixer.*``, ``norm_f.weight``).
It also provides the drop-path schedule, gradient checkpointing, weight init, pruning and the
trunk's part of ``no_weight_decay`` / ``group_matcher``.
"""

from __future__ import annotations

import math

import torch
from timm.layers import DropPath
from torch import nn
from torch.utils.checkpoint import checkpoint

from .block import MambaBlock

__all__ = ["MambaBackbone", "drop_path_schedule"]

NO_WEIGHT_DECAY_MIXER_PARAMS = ("A_log", "A_b_log", "D", "D_b")


def drop_path_schedule(drop_path_rate: float, depth: int) -> list[float]:
    """Stochastic-depth rate of each block: ``([0] + linspace(0, rate, depth))[i]``, as in Vim.

    Block ``i`` applies its rate to the output of block ``i - 1``; the final norm uses the full rate.
    """
    return ([0.0] + torch.linspace(0, drop_path_rate, depth, device="cpu").tolist())[:depth]


class MambaBackbone(nn.Module):
    """Base class holding the residual Mamba trunk; see the module docstring."""

    layers: nn.ModuleList
    norm_f: nn.RMSNorm
    drop_path: nn.Module
    grad_checkpointing: bool

    def build_trunk(
        self,
        embed_dim: int,
        depth: int,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-5,
        device=None,
        dtype=None,
        **mixer_kwargs,
    ) -> None:
        """Create ``layers``, ``norm_f`` and ``drop_path``.

        Args:
            embed_dim: token width D.
            depth: number of blocks.
            drop_path_rate: stochastic-depth rate of the last block and of the final norm.
            norm_eps: RMSNorm epsilon.
            mixer_kwargs: forwarded to every :class:`BiMambaMixer` (d_state, expand, divide_out, ...).
        """
        dd = {"device": device, "dtype": dtype}
        self.depth = depth
        self.layers = nn.ModuleList(
            MambaBlock(embed_dim, drop_path=rate, norm_eps=norm_eps, **mixer_kwargs, **dd)
            for rate in drop_path_schedule(drop_path_rate, depth)
        )
        self.norm_f = nn.RMSNorm(embed_dim, eps=norm_eps, **dd)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0.0 else nn.Identity()
        self.grad_checkpointing = False

    @torch.no_grad()
    def init_trunk_weights(self) -> None:
        """Mamba's init of every block, ``out_proj`` rescaled by ``1 / sqrt(depth)`` (GPT-2 scheme)."""
        for layer in self.layers:
            layer.norm.reset_parameters()
            layer.mixer.reset_parameters()  # out_proj: kaiming-uniform(a=sqrt(5)), PyTorch's Linear default
            layer.mixer.out_proj.weight.div_(math.sqrt(self.depth))
        self.norm_f.reset_parameters()

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of storing them."""
        self.grad_checkpointing = enable

    def trunk_no_weight_decay(self) -> set[str]:
        """Names of the trunk parameters that take no weight decay (the SSM's A and D)."""
        return {f"layers.{i}.mixer.{name}" for i in range(len(self.layers)) for name in NO_WEIGHT_DECAY_MIXER_PARAMS}

    def trunk_group_matcher(self) -> list[tuple[str, tuple[int, ...] | None]]:
        """Parameter groups for layer-wise learning-rate decay: one per block, ``norm_f`` last."""
        return [(r"^layers\.(\d+)", None), (r"^norm_f", (99999,))]

    def prune_trunk(self, max_index: int) -> None:
        """Drop the blocks after ``max_index``."""
        self.layers = self.layers[: max_index + 1]

    def _run_block(
        self, layer: MambaBlock, hidden: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            return checkpoint(layer, hidden, residual, use_reentrant=False)
        return layer(hidden, residual)

    def _norm_f(self, stream: torch.Tensor) -> torch.Tensor:
        """``norm_f`` of the float32 residual stream, computed in the norm's dtype."""
        weight = getattr(self.norm_f, "weight", None)  # None once pruned to nn.Identity
        return self.norm_f(stream if weight is None else stream.to(weight.dtype))

    def _final_norm(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``norm_f(residual + drop_path(hidden))``."""
        return self._norm_f(residual + self.drop_path(hidden))

    def forward_trunk(self, x: torch.Tensor) -> torch.Tensor:
        """Run every block and the final norm.

        Args:
            x: (B, L, D) embedded tokens.

        Returns:
            (B, L, D) normalised tokens.
        """
        hidden, residual = x, None
        for layer in self.layers:
            hidden, residual = self._run_block(layer, hidden, residual)
        return self._final_norm(hidden, residual)

    def forward_trunk_intermediates(
        self,
        x: torch.Tensor,
        take_indices: list[int],
        norm: bool = False,
        stop_early: bool = False,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run the blocks, collecting the residual stream after the blocks in ``take_indices``.

        Args:
            x: (B, L, D) embedded tokens.
            take_indices: absolute block indices whose output to return.
            norm: pass each intermediate through ``norm_f``.
            stop_early: stop after the last block in ``take_indices``.

        Returns:
            The normalised tokens after the last block run (B, L, D), and one (B, L, D) tensor per
            taken block, in block order.
        """
        num_blocks = max(take_indices) + 1 if stop_early else len(self.layers)
        hidden, residual = x, None
        intermediates = []
        for i, layer in enumerate(self.layers[:num_blocks]):
            hidden, residual = self._run_block(layer, hidden, residual)
            if i in take_indices:
                stream = residual + hidden
                intermediates.append(self._norm_f(stream) if norm else stream.to(hidden.dtype))
        return self._final_norm(hidden, residual), intermediates
