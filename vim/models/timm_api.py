r"""The backbone API every trunk layout shares: the input contract, timm's model API and the weight loading.

API (a base class; a trunk layout subclasses it, a family subclasses the layout and adds its tokenizer and head)::

    class MyTrunk(TimmBackbone):                       # MambaBackbone (flat), HierarchicalBackbone (stages)
        intermediate_container = "layers"             # what forward_intermediates numbers; "stages" for stages
        block_groups = ((r"^layers\.(\d+)", None),)    # group_matcher's blocks before norm_f

        def trunk_blocks(self): ...                   # every block, for the init
        def forward_trunk_intermediates(self, x, grid, taken=(), stop=None, norm=False): ...  # final, [(y, grid)]

A family declares its input contract here, in one place that prediction, extraction and export read: ``modality``
(which data code of :mod:`vim.data.modalities` turns files into its inputs, and the name of an exported graph's input),
``input_kind`` and ``input_axes`` (the layout, checked on entry), ``nominal_input_shape`` and ``set_input_size`` (the
size export traces with, and how to change it), and ``export_refusal`` (why a family cannot be exported, if it cannot).
``forward_features`` and ``forward_intermediates`` first check the input against ``input_axes``
(:func:`check_input_shape`), so an unbatched input or a wrong channel count is named, whatever the family.

timm's model API is implemented once, on top of the layout's ``forward_trunk_intermediates``: an intermediate is the output of
block i of a flat trunk (one token grid, every block at the patch stride) and the output of stage i of a
hierarchical one (a grid per stage, reductions 4 / 8 / 16 / 32), as timm numbers its hierarchical models.
:meth:`~TimmBackbone.forward_intermediates` serves every modality and layout: the class token split off
(``class_token_index``; none when ``num_prefix_tokens`` is 0) and the other tokens reshaped to their grid ("NCHW"
for images, "NCTHW" for clips) or left as "NLC". Also here: ``feature_info`` (:meth:`~TimmBackbone.describe_features`,
for ``features_only``), ``prune_intermediate_layers`` (truncating ``intermediate_container``), ``group_matcher``,
gradient checkpointing of each block (``set_grad_checkpointing``), the blocks' init, the fused final add + norm, the
head attributes (``num_classes``, ``global_pool`` checked against ``pool_types``, ``num_features``,
``head_hidden_size``, ``embed_dim``), ``pool``, ``forward_head``, ``forward``, ``get_classifier``, ``reset_classifier``
(a linear ``head`` with ``head_drop`` unless a subclass overrides ``_reset_head`` / ``forward_head``),
``no_weight_decay``; and the weight loading every family shares (``load_pretrained``, timm's ``custom_load`` hook,
through the family's ``checkpoint_filter``).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, Literal, get_args

import torch
from timm.layers import register_notrace_function, trunc_normal_
from torch import nn
from torch.utils.checkpoint import checkpoint

from .block import TrunkBlock, add_and_norm, reset_part
from .checkpoint import load_checkpoint_into, unwrap_state_dict

__all__ = [
    "InputAxis",
    "PoolType",
    "TimmBackbone",
    "check_input_shape",
    "init_linear_",
    "new_classifier",
    "take_indices",
]

PoolType = Literal["token", "avg", ""]

SPATIAL_FORMATS = {2: "NCHW", 3: "NCTHW"}
"""timm's ``output_fmt`` of intermediates on a 2-D (image) or 3-D (clip) token grid."""

Intermediate = torch.Tensor | tuple[torch.Tensor, torch.Tensor]
"""One of ``forward_intermediates``' outputs: the tokens, or (tokens, class token) with ``return_prefix_tokens``."""


def take_indices(num_blocks: int, indices: int | Sequence[int] | None = None) -> tuple[list[int], int]:
    """The indices of the intermediates (blocks, or stages) ``forward_intermediates`` takes, counted from the first,
    and the largest of them.

    As timm's feature indices: None takes every block, an int ``n`` the last ``n``, a sequence the blocks it names
    (negative ones counted from the end). ValueError naming an index out of range.
    """
    if indices is None:
        indices = num_blocks
    if isinstance(indices, int):
        if not 0 < indices <= num_blocks:
            raise ValueError(f"indices={indices}: take the last 1 to {num_blocks} blocks")
        taken = list(range(num_blocks - indices, num_blocks))
    else:
        taken = [num_blocks + i if i < 0 else i for i in indices]
        wrong = [i for i, absolute in zip(indices, taken) if not 0 <= absolute < num_blocks]
        if wrong or not taken:
            raise ValueError(f"indices={list(indices)}: the model has blocks 0..{num_blocks - 1} (or -{num_blocks}..-1)")
    return taken, max(taken)


