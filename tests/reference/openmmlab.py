"""The necks of the OpenMMLab models that VMamba's released detection checkpoints hold, re-written for the tests from
mmdetection 3.x's code: parameter shapes and the forward.

Nothing here uses ``vim``, torchvision's detection code or smp.

* :func:`mmdet_fpn_shapes`, :func:`mmdet_fpn_forward`: mmdetection's ``FPN`` (``mmdet/models/necks/fpn.py``) of the
  Mask R-CNN configs (``out_channels`` 256, ``num_outs`` 5, ``start_level`` 0, no extra convs, no norm, no
  activation, ``upsample_cfg=dict(mode="nearest")``): ``lateral_convs[i]`` and ``fpn_convs[i]`` are ``ConvModule``
  s holding their conv (with bias) as ``.conv``.
* :func:`mmseg_uperhead_shapes`, :func:`mmseg_uperhead_forward`: mmsegmentation 1.x's ``UPerHead``
  (``mmseg/models/decode_heads/uper_head.py``, ``pool_scales`` (1, 2, 3, 6), ``align_corners=False``, BatchNorm) in
  eval mode, and the segmentor's resize of its logits to the image (``EncoderDecoder``): each ``ConvModule`` is a conv
  without bias, ``.bn``, ReLU.
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


POOL_SCALES = (1, 2, 3, 6)


def mmseg_uperhead_shapes(in_channels: list[int], channels: int, classes: int, prefix: str = "decode_head.") -> dict:
    """The keys and shapes of ``UPerHead(in_channels, channels, num_classes=classes)``'s state dict (BatchNorm)."""
    shapes: dict[str, tuple] = {}

    def conv_module(name: str, out_channels: int, in_channels: int, kernel: int) -> None:
        shapes[f"{prefix}{name}.conv.weight"] = (out_channels, in_channels, kernel, kernel)
        for key in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}{name}.bn.{key}"] = (out_channels,)

    for i in range(len(POOL_SCALES)):
        conv_module(f"psp_modules.{i}.1", channels, in_channels[-1], 1)
    conv_module("bottleneck", channels, in_channels[-1] + len(POOL_SCALES) * channels, 3)
    for i, width in enumerate(in_channels[:-1]):
        conv_module(f"lateral_convs.{i}", channels, width, 1)
        conv_module(f"fpn_convs.{i}", channels, channels, 3)
    conv_module("fpn_bottleneck", channels, len(in_channels) * channels, 3)
    shapes[f"{prefix}conv_seg.weight"], shapes[f"{prefix}conv_seg.bias"] = (classes, channels, 1, 1), (classes,)
    return shapes


def _conv_module(sd: dict[str, torch.Tensor], name: str, x: torch.Tensor) -> torch.Tensor:
    """mmcv's ``ConvModule`` (conv without bias, BatchNorm of eps 1e-5 in eval mode, ReLU); "same" padding."""
    weight = sd[f"{name}.conv.weight"]
    x = F.conv2d(x, weight, padding=weight.shape[-1] // 2)
    bn = {key: sd[f"{name}.bn.{key}"] for key in ("weight", "bias", "running_mean", "running_var")}
    x = F.batch_norm(x, bn["running_mean"], bn["running_var"], bn["weight"], bn["bias"], training=False, eps=1e-5)
    return F.relu(x)


def _resize(x: torch.Tensor, size: torch.Size | tuple[int, int]) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def mmseg_uperhead_forward(
    sd: dict[str, torch.Tensor], maps: list[torch.Tensor], image_size: tuple[int, int], prefix: str = "decode_head."
) -> torch.Tensor:
    """``UPerHead.forward`` then the resize to the image, in float64: (B, C_i, H_i, W_i) maps, finest first -> logits
    (B, classes, *image_size).

    The pyramid pooling of the coarsest map (pooled to 1, 2, 3, 6, a ConvModule each, resized back, concatenated
    with the map, a 3x3 ``bottleneck``) is the top lateral; 1x1 ConvModules of the others are the rest; from the top
    down each lateral gains the coarser one resized; 3x3 ``fpn_convs`` on all but the top; all resized to the finest,
    concatenated, a 3x3 ``fpn_bottleneck``, the 1x1 ``conv_seg`` (dropout is off in eval), resized to the image.
    """
    sd = {key.removeprefix(prefix): value.double() for key, value in sd.items() if key.startswith(prefix)}
    maps = [x.double() for x in maps]
    top = maps[-1]
    pooled = [_resize(_conv_module(sd, f"psp_modules.{i}.1", F.adaptive_avg_pool2d(top, scale)), top.shape[2:])
              for i, scale in enumerate(POOL_SCALES)]  # fmt: skip
    laterals = [_conv_module(sd, f"lateral_convs.{i}", x) for i, x in enumerate(maps[:-1])]
    laterals.append(_conv_module(sd, "bottleneck", torch.cat([top, *pooled], dim=1)))
    for i in range(len(laterals) - 1, 0, -1):
        laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[2:])
    outs = [_conv_module(sd, f"fpn_convs.{i}", laterals[i]) for i in range(len(laterals) - 1)] + [laterals[-1]]
    outs = [outs[0]] + [_resize(x, outs[0].shape[2:]) for x in outs[1:]]
    features = _conv_module(sd, "fpn_bottleneck", torch.cat(outs, dim=1))
    return _resize(F.conv2d(features, sd["conv_seg.weight"], sd["conv_seg.bias"]), image_size)
