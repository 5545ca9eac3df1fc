"""The flat residual Mamba trunk (one token grid, one block after another) that the image, video and point-cloud
backbones share.

API (a base class; a modality's backbone subclasses it and adds its own tokenizer and head)::

    class MyBackbone(MambaBackbone):
        pool_types = ("token", "avg", "")                                         # the default; "max" also works
        stem_no_weight_decay = ("pos_embed", "cls_token")                         # no_weight_decay()
        stem_pattern = r"^cls_token|^pos_embed|^patch_embed"                      # group_matcher's stem
        modality = "images"                                                       # its data, and the exported input's name
        input_kind = "images"                                                     # named in input-shape errors

        def __init__(self, ..., device=None, dtype=None):
            super().__init__()
            self.init_head_attributes(num_classes, global_pool, embed_dim)        # checks global_pool
            ...  # tokenizer
            self.build_trunk(embed_dim, depth, drop_path_rate=0.1, divide_out=True, device=device, dtype=dtype)
            self.head_drop = nn.Dropout(drop_rate)
            self.head = self.linear_head(num_classes, device=device, dtype=dtype)  # or override _reset_head
            self.feature_info = self.describe_features([embed_dim] * depth, [patch_stride] * depth)
            self.init_trunk_weights()

        def class_token_index(self, num_tokens):                                  # for global_pool="token"
            return 0

        def input_axes(self):                                                     # the input's shape, checked on entry
            return ("B", (self.in_chans, "channels"), "H", "W")

        def nominal_input_shape(self):                                            # one sample at the nominal size
            return (self.in_chans, *self.patch_embed.img_size)                    # what export traces with

        def _embed(self, x):                                                      # (B, L, D) tokens; forward_features
            ...                                                                   # runs the trunk on them

        def token_grid(self, x):                                                  # for forward_intermediates
            return self.patch_embed.dynamic_feat_size(x.shape[-2:])               # (H', W'); None: no grid

The trunk owns ``layers`` (a ModuleList of :class:`~vim.models.block.MambaBlock`, a :class:`MambaMixer` in each unless
``layer_mixers`` places another mixer at given indices, optionally an MLP in each), ``norm_f`` (the final RMSNorm or
LayerNorm) and ``drop_path`` (the full-rate stochastic depth before ``norm_f``), all at the backbone's top level so
official checkpoints map 1:1 (``layers.{i}.mixer.*``, ``norm_f.weight``). It provides the drop-path schedule; the input
contract, timm's model API (block i's output is intermediate i, every block at the patch stride) and the weight loading
come from :class:`~vim.models.timm_api.TimmBackbone`, which a hierarchical trunk
(:class:`~vim.models.hierarchical.HierarchicalBackbone`) shares.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from functools import partial
from typing import cast

import torch
from timm.layers import DropPath
from torch import nn

from .block import MambaBlock, NormLayer, PartFactory, TrunkBlock, norm_factory
from .mixer import MambaMixer
from .timm_api import TimmBackbone

__all__ = ["MambaBackbone", "drop_path_schedule", "layer_mixer_factories"]


def drop_path_schedule(drop_path_rate: float, depth: int) -> list[float]:
    """Stochastic-depth rate of each block: ``([0] + linspace(0, rate, depth))[i]``, as in Vim.

    Block ``i`` applies its rate to the output of block ``i - 1``; the final norm uses the full rate.
    """
    return [0.0, *torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()][:depth]


def layer_mixer_factories(
    depth: int, mixer_cls: PartFactory, layer_mixers: Mapping[int, PartFactory] | None = None
) -> list[PartFactory]:
    """The mixer factory of each of ``depth`` blocks: ``mixer_cls``, or ``layer_mixers[i]`` at block ``i``.

    ValueError naming the indices of ``layer_mixers`` that are not blocks 0..depth - 1.
    """
    layer_mixers = layer_mixers or {}
    wrong = sorted(i for i in layer_mixers if not 0 <= i < depth)
    if wrong:
        raise ValueError(f"layer_mixers names blocks {wrong}, but the trunk has blocks 0..{depth - 1}")
    return [layer_mixers.get(i, mixer_cls) for i in range(depth)]


class MambaBackbone(TimmBackbone):
    """Base class of the flat trunk's backbones: the trunk here, the model API from :class:`TimmBackbone`; see the
    module docstring."""

    intermediate_container = "layers"
    block_groups = ((r"^layers\.(\d+)", None),)
    layers: nn.ModuleList

    def build_trunk(
        self,
        embed_dim: int,
        depth: int,
        drop_path_rate: float = 0.0,
        norm_layer: NormLayer = "rmsnorm",
        norm_eps: float = 1e-5,
        kernel_backend: str | None = None,
        mlp_cls: PartFactory | None = None,
        layer_mixers: Mapping[int, PartFactory] | None = None,
        device=None,
        dtype=None,
        **mixer_kwargs,
    ) -> None:
        """Create ``layers``, ``norm_f`` and ``drop_path``.

        Args:
            embed_dim: token width D.
            depth: number of blocks.
            drop_path_rate: stochastic-depth rate of the last block and of the final norm.
            norm_layer: "rmsnorm" (Vim, VideoMamba) or "layernorm" (PointMamba), in every block and ``norm_f``.
            norm_eps: the norms' epsilon.
            kernel_backend: backend of every kernel (scan, conv + SiLU, add + norm), None for ``$VIM_SCAN_BACKEND`` or "auto".
            mlp_cls: an MLP's factory for every block (see :class:`MambaBlock`), None for blocks without one.
            layer_mixers: another mixer's factory at given block indices (mamba_ssm's ``attn_layer_idx``), e.g.
                ``{1: partial(timm.layers.Attention, num_heads=2)}``: block 1 mixes by self-attention.
            mixer_kwargs: forwarded to every other block's :class:`MambaMixer` (d_state, expand, directions, divide_out, ...).
        """
        dd = {"device": device, "dtype": dtype}
        self.depth = depth
        self.kernel_backend = kernel_backend
        norm_cls = norm_factory(norm_layer, norm_eps)
        mixers = layer_mixer_factories(depth, partial(MambaMixer, kernel_backend=kernel_backend, **mixer_kwargs), layer_mixers)
        self.layers = nn.ModuleList(
            MambaBlock(embed_dim, mixer_cls, mlp_cls, norm_cls, drop_path=rate, kernel_backend=kernel_backend, **dd)
            for mixer_cls, rate in zip(mixers, drop_path_schedule(drop_path_rate, depth))
        )
        self.norm_f = norm_cls(embed_dim, **dd)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0.0 else nn.Identity()
        self.grad_checkpointing = False

    @property
    def blocks(self) -> Sequence[MambaBlock]:
        """``layers`` as what it holds, the blocks (a ModuleList is typed as holding any Module)."""
        return cast("Sequence[MambaBlock]", self.layers)

    def trunk_blocks(self) -> list[TrunkBlock]:
        """``layers``, every block."""
        return list(self.blocks)

    def forward_trunk_intermediates(
        self, x: torch.Tensor, grid: tuple[int, ...] | None = None, taken: Collection[int] = (), stop: int | None = None,
        norm: bool = False,
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, tuple[int, ...] | None]]]:  # fmt: skip
        """Run the blocks (those before ``stop``) and the final norm, collecting the residual stream after the blocks
        ``taken``.

        Args:
            x: (B, L, D) embedded tokens.
            grid: the grid of the non-class tokens, passed on with each intermediate (every block keeps it).
            taken: block indices whose residual stream to collect.
            stop: run the blocks before this index only (None: all).
            norm: pass each intermediate through ``norm_f``.

        Returns:
            The normalised tokens after the last block run (B, L, D), and (B, L, D) tokens with ``grid`` per taken block.
        """
        hidden, residual = x, None
        intermediates = []
        for i, layer in enumerate(self.blocks):
            if i == stop:
                break
            hidden, residual = self._run_block(layer, hidden, residual)
            if i in taken:
                stream = self._norm_f(hidden, residual) if norm else (residual + hidden).to(hidden.dtype)
                intermediates.append((stream, grid))
        return self._final_norm(hidden, residual), intermediates
