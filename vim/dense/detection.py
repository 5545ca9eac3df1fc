"""torchvision-style detection and segmentation backbones of every image family.

API::

    import vim.dense
    from torchvision.models.detection import FasterRCNN

    backbone = vim.dense.backbone("vmamba_tiny_s1l8", pretrained=True)   # FPN of width 256: keys "0".."3", "pool"
    detector = FasterRCNN(backbone, num_classes=91)                     # reads backbone.out_channels (256)
    maps = vim.dense.backbone("test_vim", fpn=False, patch_size=16, stride=16)(images)   # the raw maps "0".."3"

:func:`backbone` creates the model as ``timm.create_model`` does (so ``pretrained=True`` and
``pretrained_cfg_overlay=dict(file=...)`` load the same weights through the family's filter), without its classifier,
and returns a :class:`DenseBackbone`: the :class:`~vim.dense.features.PyramidFeatures` of the model (maps at strides 4
/ 8 / 16 / 32), then, as torchvision's ``BackboneWithFPN``, its ``FeaturePyramidNetwork`` with a ``LastLevelMaxPool``
(a fifth map "pool" at stride 64), as ``resnet_fpn_backbone`` builds it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

from vim.models.loading import create_model

from .checkpoints import load_dense_parts
from .features import PyramidFeatures

__all__ = ["DenseBackbone", "backbone"]


class DenseBackbone(nn.Module):
    """Feature maps for torchvision's detection models (and any dense head): ``body``'s maps under the keys "0".."3"
    (strides 4 / 8 / 16 / 32), through ``fpn`` when there is one.

    Args:
        body: the maps at strides 4 / 8 / 16 / 32.
        fpn_channels: the width of a torchvision ``FeaturePyramidNetwork`` (with ``LastLevelMaxPool``: one more map,
            "pool", at stride 64) on the maps, None for the maps as they are.

    Attributes:
        out_channels: the FPN's width (an int, what torchvision's detection heads read), or each raw map's channel
            count (a list) without an FPN.
    """

    fpn: FeaturePyramidNetwork | None
    out_channels: int | list[int]

    def __init__(self, body: PyramidFeatures, fpn_channels: int | None = 256) -> None:
        super().__init__()
        self.body = body
        if fpn_channels is None:
            self.fpn = None
            self.out_channels = list(body.channels)
        else:
            self.fpn = FeaturePyramidNetwork(list(body.channels), fpn_channels, extra_blocks=LastLevelMaxPool())
            self.out_channels = fpn_channels

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """(B, 3, H, W) images -> OrderedDict "0".."3" of maps at strides 4 / 8 / 16 / 32 ((B, out_channels, h_i, w_i)
        with the FPN, then "pool" at stride 64; (B, out_channels[i], h_i, w_i) without)."""
        maps = OrderedDict((str(i), x) for i, x in enumerate(self.body(images)))
        return maps if self.fpn is None else self.fpn(maps)


def backbone(
    name: str,
    pretrained: bool = False,
    fpn: bool = True,
    out_channels: int = 256,
    layers: Sequence[int] | None = None,
    loaded_elsewhere: tuple[str, ...] = (),
    **model_kwargs: Any,
) -> DenseBackbone:
    """A torchvision-style backbone of the registered image model ``name``; see the module docstring.

    Args:
        name: a timm name of ours (``vmamba_tiny_s1l8``, ``mambavision_tiny.in1k``, ``vim_small_patch16_224``).
        pretrained: load the released weights of the name's tag, or the file ``pretrained_cfg_overlay=dict(file=...)``
            names, exactly as ``timm.create_model`` does; from a detection or segmentation checkpoint (VMamba's Mask
            R-CNN, UperNet) the output norms and an FPN neck too (:mod:`vim.dense.checkpoints`).
        fpn: pass the maps through a ``FeaturePyramidNetwork`` (+ ``LastLevelMaxPool``); False: the raw maps.
        out_channels: the FPN's width.
        layers: a flat trunk's blocks to build the pyramid from (see :class:`~vim.dense.features.PyramidFeatures`).
        loaded_elsewhere: key prefixes of such a checkpoint that the caller loads (a head), left out of the warning
            that names what was not loaded.
        model_kwargs: more ``timm.create_model`` arguments (``drop_path_rate``, ``img_size``, ``pretrained_cfg_overlay``).

    Raises:
        ValueError: an unknown name (listing close ones), ``layers`` that the model cannot give, or a weights file
            whose keys do not fit (naming them).
    """
    model = create_model(name, pretrained=pretrained, num_classes=0, **model_kwargs)
    dense = DenseBackbone(PyramidFeatures(model, layers), out_channels if fpn else None)
    file = (model_kwargs.get("pretrained_cfg_overlay") or {}).get("file")
    if pretrained and file:  # a detection / segmentation checkpoint: its output norms and neck too
        load_dense_parts(dense, file, loaded_elsewhere)
    return dense
