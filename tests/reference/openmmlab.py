"""The necks of the OpenMMLab models that VMamba's released detection checkpoints hold, re-written for the tests from
mmdetection 3.x's code: parameter shapes and the forward.

Nothing here uses ``vim`` or torchvision's detection code.

* :func:`mmdet_fpn_shapes`, :func:`mmdet_fpn_forward`: mmdetection's ``FPN`` (``mmdet/models/necks/fpn.py``) of the
  Mask R-CNN configs (``out_channels`` 256, ``num_outs`` 5, ``start_level`` 0, no extra convs, no norm, no
  activation, ``upsample_cfg=dict(mode="nearest")``): ``lateral_convs[i]`` and ``fpn_convs[i]`` are ``ConvModule``
  s holding their conv (with bias) as ``.conv``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mmdet_fpn_shapes(in_channels: list[int], out_channels: int = 256, prefix: str = "neck.") -> dict[str, tuple]:
    """The keys and shapes of ``FPN(in_channels, out_channels, num_outs=len(in_channels) + 1)``'s state dict."""
    shapes = {}
    for i, channels in enumerate(in_channels):
        shapes[f"{prefix}lateral_convs.{i}.conv.weight"] = (out_channels, channels, 1, 1)
        shapes[f"{prefix}lateral_convs.{i}.conv.bias"] = (out_channels,)
    for i in range(len(in_channels)):
        shapes[f"{prefix}fpn_convs.{i}.conv.weight"] = (out_channels, out_channels, 3, 3)
        shapes[f"{prefix}fpn_convs.{i}.conv.bias"] = (out_channels,)
    return shapes


def mmdet_fpn_forward(sd: dict[str, torch.Tensor], maps: list[torch.Tensor], prefix: str = "neck.") -> list[torch.Tensor]:
    """``FPN.forward`` in float64: the (B, C_i, H_i, W_i) maps, finest first -> ``len(maps) + 1`` (B, 256, h, w) maps.

    Laterals (1x1 convs), then from the coarsest down each lateral plus the coarser one resized to its size by nearest
    neighbour, a 3x3 conv (padding 1) on each, and the extra level: ``max_pool2d(kernel 1, stride 2)`` of the last.
    """
    sd = {k: v.double() for k, v in sd.items() if k.startswith(prefix)}
    laterals = [
        F.conv2d(x.double(), sd[f"{prefix}lateral_convs.{i}.conv.weight"], sd[f"{prefix}lateral_convs.{i}.conv.bias"])
        for i, x in enumerate(maps)
    ]
    for i in range(len(laterals) - 1, 0, -1):
        laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[2:], mode="nearest")
    outs = [
        F.conv2d(x, sd[f"{prefix}fpn_convs.{i}.conv.weight"], sd[f"{prefix}fpn_convs.{i}.conv.bias"], padding=1)
        for i, x in enumerate(laterals)
    ]
    return [*outs, F.max_pool2d(outs[-1], 1, stride=2)]
