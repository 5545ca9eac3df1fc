"""segmentation_models_pytorch (smp) on the four maps of :mod:`vim.dense`: UPerNet on any image family, Vim included.

API (needs ``pip install segmentation-models-pytorch``)::

    from vim.dense.segmentation import SmpEncoder, UPerNet
    model = UPerNet("vim_tiny_patch16_224", classes=150, pretrained=True)   # smp's UPerNet decoder on Vim's pyramid
    masks = model(images)                                                   # (B, 3, H, W) -> (B, 150, H, W)
    encoder = SmpEncoder(vim.dense.backbone("vim_tiny_patch16_224", fpn=False))   # for another smp decoder

smp builds the hierarchical families from their timm names (``smp.UPerNet(encoder_name="tu-vmamba_tiny_s1l8")``,
``smp.FPN``, ``smp.Unet``: their ``features_only`` maps are at reductions 4 / 8 / 16 / 32, a "transformer-style"
encoder to smp) and Vim in ``smp.DPT`` (``encoder_name="tu-vim_tiny_patch16_224"``, through ``forward_intermediates``
with the class token). Its UPerNet cannot take Vim by name: every block of a flat trunk is at one stride. Here
:class:`SmpEncoder` gives smp's encoder contract on the maps of :func:`vim.dense.backbone` (the simple feature pyramid
of a flat trunk, the stages of a hierarchical one), and :class:`UPerNet` is smp's UPerNet (its decoder and
segmentation head, their init) on that encoder.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

try:
    from segmentation_models_pytorch.base import SegmentationHead, SegmentationModel
    from segmentation_models_pytorch.decoders.upernet.decoder import UPerNetDecoder
except ImportError as error:  # an install without the dense extra
    raise ImportError(
        f"vim.dense.segmentation needs segmentation-models-pytorch: pip install 'vim-toolkit[dense]' ({error})"
    ) from error

from vim.models.checkpoint import is_dense_checkpoint, load_official_checkpoint
from vim.models.loading import TrainingCheckpoint

from .checkpoints import decode_head_weights
from .detection import DenseBackbone, backbone

__all__ = ["HEAD_LAYOUTS", "MmsegClassifier", "SmpEncoder", "UPerNet"]

_logger = logging.getLogger(__name__)

ENCODER_DEPTH = 5
"""smp's encoder depth of four maps at strides 4 to 32: its features are the image, a stride-2 one, then the maps."""


class SmpEncoder(nn.Module):
    """smp's encoder contract (a "transformer-style" one, as its timm encoder gives it for maps that start at stride 4)
    on a :func:`vim.dense.backbone` built with ``fpn=False``.

    ``forward`` returns smp's feature list: the (B, C, H, W) images, an empty (B, 0, H/2, W/2) stand-in for stride 2,
    then the four (B, C_i, H/s, W/s) maps at s = 4, 8, 16, 32; ``out_channels`` lists their channel counts, and
    ``output_stride`` is 32 (smp's models check the input sides against it).
    """

    output_stride = 32

    def __init__(self, dense: DenseBackbone, in_channels: int = 3) -> None:
        super().__init__()
        if dense.fpn is not None:
            raise ValueError("SmpEncoder takes the raw maps: build the backbone with vim.dense.backbone(name, fpn=False)")
        self.dense = dense
        self.out_channels = [in_channels, 0, *dense.body.channels]

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """(B, C, H, W) images -> [images, (B, 0, H/2, W/2), then (B, C_i, H/s, W/s) for s = 4, 8, 16, 32]."""
        batch, _, height, width = images.shape
        stand_in = images.new_empty(batch, 0, height // 2, width // 2)
        return [images, stand_in, *self.dense(images).values()]


class MmsegClassifier(nn.Module):
    """mmsegmentation's classifier of a decode head (``cls_seg``) and its resize to the image: dropout, a 1x1 conv to the
    classes, bilinear upsampling without corner alignment. (B, C, h, w) -> (B, classes, h * upsampling, w * upsampling).
    """

    def __init__(self, channels: int, classes: int, upsampling: int = 4, dropout: float = 0.1) -> None:
        super().__init__()
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, classes, kernel_size=1)
        self.upsampling = upsampling

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(self.dropout(features))
        return F.interpolate(logits, scale_factor=self.upsampling, mode="bilinear", align_corners=False)


