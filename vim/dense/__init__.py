"""Dense prediction: every image family as a backbone of torchvision's detection models and of segmentation decoders.

API::

    import vim.dense
    backbone = vim.dense.backbone("vmamba_tiny_s1l8", pretrained=True)   # FPN maps "0".."3", "pool"; out_channels 256
    raw = vim.dense.backbone("vim_tiny_patch16_224", fpn=False)           # 4 maps at strides 4..32, out_channels a list

Modules: :mod:`.pyramid` (the simple feature pyramid of a flat trunk), :mod:`.features` (any image model as four maps
at strides 4 / 8 / 16 / 32, through ``forward_intermediates``), :mod:`.detection` (the torchvision-style backbone, with
torchvision's FPN), :mod:`.checkpoints` (VMamba's released Mask R-CNN and UperNet checkpoints: the output norms and
the FPN neck), and :mod:`.segmentation` (segmentation_models_pytorch's UPerNet on those maps; it needs that package,
so it is not imported here).
"""

from .detection import DenseBackbone, backbone
from .features import PyramidFeatures
from .pyramid import STRIDES, SimpleFeaturePyramid

__all__ = ["STRIDES", "DenseBackbone", "PyramidFeatures", "SimpleFeaturePyramid", "backbone"]