InputAxis = str | tuple[int, str]
"""An axis of a model's input: a free size by its letter ("B", "H"), or a fixed size and what it counts ``(3, "channels")``."""


@register_notrace_function  # branches on the input's shape; torch.fx keeps it as one call (wrapped in this module)
def check_input_shape(x: torch.Tensor, model: str, kind: str, axes: tuple[InputAxis, ...]) -> None:
    """ValueError naming ``model``, the expected shape and the mismatch unless ``x`` has the axes ``axes``.

    Args:
        x: the model's input, e.g. (B, 3, H, W) images.
        model: the model's name, for the message.
        kind: what the input holds ("images", "clips", "point clouds"), for the message.
        axes: the expected axes, the batch axis first; fixed sizes are checked, free ones are not.
    """
    layout = "(" + ", ".join(axis if isinstance(axis, str) else str(axis[0]) for axis in axes) + ")"
    expected = f"{model} expects {kind} of shape {layout}, got {tuple(x.shape)}"
    if x.dim() == len(axes) - 1:
        raise ValueError(f"{expected}; add a batch dimension with x.unsqueeze(0)")
    if x.dim() != len(axes):
        raise ValueError(expected)
    for index, (axis, size) in enumerate(zip(axes, x.shape)):
        if not isinstance(axis, str) and size != axis[0]:
            raise ValueError(f"{expected}: axis {index} ({axis[1]}) has size {size}, expected {axis[0]}")


def init_linear_(module: nn.Linear | nn.Conv1d) -> None:
    """The init of the models' own linear layers (heads, PointMamba's tokenizer): weights truncated-normal (std 0.02),
    biases zero."""
    trunc_normal_(module.weight, std=0.02)
    if module.bias is not None:
        nn.init.zeros_(module.bias)


def new_classifier(in_features: int, num_classes: int, like: torch.Tensor) -> nn.Module:
    """An initialised (in_features -> num_classes) linear classifier on ``like``'s device and dtype; identity for 0."""
    if num_classes <= 0:
        return nn.Identity()
    head = nn.Linear(in_features, num_classes, device=like.device, dtype=like.dtype)
    with torch.no_grad():
        init_linear_(head)
    return head


