"""Any image model of the repository as four feature maps at strides 4 / 8 / 16 / 32, through timm's model API only.

API::

    features = PyramidFeatures(timm.create_model("test_vmamba", num_classes=0))   # a hierarchical trunk: its 4 stages
    features = PyramidFeatures(timm.create_model("vim_tiny_patch16_224", num_classes=0))       # flat: last block, pyramid
    features = PyramidFeatures(vim_model, layers=(5, 11, 17, 23))                  # flat: level i from block layers[i]
    maps = features(images)              # (B, 3, H, W) -> 4 maps (B, C_i, ~H/s, ~W/s), s = 4, 8, 16, 32
    features.channels, features.strides  # C_i and s per map

The layout is read off the model's ``feature_info``: a hierarchical trunk (intermediates at reductions 4, 8, 16, 32:
VMamba, MambaVision) gives its stage maps as they are; a flat trunk (every intermediate at one stride: Vim) gives the
output of the chosen blocks, turned into four levels by a :class:`~vim.dense.pyramid.SimpleFeaturePyramid`. Either way
the maps come from ``forward_intermediates(..., output_fmt="NCHW", intermediates_only=True)``. A hierarchical family
whose dense backbone normalises each stage's map (``stage_out_norm``: VMamba's ``MM_VSSM`` has a LayerNorm2d
``outnorm{i}`` per stage, as mmdetection's Swin) gets those norms here, ``norms[i]`` on map i: initialised as
upstream's (weight 1, bias 0) when starting from classification weights, loaded from a detection or segmentation
checkpoint's ``backbone.outnorm{i}`` (:mod:`vim.dense.checkpoints`). The model is pruned to
what that takes (``prune_intermediate_layers``: the blocks after the last one taken, the final norm and the classifier
go), so that every parameter left receives a gradient.

A hierarchical trunk takes any image size (a stage's grid rounds each side as its downsampling does). A flat trunk's
token grid must tile the image: ``h * stride == H`` and ``w * stride == W``, so that the pyramid's maps are at the
strides it names. That holds for patches that do not overlap (``patch_size == stride``: Vim's ``patch16`` models) and
sides divisible by the stride; otherwise (Vim's ``stride8`` models, whose 16-pixel patches overlap, leave a grid of
H/8 - 1) the forward raises ValueError naming the grid and the image. Vim's registered models resample their position
embedding to any grid (``dynamic_img_size=True``); one created with ``dynamic_img_size=False`` takes its ``img_size``
only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from vim.models.timm_api import take_indices

from .pyramid import STRIDES, SimpleFeaturePyramid

__all__ = ["PyramidFeatures", "check_tiling", "flat_layers"]


def check_tiling(name: str, grid: Sequence[int], stride: int, image: Sequence[int]) -> None:
    """ValueError naming ``name``, its token grid and the (H, W) image unless the grid at ``stride`` covers the image
    exactly (``grid * stride == image`` on both sides)."""
    covered = [side * stride for side in grid]
    if covered != list(image):
        raise ValueError(
            f"{name}: its {grid[0]}x{grid[1]} token grid at stride {stride} covers {covered[0]}x{covered[1]} pixels of the "
            f"{image[0]}x{image[1]} image, so its pyramid would not be at strides {'/'.join(map(str, STRIDES))}: that needs "
            f"image sides that are multiples of {stride} and patches that do not overlap (patch_size == stride)"
        )


def flat_layers(name: str, num_blocks: int, layers: Sequence[int] | None) -> list[int]:
    """The absolute indices of the blocks ``layers`` names (None: the last); ValueError unless they are 1 or 4 distinct
    blocks of the ``num_blocks``, in increasing order (level i comes from the i-th)."""
    taken, _ = take_indices(num_blocks, [-1] if layers is None else list(layers))
    if len(taken) not in (1, len(STRIDES)) or taken != sorted(set(taken)):
        raise ValueError(
            f"layers={list(layers or [])}: take 1 block of {name} (for every level) or {len(STRIDES)} distinct ones in "
            "increasing order (one per level, the finest first)"
        )
    return taken


class PyramidFeatures(nn.Module):
    """Four maps at strides 4 / 8 / 16 / 32 from an image model with timm's ``forward_intermediates``; see the module
    docstring.

    Args:
        model: the model (its classifier and final norm are pruned here).
        layers: a flat trunk's blocks to take: one (every level from it; default the last, -1) or four (level i from
            ``layers[i]``); negative ones count from the end. Not for a hierarchical trunk, whose four stages are the maps.

    Attributes:
        trunk: the pruned model.
        pyramid: the :class:`~vim.dense.pyramid.SimpleFeaturePyramid` of a flat trunk, None for a hierarchical one.
        norms: the per-map norms of a hierarchical trunk with a ``stage_out_norm``, None otherwise.
        indices: the intermediates taken (absolute indices).
        channels: each map's channel count.
        strides: each map's stride, 4 / 8 / 16 / 32.
    """

    pyramid: SimpleFeaturePyramid | None
    norms: nn.ModuleList | None

    def __init__(self, model: nn.Module, layers: Sequence[int] | None = None) -> None:
        super().__init__()
        trunk: Any = model  # a timm model: its API (feature_info, forward_intermediates, ...) is not nn.Module's
        self.name = trunk.pretrained_cfg.get("architecture") or type(model).__name__
        reductions = [info["reduction"] for info in trunk.feature_info]
        widths = [info["num_chs"] for info in trunk.feature_info]
        if len(set(reductions)) == 1:
            indices = flat_layers(self.name, len(reductions), layers)
            self.pyramid = SimpleFeaturePyramid(widths[0], reductions[0])
            self.channels = [widths[0]] * len(STRIDES)
        else:
            if layers is not None:
                raise ValueError(
                    f"layers={list(layers)}: {self.name} is hierarchical, its stages are the maps (layers is for flat trunks)"
                )
            if not set(STRIDES) <= set(reductions):
                raise ValueError(f"{self.name} has intermediates at reductions {reductions}, not at each of {list(STRIDES)}")
            indices = [reductions.index(stride) for stride in STRIDES]
            self.pyramid = None
            self.channels = [widths[i] for i in indices]
        stage_out_norm = getattr(trunk, "stage_out_norm", None) if self.pyramid is None else None
        like = next(model.parameters())
        dd = {"device": like.device, "dtype": like.dtype}
        self.norms = None if stage_out_norm is None else nn.ModuleList(stage_out_norm(c, **dd) for c in self.channels)
        self.indices = trunk.prune_intermediate_layers(indices, prune_norm=True, prune_head=True)
        self.trunk = model
        self.strides = list(STRIDES)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """(B, C, H, W) images -> a (B, channels[i], h_i, w_i) map per stride (h_i = H / strides[i] for a flat trunk)."""
        trunk: Any = self.trunk
        maps = trunk.forward_intermediates(
            images, indices=self.indices, output_fmt="NCHW", intermediates_only=True, stop_early=True
        )
        if self.norms is not None:
            return [norm(x) for norm, x in zip(self.norms, maps, strict=True)]
        if self.pyramid is None:
            return maps
        check_tiling(self.name, maps[0].shape[-2:], self.pyramid.in_stride, images.shape[-2:])
        return self.pyramid(maps)