HEAD_LAYOUTS = ("smp", "mmseg")


class UPerNet(SegmentationModel):
    """smp's UPerNet (``smp.UPerNet``'s decoder, segmentation head and their init) on the maps of any image family.

    ``head_layout="mmseg"`` makes it mmsegmentation's ``UPerHead`` (the UperNet of Vim's, VMamba's and MambaVision's
    papers): smp's decoder computes the same pyramid pooling, laterals, top-down sums, output convs and fusion, so it
    keeps them and drops only its LayerNorms on the input maps, which mmseg's head does not have; the classifier is
    mmseg's (:class:`MmsegClassifier`). Then a VMamba UperNet checkpoint (``pretrained_cfg_overlay=dict(file=...)``)
    fills the whole model: the trunk, its output norms, and the decode head (:data:`vim.dense.checkpoints.DECODE_HEAD`;
    its classifier only for the same number of classes). The auxiliary FCN head, a training aid, is left out.

    Args:
        name: a timm name of ours (``vim_tiny_patch16_224``, ``vmamba_tiny_s1l8``, ``test_vim``).
        classes: output channels (classes).
        pretrained: the released weights of the name's tag, or ``pretrained_cfg_overlay=dict(file=...)``'s file.
        layers: a flat trunk's blocks for the pyramid (see :class:`~vim.dense.features.PyramidFeatures`).
        decoder_channels, decoder_use_norm, activation, upsampling: as ``smp.UPerNet`` takes them.
        head_layout: "smp" (smp's UPerNet as it is) or "mmseg" (mmsegmentation's UPerHead, see above).
        model_kwargs: more ``timm.create_model`` arguments.
    """

    def __init__(
        self,
        name: str,
        classes: int = 1,
        pretrained: bool = False,
        layers: list[int] | None = None,
        decoder_channels: int = 256,
        decoder_use_norm: bool | str | dict[str, Any] = "batchnorm",
        activation: str | None = None,
        upsampling: int = 4,
        head_layout: str = "smp",
        **model_kwargs: Any,
    ) -> None:
        super().__init__()
        if head_layout not in HEAD_LAYOUTS:
            raise ValueError(f"head_layout {head_layout!r} is not one of {', '.join(HEAD_LAYOUTS)}")
        mmseg = head_layout == "mmseg"
        dense = backbone(
            name, pretrained, fpn=False, layers=layers, loaded_elsewhere=("decode_head.",) if mmseg else (), **model_kwargs
        )
        self.encoder = SmpEncoder(dense)
        self.decoder = UPerNetDecoder(self.encoder.out_channels, ENCODER_DEPTH, decoder_channels, decoder_use_norm)
        self.segmentation_head: nn.Module = SegmentationHead(
            decoder_channels, classes, kernel_size=1, activation=activation, upsampling=upsampling
        )
        if mmseg:
            self.decoder.feature_norms = nn.ModuleList(nn.Identity() for _ in self.decoder.feature_norms)
            self.segmentation_head = MmsegClassifier(decoder_channels, classes, upsampling)
        self.classification_head = None
        self.name = f"upernet-{name}"
        self.initialize()
        file = (model_kwargs.get("pretrained_cfg_overlay") or {}).get("file")
        if mmseg and pretrained and file:
            self.load_decode_head(file)

    def load_decode_head(self, path: str | os.PathLike) -> None:
        """Load an mmseg UperNet checkpoint's ``decode_head`` (nothing for a checkpoint without one); its classifier
        only when it has this model's number of classes (else it keeps its initialisation, as timm drops a head)."""
        state_dict = load_official_checkpoint(Path(path), mmap=True)
        if not is_dense_checkpoint(state_dict) or not any(key.startswith("decode_head.") for key in state_dict):
            return
        head = self.segmentation_head
        assert isinstance(head, MmsegClassifier)  # head_layout="mmseg"
        classes = head.classifier.out_channels
        weight = state_dict.get("decode_head.conv_seg.weight")
        ignore: tuple[str, ...] = ()
        if weight is not None and weight.shape[0] != classes:
            _logger.info("%s: %d classes, the model %d: its classifier is re-initialised", path, weight.shape[0], classes)
            state_dict = {key: value for key, value in state_dict.items() if not key.startswith("decode_head.conv_seg.")}
            ignore = ("segmentation_head.classifier.",)
        self.load_state_dict(decode_head_weights(state_dict, self, ignore), strict=False)

    @classmethod
    def from_training_checkpoint(cls, checkpoint: TrainingCheckpoint, use_ema: bool = True) -> UPerNet:
        """The UperNet of a segmentation run (``vimkit fit`` with a :class:`~vim.training.segmentation.Segmenter`)
        with its weights: the EMA ones when ``use_ema`` and the run kept them."""
        hp = checkpoint.hparams
        if checkpoint.model is None or "decoder_channels" not in hp:
            raise ValueError(f"checkpoint '{checkpoint.path}' is not a segmentation run's (no model and decoder settings)")
        layers, channels = hp.get("layers"), hp["decoder_channels"]
        model = cls(checkpoint.model, hp["num_classes"], layers=layers, decoder_channels=channels, **checkpoint.model_kwargs)
        model.load_state_dict(checkpoint.weights(use_ema))
        return model

    # ------------------------------------------------------------------ the trunk's layers for the optimizer
    TRUNK_PREFIX = "encoder.dense.body.trunk."

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """The trunk's layer groups (timm's ``group_matcher``) under this model's parameter names: timm's layer-wise lr
        decay reads them. The pyramid, decoder and head, which no pattern matches, form the last (top) group, as
        BEiT's and Vim's layer-decay optimizer puts the decode head above the backbone."""
        anchor = "^" + self.TRUNK_PREFIX.replace(".", r"\.")

        def prefixed(pattern: str) -> str:
            return pattern.replace("^", anchor)  # every alternative of a timm pattern is anchored with ^

        groups = self.trunk.group_matcher(coarse)
        return {key: prefixed(v) if isinstance(v, str) else [(prefixed(p), order) for p, order in v] for key, v in groups.items()}

    def no_weight_decay(self) -> set[str]:
        """The trunk's parameters that take no weight decay (position embeddings, class tokens), under this model's names."""
        return {self.TRUNK_PREFIX + name for name in self.trunk.no_weight_decay()}

    # ------------------------------------------------------------------ the input contract export reads (the trunk's)
    output_name = "logits"
    """What the exported graph calls its (B, classes, H, W) output."""

    @property
    def trunk(self) -> Any:
        """The backbone (a timm model of ours: its input contract is this model's)."""
        return self.encoder.dense.body.trunk

    @property
    def modality(self) -> str:
        return self.trunk.modality

    @property
    def input_kind(self) -> str:
        return self.trunk.input_kind

    @property
    def export_refusal(self) -> str | None:
        return self.trunk.export_refusal

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        return self.trunk.pretrained_cfg

    def nominal_input_shape(self) -> tuple[int, ...]:
        """One image's (3, H, W) at the trunk's nominal size."""
        return tuple(self.trunk.nominal_input_shape())

    def set_input_size(self, img_size: int | tuple[int, int] | None = None) -> None:
        """Change the trunk's nominal image size (a flat trunk resamples its position embedding)."""
        self.trunk.set_input_size(img_size=img_size)
