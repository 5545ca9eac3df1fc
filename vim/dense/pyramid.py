"""The simple feature pyramid of a flat trunk: maps at strides 4 / 8 / 16 / 32 from its one token grid.

API::

    pyramid = SimpleFeaturePyramid(dim=192, in_stride=16)   # Vim-Ti's blocks: a (B, 192, H/16, W/16) map each
    maps = pyramid([block_23])                               # every level from one map: 4 maps (B, 192, H/s, W/s)
    maps = pyramid([block_5, block_11, block_17, block_23])  # level i from map i, as Vim's segmentation backbone

ViTDet's simple pyramid (Li et al. 2022, arXiv 2203.16527), as Vim's segmentation backbone (hustvl/Vim,
``seg/backbone/vim.py``) applies it: from a stride-16 map, two 2x2 stride-2 transposed convs with a norm and GELU
between them to stride 4, one transposed conv to stride 8, the map itself at 16, a 2x2 max-pool to 32; each level
keeps the trunk's width D (Vim's, BEiT's). The norm is ViTDet's channel LayerNorm rather than Vim's SyncBatchNorm: it
does not depend on the batch, which detection keeps small. A trunk at another stride gets the same steps by powers
of two (stride 8: one transposed conv to 4, the map at 8, max-pools of 2 and 4).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from timm.layers import LayerNorm2d
from torch import nn

__all__ = ["STRIDES", "SimpleFeaturePyramid", "resampling"]

STRIDES = (4, 8, 16, 32)
"""The strides of the pyramid's levels, as torchvision's FPN backbones and smp's encoders take them."""


def _octaves(in_stride: int, stride: int) -> int:
    """How many halvings (> 0) or doublings (< 0) of resolution lead from ``in_stride`` to ``stride``: log2 of their
    ratio. ValueError unless the ratio is a power of two."""
    octaves = math.log2(stride / in_stride)
    if not octaves.is_integer():
        raise ValueError(f"a map at stride {in_stride} cannot be resampled to stride {stride} by factors of 2")
    return int(octaves)


def resampling(dim: int, in_stride: int, stride: int, device=None, dtype=None) -> nn.Module:
    """The module taking a (B, D, h, w) map at ``in_stride`` to (B, D, h * in_stride / stride, ...) at ``stride``.

    Finer: 2x2 stride-2 transposed convs (D -> D), each but the last followed by a channel LayerNorm and GELU. The
    same stride: the identity. Coarser: a max-pool of kernel and stride ``stride / in_stride``.
    """
    octaves = _octaves(in_stride, stride)
    if octaves > 0:
        return nn.MaxPool2d(kernel_size=2**octaves, stride=2**octaves)
    if octaves == 0:
        return nn.Identity()
    dd = {"device": device, "dtype": dtype}
    layers: list[nn.Module] = []
    for step in range(-octaves):
        if step > 0:
            layers += [LayerNorm2d(dim, **dd), nn.GELU()]
        layers.append(nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2, **dd))
    return nn.Sequential(*layers)


class SimpleFeaturePyramid(nn.Module):
    """Maps at ``strides`` (default 4 / 8 / 16 / 32) from a flat trunk's (B, D, h, w) maps at ``in_stride``; see the
    module docstring.

    Args:
        dim: the trunk's width D (every level keeps it).
        in_stride: the input pixels per token step of the trunk's maps (16 for Vim's patch-16 models).
        strides: the levels' strides, finest first.
    """

    def __init__(self, dim: int, in_stride: int, strides: Sequence[int] = STRIDES, device=None, dtype=None) -> None:
        super().__init__()
        self.in_stride = in_stride
        self.strides = tuple(strides)
        self.levels = nn.ModuleList(resampling(dim, in_stride, stride, device, dtype) for stride in self.strides)

    def forward(self, maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """One (B, D, h, w) map for every level, or one map per level (level i from map i) -> a (B, D, h_i, w_i) map per
        level, h_i = h * in_stride / strides[i]."""
        if len(maps) not in (1, len(self.levels)):
            raise ValueError(f"the pyramid takes 1 map (for every level) or {len(self.levels)} (one per level), got {len(maps)}")
        sources = list(maps) * len(self.levels) if len(maps) == 1 else maps
        return [level(source) for level, source in zip(self.levels, sources)]
