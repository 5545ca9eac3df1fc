r"""The hierarchical Mamba trunk (stages at reductions 4 / 8 / 16 / 32, strided-conv downsampling between them) and a
tiny image model built from the shared parts, registered with timm as ``test_hier_mamba``.

API::

    class MyHierarchicalBackbone(HierarchicalBackbone):      # the input contract as a MambaBackbone family declares it
        def __init__(self, ...):
            super().__init__()
            self.init_head_attributes(num_classes, "avg", dims[-1])
            self.patch_embed = ...                            # stem to stride 4: _embed gives (B, H/4 * W/4, dims[0])
            self.build_stages(dims, depths, d_state=8)        # MambaBlocks per stage; layer_mixers per stage, an MLP
            self.feature_info = self.describe_features(dims, [4, 8, 16, 32])

    import vim, timm
    model = timm.create_model("test_hier_mamba", features_only=True)   # 4 NCHW maps at reductions 4, 8, 16, 32
    final, maps = timm.create_model("test_hier_mamba").forward_intermediates(images)   # one map per stage

``stages`` holds one :class:`MambaStage` per reduction: a :class:`GridDownsample` (none in the first stage; the stem
reduces by 4) and a sequence of :class:`~vim.models.block.MambaBlock` over the flattened stage grid, their residual
stream in float32, or of another block with the same call (:class:`~vim.models.block.ConvBlock`: MambaVision's conv
stages). A stage with a ``window_size`` runs its blocks on square windows of the grid, each window a sequence of its
own (MambaVision's: the grid zero-padded to whole windows, windows in raster order, tokens in raster order inside).
A stage's output is its residual stream, which the next stage downsamples; ``norm_f`` (after
``drop_path``) normalises the last stage's. timm's model API comes from :class:`~vim.models.timm_api.TimmBackbone`,
with intermediates numbered by stage: ``forward_intermediates`` gives each stage's output on its own grid,
``prune_intermediate_layers`` drops stages, ``group_matcher`` groups each stage's downsampling and blocks.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from functools import partial
from typing import Any, cast

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, to_2tuple
from timm.models import generate_default_cfgs, register_model
from torch import nn

from .backbone import drop_path_schedule, layer_mixer_factories
from .block import MambaBlock, NormLayer, PartFactory, TrunkBlock, norm_factory, reset_part
from .builder import build_backbone
from .mixer import MambaMixer
from .patch_embed import StridedPatchEmbed
from .timm_api import InputAxis, TimmBackbone, init_linear_

__all__ = [
    "GridDownsample",
    "HierarchicalBackbone",
    "HierarchicalImageBackbone",
    "HierarchicalMamba",
    "MambaStage",
    "halved",
    "merge_windows",
    "partition_windows",
    "window_rows_cols",
]

STEM_REDUCTION = 4


class GridDownsample(nn.Module):
    """Halve a token grid: a stride-2 Conv2d, then ``norm`` if given, (B, H * W, C_in) on (H, W) -> (B, H' * W', C_out).

    Args:
        in_dim, out_dim: token widths C_in, C_out.
        kernel_size: 2 (no padding: H' = floor(H / 2)) or 3 (padding 1: H' = ceil(H / 2), VMamba's "v3", MambaVision's).
        norm_cls: a norm over C_out after the conv (VMamba's LayerNorm), None for none (MambaVision).
        bias: give the conv a bias (MambaVision's has none).
    """

    norm: nn.Module | None

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        kernel_size: int = 2,
        norm_cls: PartFactory | None = None,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.conv = nn.Conv2d(in_dim, out_dim, kernel_size, stride=2, padding=(kernel_size - 1) // 2, bias=bias, **dd)
        self.norm = None if norm_cls is None else norm_cls(out_dim, **dd)

    def forward(self, x: torch.Tensor, grid: tuple[int, ...]) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, H * W, C_in) tokens on ``grid`` (H, W) -> (B, H' * W', C_out) tokens and their grid (H', W')."""
        x = self.conv(x.unflatten(1, grid).movedim(-1, 1))  # (B, C_out, H', W')
        new_grid = (x.shape[2], x.shape[3])
        x = x.flatten(2).transpose(1, 2)
        return (x if self.norm is None else self.norm(x)), new_grid


def halved(side: int) -> int:
    """A grid side after a 3x3 conv of stride 2 and padding 1 (VMamba's and MambaVision's stems): ceil(side / 2)."""
    return (side + 1) // 2


def window_rows_cols(grid: tuple[int, ...], window: int) -> tuple[int, int]:
    """How many rows and columns of ``window``-sided windows cover the (H, W) ``grid``: ceil(H / w), ceil(W / w)."""
    return -(-grid[0] // window), -(-grid[1] // window)


def partition_windows(x: torch.Tensor, grid: tuple[int, ...], window: int) -> torch.Tensor:
    """Cut tokens on a grid into square windows, the grid first zero-padded at its bottom and right to whole windows.

    Args:
        x: (B, H * W, C) tokens on ``grid`` (H, W), row-major.
        window: the windows' side w.

    Returns:
        (B * n_h * n_w, w * w, C): the windows of each image in raster order (n_h = ceil(H / w) rows of
        n_w = ceil(W / w)), each window's tokens row-major.
    """
    batch, _, channels = x.shape
    height, width = grid
    rows, cols = window_rows_cols(grid, window)
    x = F.pad(x.reshape(batch, height, width, channels), (0, 0, 0, cols * window - width, 0, rows * window - height))
    x = x.view(batch, rows, window, cols, window, channels).transpose(2, 3)
    return x.reshape(batch * rows * cols, window * window, channels)


def merge_windows(windows: torch.Tensor, grid: tuple[int, ...], window: int) -> torch.Tensor:
    """The inverse of :func:`partition_windows`: (B * n_h * n_w, w * w, C) windows -> (B, H * W, C) tokens on ``grid``,
    the padding dropped."""
    height, width = grid
    rows, cols = window_rows_cols(grid, window)
    channels = windows.shape[-1]
    batch = windows.shape[0] // (rows * cols)
    x = windows.reshape(batch, rows, cols, window, window, channels).transpose(2, 3)
    x = x.reshape(batch, rows * window, cols * window, channels)[:, :height, :width]
    return x.reshape(batch, height * width, channels)


class MambaStage(nn.Module):
    """One stage: ``downsample`` (a :class:`GridDownsample` or alike; None in the first stage) and ``blocks``, a
    ModuleList of MambaBlock (or :class:`~vim.models.block.ConvBlock`), run on windows of ``window_size`` when given."""

    downsample: nn.Module | None

    def __init__(self, blocks: Sequence[TrunkBlock], downsample: nn.Module | None = None, window_size: int | None = None) -> None:
        super().__init__()
        self.downsample = downsample
        self.blocks = nn.ModuleList(blocks)
        self.window_size = window_size

    @property
    def block_list(self) -> Sequence[TrunkBlock]:
        """``blocks`` as what it holds (a ModuleList is typed as holding any Module)."""
        return cast("Sequence[TrunkBlock]", self.blocks)

    def extra_repr(self) -> str:
        return "" if self.window_size is None else f"window_size={self.window_size}"


class HierarchicalBackbone(TimmBackbone):
    """Base class of hierarchical backbones: the stages here, the model API from :class:`TimmBackbone`; see the module
    docstring. Tokens carry no class token; ``_embed`` gives the stem's tokens on ``token_grid``."""

    intermediate_container = "stages"
    block_groups = ((r"^stages\.(\d+)\.downsample", (0,)), (r"^stages\.(\d+)\.blocks\.(\d+)", None))
    pool_types = ("avg", "max", "")
    num_prefix_tokens = 0
    stages: nn.ModuleList
    stage_out_norm: PartFactory | None = None
    """The norm a family's dense backbone applies to each stage's (B, C_i, H_i, W_i) map, called as ``norm(C_i)``
    (VMamba's ``outnorm{i}``), None for none. :class:`vim.dense.features.PyramidFeatures` builds one per map."""

    def build_stages(
        self,
        dims: Sequence[int],
        depths: Sequence[int],
        drop_path_rate: float = 0.0,
        norm_layer: NormLayer = "layernorm",
        norm_eps: float = 1e-5,
        kernel_backend: str | None = None,
        mlp_cls: PartFactory | None = None,
        layer_mixers: Sequence[Mapping[int, PartFactory]] | None = None,
        mixer_cls: PartFactory | None = None,
        downsample_cls: PartFactory = GridDownsample,
        stage_blocks: Sequence[PartFactory | None] | None = None,
        window_sizes: Sequence[int | None] | None = None,
        layer_scale: float | None = None,
        norm_f_cls: PartFactory | None = None,
        device=None,
        dtype=None,
        **mixer_kwargs,
    ) -> None:
        """Create ``stages``, ``norm_f`` and ``drop_path``.

        Args:
            dims: each stage's token width.
            depths: each stage's number of blocks (at least 1).
            drop_path_rate: stochastic-depth rate of the last block and of the final norm (the schedule runs over
                all stages' blocks, as a flat trunk's).
            norm_layer, norm_eps, kernel_backend, mlp_cls: as :meth:`MambaBackbone.build_trunk` takes them.
            layer_mixers: per stage, another mixer's factory at given block indices of that stage (MambaVision's
                attention blocks); None: the default mixer everywhere.
            mixer_cls: the default mixer's factory, None for :class:`MambaMixer` (``mixer_kwargs`` apply to either).
            downsample_cls: the downsampling's factory between stages, called as ``downsample_cls(C_in, C_out,
                device=, dtype=)`` with ``forward(x, grid) -> (x, grid)`` as :class:`GridDownsample`.
            stage_blocks: per stage, None for MambaBlocks, or the factory of another block, called as
                ``block(dim, drop_path=rate, device=, dtype=)`` with MambaBlock's forward (MambaVision's ConvBlock).
            window_sizes: per stage, the side of the square windows its blocks run on, None for the whole grid.
            layer_scale: the MambaBlocks' layer scale (their ``ls1`` / ``ls2``), None for none.
            norm_f_cls: the final norm's factory (MambaVision's BatchNorm), None for ``norm_layer``'s.
            mixer_kwargs: forwarded to every other block's mixer.
        """
        if len(dims) != len(depths) or min(depths, default=0) < 1:
            raise ValueError(f"dims={list(dims)} and depths={list(depths)}: one width and at least one block per stage")
        for name, per_stage in (("stage_blocks", stage_blocks), ("window_sizes", window_sizes), ("layer_mixers", layer_mixers)):
            if per_stage is not None and len(per_stage) != len(dims):
                raise ValueError(f"{name} has {len(per_stage)} entries for {len(dims)} stages")
        dd = {"device": device, "dtype": dtype}
        self.depth = sum(depths)
        self.kernel_backend = kernel_backend
        norm_cls = norm_factory(norm_layer, norm_eps)
        mamba = partial(mixer_cls or MambaMixer, kernel_backend=kernel_backend, **mixer_kwargs)
        rates = iter(drop_path_schedule(drop_path_rate, self.depth))
        stages = []
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            block_cls = stage_blocks[i] if stage_blocks else None
            blocks: list[TrunkBlock]
            if block_cls is not None:
                blocks = [cast("TrunkBlock", block_cls(dim, drop_path=next(rates), **dd)) for _ in range(depth)]
            else:
                mixers = layer_mixer_factories(depth, mamba, layer_mixers[i] if layer_mixers else None)
                blocks = [
                    MambaBlock(dim, mixer_cls, mlp_cls, norm_cls, next(rates), layer_scale, kernel_backend=kernel_backend, **dd)
                    for mixer_cls in mixers
                ]
            downsample = None if i == 0 else downsample_cls(dims[i - 1], dim, **dd)
            stages.append(MambaStage(blocks, downsample, window_sizes[i] if window_sizes else None))
        self.stages = nn.ModuleList(stages)
        self.norm_f = (norm_f_cls or norm_cls)(dims[-1], **dd)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0.0 else nn.Identity()
        self.grad_checkpointing = False

    @property
    def stage_list(self) -> Sequence[MambaStage]:
        """``stages`` as what it holds (a ModuleList is typed as holding any Module)."""
        return cast("Sequence[MambaStage]", self.stages)

    def trunk_blocks(self) -> list[TrunkBlock]:
        """Every stage's blocks, stage after stage."""
        return [block for stage in self.stage_list for block in stage.block_list]

    def forward_trunk_intermediates(
        self, x: torch.Tensor, grid: tuple[int, ...] | None = None, taken: Collection[int] = (), stop: int | None = None,
        norm: bool = False,
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, tuple[int, ...] | None]]]:  # fmt: skip
        """Run the stages (those before ``stop``), collecting the outputs of the stages ``taken``.

        Args:
            x: (B, H * W, C_0) the stem's tokens on ``grid`` (H, W).
            grid: the stem's token grid (required).
            taken: stage indices whose output to collect.
            stop: run the stages before this index only (None: all).
            norm: pass the last stage's output through ``norm_f`` (the other stages have their own widths).

        Returns:
            ``norm_f`` of the last stage's stream (B, L_3, C_3), or the output of the last stage run when it stops
            earlier, and for each taken stage its output (B, L_i, C_i) and grid (H_i, W_i).
        """
        if grid is None:
            raise ValueError(f"{type(self).__name__} runs its stages on the token grid: give the stem's grid")
        intermediates = []
        last_stage = len(self.stages) - 1
        hidden, residual = x, None
        for i, stage in enumerate(self.stage_list):
            if i == stop:
                break
            if stage.downsample is not None:
                x, grid = stage.downsample(x, grid)
            window = stage.window_size
            hidden, residual = (x, None) if window is None else (partition_windows(x, grid, window), None)
            for block in stage.block_list:
                hidden, residual = self._run_block(block, hidden, residual, grid if window is None else (window, window))
            if window is not None:
                hidden = merge_windows(hidden, grid, window)
                residual = None if residual is None else merge_windows(residual, grid, window)
            # the stage's last branch enters the stream through its block's stochastic depth
            x = hidden if residual is None else (residual + stage.block_list[-1].drop_path(hidden)).to(hidden.dtype)
            if i in taken:
                intermediates.append((self._norm_f(hidden, residual) if norm and i == last_stage else x, grid))
        final = self._final_norm(hidden, residual) if stop is None or stop > last_stage else x
        return final, intermediates


class HierarchicalImageBackbone(HierarchicalBackbone):
    """An image backbone whose stem halves each side twice with 3x3 stride-2 convs (VMamba's, MambaVision's): the input
    contract of such a family. A subclass sets ``img_size`` and ``in_chans``, builds ``patch_embed`` ((B, C, H, W) ->
    (B, H/4 * W/4, C_0) tokens) and ``checkpoint_filter``. Any image size works."""

    stem_pattern = r"^patch_embed"
    modality = "images"
    input_kind = "images"
    img_size: tuple[int, int]
    in_chans: int
    patch_embed: nn.Module

    def set_input_size(self, img_size: int | tuple[int, int] | None = None) -> None:
        """Change the nominal image size (the model takes any size)."""
        if img_size is not None:
            self.img_size = to_2tuple(img_size)

    def input_axes(self) -> tuple[InputAxis, ...]:
        """(B, C, H, W), C the stem's input channels."""
        return ("B", (self.in_chans, "channels"), "H", "W")

    def nominal_input_shape(self) -> tuple[int, ...]:
        """(C, H, W) at the nominal image size."""
        return (self.in_chans, *self.img_size)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> (B, H/4 * W/4, C_0) stem tokens."""
        return self.patch_embed(x)

    @torch.no_grad()
    def init_parts(self, own_init: tuple[type[nn.Module], ...]) -> None:
        """Upstream's ``_init_weights`` of VMamba and MambaVision: each module of an ``own_init`` type by its own init,
        every ``nn.Linear`` truncated normal (std 0.02, bias 0), in module order (a part's own init first, then its
        Linears redrawn)."""
        for module in self.modules():
            if isinstance(module, own_init):
                reset_part(module)
            if isinstance(module, nn.Linear):
                init_linear_(module)

    def token_grid(self, x: torch.Tensor) -> tuple[int, int]:
        """The stem's grid of (B, C, H, W) images: each side halved twice, rounded up (H/4, W/4 for multiples of 4)."""
        return halved(halved(x.shape[-2])), halved(halved(x.shape[-1]))


class HierarchicalMamba(HierarchicalBackbone):
    """A hierarchical Mamba image classifier from the shared parts: a stride-4 conv stem, stages of width
    ``embed_dim * 2**i`` with ``depth`` blocks each (MambaMixer over the flattened stage grid), mean pooling, a linear
    head. Registered as the tiny ``test_hier_mamba`` only: it proves the hierarchical layout, it is no family.

    Args:
        img_size: nominal image size.
        in_chans: input channels.
        num_classes: classifier outputs, 0 for none.
        global_pool: "avg", "max" or "".
        embed_dim: the first stage's width; stage i has ``embed_dim * 2**i``.
        depth: blocks per stage.
        num_stages: stages, reductions 4, 8, 16, ... .
        d_state: SSM state size N.
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth of the last block and of the final norm.
        kernel_backend: backend of the kernels, None for ``$VIM_SCAN_BACKEND`` or "auto".
    """

    stem_pattern = r"^patch_embed"
    modality = "images"
    input_kind = "images"

    def __init__(
        self,
        img_size: int | tuple[int, int] = 64,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dim: int = 16,
        depth: int = 1,
        num_stages: int = 4,
        d_state: int = 8,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        kernel_backend: str | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        dims = [embed_dim * 2**i for i in range(num_stages)]
        self.init_head_attributes(num_classes, global_pool, dims[-1])
        self.patch_embed = StridedPatchEmbed(
            img_size=img_size, patch_size=STEM_REDUCTION, in_chans=in_chans, embed_dim=dims[0], output_fmt="NHWC",
            strict_img_size=False, **dd,
        )  # fmt: skip
        self.build_stages(dims, [depth] * num_stages, drop_path_rate, d_state=d_state, kernel_backend=kernel_backend, **dd)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = self.linear_head(num_classes, **dd)
        self.feature_info = self.describe_features(dims, [STEM_REDUCTION * 2**i for i in range(num_stages)])
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, mode: str = "") -> None:
        """PyTorch's default init of the stem and the downsampling convs, Mamba's of the blocks (``mode`` for timm)."""
        reset_part(self.patch_embed.proj)
        for stage in self.stage_list:
            if stage.downsample is not None:
                reset_part(stage.downsample)
        self._init_head()
        self.init_trunk_weights()

    def set_input_size(self, img_size: int | tuple[int, int] | None = None) -> None:
        """Change the nominal image size (the model takes any size of at least 4 * 2**(num_stages - 1) pixels)."""
        self.patch_embed.set_input_size(img_size=img_size)

    def input_axes(self) -> tuple[InputAxis, ...]:
        """(B, C, H, W), C the stem's input channels."""
        return ("B", (self.patch_embed.proj.in_channels, "channels"), "H", "W")

    def nominal_input_shape(self) -> tuple[int, ...]:
        """(C, H, W) at the nominal image size."""
        return (self.patch_embed.proj.in_channels, *self.patch_embed.img_size)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> (B, H/4 * W/4, dims[0]) stem tokens."""
        return self.patch_embed(x).flatten(1, 2)

    def token_grid(self, x: torch.Tensor) -> tuple[int, int]:
        """The stem's (H/4, W/4) grid of (B, C, H, W) images."""
        return self.patch_embed.dynamic_feat_size((x.shape[-2], x.shape[-1]))


default_cfgs = generate_default_cfgs(
    {
        "test_hier_mamba.untrained": {
            "url": "",
            "num_classes": 1000,
            "input_size": (3, 64, 64),
            "min_input_size": (3, 32, 32),
            "pool_size": None,
            "crop_pct": 1.0,
            "interpolation": "bicubic",
            "mean": IMAGENET_DEFAULT_MEAN,
            "std": IMAGENET_DEFAULT_STD,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
            "license": "apache-2.0",
        }
    }
)


@register_model
def test_hier_mamba(pretrained: bool = False, **kwargs: Any) -> HierarchicalMamba:
    """A tiny hierarchical Mamba for tests: 4 stages of widths 16 / 32 / 64 / 128, one block each, reductions 4 to 32."""
    kwargs.setdefault("out_indices", 4)  # features_only: every stage, as timm's hierarchical models
    return build_backbone(HierarchicalMamba, "test_hier_mamba", pretrained, **kwargs)