class TimmBackbone(nn.Module):
    """Base class of every backbone: the input contract, timm's model API and weight loading; see the module docstring."""

    pool_types: tuple[str, ...] = get_args(PoolType)
    modality: str = ""
    """What the model takes: "images", "video" or "points" (the data code that reads its inputs, the exported input's name)."""
    input_kind: str = "inputs"
    export_refusal: str | None = None
    """Why the family cannot be exported (torch.export, ONNX, AOTInductor), or None when it can."""
    set_input_size: Callable[..., None]
    """Each family's own method: change the nominal input size by the keyword sizes it takes (``img_size``,
    ``num_frames``, ``num_points``), None keeping one; declared here so that callers may use it on any backbone."""
    num_prefix_tokens: int = 1
    stem_no_weight_decay: tuple[str, ...] = ()
    stem_pattern: str = ""

    intermediate_container: str
    """The attribute holding the intermediates' modules in order, which ``prune_intermediate_layers`` truncates:
    "layers" (a flat trunk's blocks) or "stages" (a hierarchical trunk's stages)."""
    block_groups: tuple[tuple[str, tuple[int, ...] | None], ...]
    """``group_matcher``'s block patterns before ``norm_f``: one group per block, or per stage and block."""
    norm_f: nn.Module  # nn.RMSNorm or nn.LayerNorm (fused with the add), another norm; nn.Identity once pruned
    drop_path: nn.Module
    kernel_backend: str | None
    depth: int
    """The number of blocks of the trunk as built (all stages'), for the init's depth scaling."""
    grad_checkpointing: bool
    head: nn.Module
    head_drop: nn.Module
    pretrained_cfg: dict[str, Any]  # set by timm's build_model_with_cfg

    def init_head_attributes(
        self, num_classes: int, global_pool: str, embed_dim: int, head_hidden_size: int | None = None
    ) -> None:
        """Check ``global_pool``; set ``num_classes``, ``global_pool``, ``num_features``, ``embed_dim``, ``head_hidden_size``.

        ``head_hidden_size`` defaults to ``embed_dim`` (a linear head on the pooled token).
        """
        self._check_pool(global_pool)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.embed_dim = embed_dim
        self.head_hidden_size = embed_dim if head_hidden_size is None else head_hidden_size

    def _check_pool(self, global_pool: str) -> None:
        if global_pool not in self.pool_types:
            raise ValueError(f"global_pool must be one of {self.pool_types}, got {global_pool!r}")

    # ------------------------------------------------------------------------------------- the trunk's layout
    def trunk_blocks(self) -> list[TrunkBlock]:
        """Every block of the trunk, in order (all stages' for a hierarchical one)."""
        raise NotImplementedError

    def forward_trunk_intermediates(
        self, x: torch.Tensor, grid: tuple[int, ...] | None = None, taken: Collection[int] = (), stop: int | None = None,
        norm: bool = False,
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, tuple[int, ...] | None]]]:  # fmt: skip
        """Run the trunk on embedded tokens, collecting the intermediates ``taken``.

        Args:
            x: (B, L, D) embedded tokens, on the token grid ``grid`` (None: no grid).
            grid: the grid of ``x``'s non-class tokens, (H', W') or (T', H', W').
            taken: the indices of the intermediates to collect (blocks of a flat trunk, stages of a hierarchical one).
            stop: run the intermediates before this index only (None: all).
            norm: pass the intermediates through ``norm_f`` where it applies.

        Returns:
            The final tokens (B, L', D') and, for each taken index in order, its tokens (B, L_i, D_i) and their grid.
        """
        raise NotImplementedError

    def forward_trunk(self, x: torch.Tensor, grid: tuple[int, ...] | None = None) -> torch.Tensor:
        """Run the whole trunk on (B, L, D) embedded tokens on ``grid``: the final normalised tokens (B, L', D')."""
        return self.forward_trunk_intermediates(x, grid)[0]

    @property
    def num_intermediates(self) -> int:
        """How many intermediates ``forward_intermediates`` numbers: the blocks of a flat trunk, the stages of a
        hierarchical one."""
        return len(getattr(self, self.intermediate_container))

    def describe_features(self, channels: Sequence[int], reductions: Sequence[int]) -> list[dict[str, Any]]:
        """timm's ``feature_info``: one entry per intermediate, its module, channel count and reduction (input
        pixels per token step; 1 for tokens without a grid)."""
        return [
            dict(module=f"{self.intermediate_container}.{i}", num_chs=num_chs, reduction=reduction)
            for i, (num_chs, reduction) in enumerate(zip(channels, reductions, strict=True))
        ]

    @torch.no_grad()
    def init_trunk_weights(self) -> None:
        """Each block's parts by their own init (Mamba's for the mixer), the branches' last projections divided by
        ``sqrt(depth)`` (GPT-2, see :meth:`~vim.models.block.MambaBlock.reset_parameters`)."""
        for layer in self.trunk_blocks():
            layer.reset_parameters(depth=self.depth)
        reset_part(self.norm_f)  # nothing to reset once pruned to nn.Identity

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of storing them."""
        self.grad_checkpointing = enable

    def _run_block(
        self, layer: TrunkBlock, hidden: torch.Tensor, residual: torch.Tensor | None, grid: tuple[int, ...] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One block, ``grid`` passed on to a mixer that reads it (None: the tokens alone)."""
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            return checkpoint(layer, hidden, residual, grid, use_reentrant=False)
        return layer(hidden, residual, grid)

    def _norm_f(self, hidden: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """``norm_f`` of the float32 residual stream ``residual + hidden``, computed in the norm's dtype: one fused add +
        norm for an RMSNorm or LayerNorm, the sum then the module for another norm (MambaVision's BatchNorm) or the
        ``nn.Identity`` left by pruning."""
        if isinstance(self.norm_f, (nn.RMSNorm, nn.LayerNorm)):
            return add_and_norm(self.norm_f, hidden, residual, self.kernel_backend)[0]
        return self.norm_f(hidden if residual is None else residual + hidden)

    def _final_norm(self, hidden: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """``norm_f(residual + drop_path(hidden))``."""
        return self._norm_f(self.drop_path(hidden), residual)

    def class_token_index(self, num_tokens: int) -> int:
        """Position of the class token in a sequence of ``num_tokens`` tokens (for ``num_prefix_tokens`` = 1)."""
        raise NotImplementedError(f"{type(self).__name__} has no class token")

    def split_prefix_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, D) -> the class token (B, num_prefix_tokens, D) and the other tokens (B, L - num_prefix_tokens, D)."""
        if self.num_prefix_tokens == 0:
            return x[:, :0], x
        index = self.class_token_index(x.shape[1])
        rest = x[:, 1:] if index == 0 else torch.cat([x[:, :index], x[:, index + 1 :]], dim=1)
        return x[:, index : index + 1], rest

    def input_axes(self) -> tuple[InputAxis, ...]:
        """The axes of the modality's input, the batch axis first (see :func:`check_input_shape`)."""
        raise NotImplementedError

    def nominal_input_shape(self) -> tuple[int, ...]:
        """One sample of the nominal input, without the batch axis: (C, H, W), (C, T, H, W) or (N, 3)."""
        raise NotImplementedError

    @property
    def model_name(self) -> str:
        """The registered name the model was created by (``test_vim``), else its class name."""
        return getattr(self, "pretrained_cfg", {}).get("architecture") or type(self).__name__

    def check_input(self, x: torch.Tensor) -> None:
        """ValueError naming the model, the expected shape and the mismatch for an input of another shape."""
        check_input_shape(x, self.model_name, self.input_kind, self.input_axes())

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """The modality's input -> (B, L, D) embedded tokens (the tokenizer and position embeddings)."""
        raise NotImplementedError

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The modality's input -> (B, L, D) normalised tokens (see the subclass's ``_embed`` for the layout)."""
        self.check_input(x)
        return self.forward_trunk(self._embed(x), self.token_grid(x))

    def token_grid(self, x: torch.Tensor) -> tuple[int, ...] | None:
        """The grid of the non-class tokens of input ``x``: (H', W') for images, (T', H', W') for clips, None without one."""
        return None

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str | None = None,
        intermediates_only: bool = False,
    ) -> list[Intermediate] | tuple[torch.Tensor, list[Intermediate]]:
        """Forward pass that also returns selected intermediates, as timm formats them: the residual stream after a
        block of a flat trunk, the output of a stage of a hierarchical one (numbered by stage, as timm's hierarchical
        models).

        Args:
            x: the model's input ((B, C, H, W) images, (B, C, T, H, W) clips, (B, N, 3) points).
            indices: the last n intermediates if an int, these ones if a list, all if None.
            return_prefix_tokens: pair each intermediate with its class token (B, num_prefix_tokens, D).
            norm: apply the final norm to the intermediates (a hierarchical trunk: to the last stage's).
            stop_early: skip the blocks (stages) after the last selected one.
            output_fmt: "NCHW" (B, D, H', W') on an image's 2-D token grid, "NCTHW" (B, D, T', H', W') on a clip's
                3-D one, or "NLC" (B, L - num_prefix_tokens, D); the class token is removed in every format.
                None: the grid's format, "NLC" without a grid (point clouds). Each intermediate has its own grid
                (a hierarchical trunk's shrinks by stage).
            intermediates_only: return the intermediates only.

        Returns:
            ``(final_tokens (B, L, D), intermediates)`` or the intermediates alone.
        """
        self.check_input(x)
        grid = self.token_grid(x)
        formats = ("NLC",) if grid is None else (SPATIAL_FORMATS[len(grid)], "NLC")
        output_fmt = output_fmt or formats[0]
        if output_fmt not in formats:
            raise ValueError(f"output_fmt must be one of {formats} for {type(self).__name__}, got {output_fmt!r}")
        taken, last = take_indices(self.num_intermediates, indices)
        stop = last + 1 if stop_early else None
        final, intermediates = self.forward_trunk_intermediates(self._embed(x), grid, taken, stop, norm)
        outputs: list[Intermediate] = []
        for y, y_grid in intermediates:
            prefix, patches = self.split_prefix_tokens(y)
            if y_grid is not None and output_fmt != "NLC":
                patches = patches.unflatten(1, y_grid).movedim(-1, 1).contiguous()  # no -1: B may be 0
            outputs.append((patches, prefix) if return_prefix_tokens else patches)
        return outputs if intermediates_only else (final, outputs)

    def linear_head(self, num_classes: int, device=None, dtype=None) -> nn.Module:
        """A (D -> num_classes) linear classifier, the identity for ``num_classes == 0``."""
        return nn.Linear(self.embed_dim, num_classes, device=device, dtype=dtype) if num_classes > 0 else nn.Identity()

    def _init_head(self) -> None:
        if isinstance(self.head, nn.Linear):
            init_linear_(self.head)

    def _reset_head(self, num_classes: int) -> None:
        """A new, initialised linear ``head`` on the device and dtype of the model's parameters."""
        self.head = new_classifier(self.embed_dim, num_classes, like=next(self.parameters()))

    def checkpoint_filter(self, state_dict: Mapping) -> dict[str, torch.Tensor]:
        """Map a released or exported state dict onto this model; each family calls its ``checkpoint_filter_fn``."""
        return unwrap_state_dict(state_dict)

    @torch.jit.ignore
    def load_pretrained(self, checkpoint_path: str) -> None:
        """timm's ``custom_load`` hook: load the local file timm resolved (given, or downloaded from a URL or the Hub).

        See :func:`~vim.models.checkpoint.load_checkpoint_into`; every source goes through the same safe reader.
        """
        load_checkpoint_into(self, checkpoint_path)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """The stem's ``stem_no_weight_decay``: with timm's rule (no decay on 1-D parameters: biases, norms, the SSM's
        D), the parameters that take no weight decay. The SSM's ``A_log`` (2-D) takes it, as in the Vim, VideoMamba and
        PointMamba trainings: their timm-style optimizer factories group by shape and never read mamba_ssm's
        ``_no_weight_decay`` flag."""
        return set(self.stem_no_weight_decay)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for layer-wise learning-rate decay: the stem, ``block_groups``, ``norm_f`` last."""
        return dict(stem=self.stem_pattern, blocks=[*self.block_groups, (r"^norm_f", (99999,))])

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier with a new (initialised) one for ``num_classes`` outputs (0: none)."""
        if global_pool is not None:
            self._check_pool(global_pool)
            self.global_pool = global_pool
        self.num_classes = num_classes
        self._reset_head(num_classes)
        self.head.train(self.training)

    def pool(self, x: torch.Tensor, pool_type: str | None = None) -> torch.Tensor:
        """(B, L, D) tokens -> (B, D) (or the tokens unchanged for pool type ""), ``global_pool`` if None.

        "token" takes the class token at ``class_token_index(L)``, "avg" the mean and "max" the maximum of all
        tokens; "catavgmax" concatenates mean and maximum, (B, 2 D), as timm's pooling of that name does.
        """
        pool_type = self.global_pool if pool_type is None else pool_type
        if pool_type == "token":
            return x[:, self.class_token_index(x.shape[1])]
        if pool_type == "avg":
            return x.mean(dim=1)
        if pool_type == "max":
            return x.amax(dim=1)
        if pool_type == "catavgmax":
            return torch.cat([x.mean(dim=1), x.amax(dim=1)], dim=1)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, L, D) tokens -> logits (B, num_classes), or the pooled (B, D) with ``pre_logits``."""
        x = self.head_drop(self.pool(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the blocks (stages) after the last of ``indices`` (and the final norm / classifier); returns the kept
        indices."""
        taken, last = take_indices(self.num_intermediates, indices)
        setattr(self, self.intermediate_container, getattr(self, self.intermediate_container)[: last + 1])
        if prune_norm:
            self.norm_f = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return taken
