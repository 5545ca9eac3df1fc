r"""VMamba's released detection and segmentation checkpoints (mmdetection Mask R-CNN, mmsegmentation UperNet) as the
start of a fine-tune: what of them the dense models take.

API::

    import vim.dense
    dense = vim.dense.backbone("vmamba_tiny_s1l8", pretrained=True,
                               pretrained_cfg_overlay=dict(file="mask_rcnn_vssm_fpn_coco_tiny_s_epoch_12.pth"))
    # the trunk, the four output norms and the FPN neck come from the file; rpn_head / roi_head are named in a warning

The files are mmengine checkpoints, ``{"meta": ..., "state_dict": {...}}``, their keys ``backbone.*`` (upstream's
``MM_VSSM``: the classification ``VSSM`` without its classifier, plus a LayerNorm2d ``outnorm{i}`` on each stage's
map), ``neck.*`` (Mask R-CNN's FPN) and the heads (``rpn_head.*``, ``roi_head.*``; ``decode_head.*``,
``auxiliary_head.*``). Each file is read by the one safe reader (:func:`vim.models.checkpoint.read_checkpoint`).
The trunk is loaded when timm creates the model, by the family's checkpoint filter
(:func:`~vim.models.checkpoint.trunk_of_dense_checkpoint`); :func:`load_dense_parts` then loads the rest of what the
:class:`~vim.dense.detection.DenseBackbone` has:

=========================================  ========================================
checkpoint                                 DenseBackbone
=========================================  ========================================
``backbone.outnorm{i}.*``                  ``body.norms.{i}.*``
``neck.lateral_convs.{i}.conv.*``          ``fpn.inner_blocks.{i}.0.*``
``neck.fpn_convs.{i}.conv.*``              ``fpn.layer_blocks.{i}.0.*``
=========================================  ========================================

mmdetection's FPN of these configs (``in_channels`` the four maps, ``out_channels`` 256, ``num_outs`` 5, no extra
convs, no norm, nearest upsampling to the finer lateral's size) is torchvision's ``FeaturePyramidNetwork`` with
``LastLevelMaxPool``: 1x1 lateral convs with bias, each lateral plus the nearest-resized coarser sum, 3x3 output
convs with bias, a fifth level that is the last output max-pooled by kernel 1, stride 2. The heads are not loaded
(a warning names them): the detectors are torchvision's, built by the caller, and smp's UPerNet decoder is not
mmsegmentation's UPerHead (``docs/dense.md``, "Starting from VMamba's detection and segmentation checkpoints").
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from vim.models.checkpoint import (
    KeyRules,
    checked,
    described_groups,
    is_dense_checkpoint,
    load_official_checkpoint,
    rename_key,
)

__all__ = ["DECODE_HEAD", "DENSE_PARTS", "NECK", "OUT_NORMS", "decode_head_weights", "dense_parts", "load_dense_parts"]

OUT_NORMS: KeyRules = [(re.compile(r"^backbone\.outnorm(\d+)\."), lambda m: f"body.norms.{m[1]}.")]
NECK: KeyRules = [
    (re.compile(r"^neck\.lateral_convs\.(\d+)\.conv\."), lambda m: f"fpn.inner_blocks.{m[1]}.0."),
    (re.compile(r"^neck\.fpn_convs\.(\d+)\.conv\."), lambda m: f"fpn.layer_blocks.{m[1]}.0."),
]
CONV_MODULE = {"conv": "0", "bn": "1"}
"""An mmcv ``ConvModule``'s parts (``.conv``, ``.bn``) as smp's ``Conv2dReLU`` numbers them (a conv, its norm, ReLU)."""
FPN_LEVELS = 3
"""UperNet's lateral / output convs: one for each of the maps at strides 4, 8, 16 (mmseg numbers them finest first,
smp coarsest first)."""
DECODE_HEAD: KeyRules = [
    (
        re.compile(r"^decode_head\.psp_modules\.(\d+)\.1\.(conv|bn)\."),
        lambda m: f"decoder.psp.blocks.{m[1]}.1.{CONV_MODULE[m[2]]}.",
    ),
    (re.compile(r"^decode_head\.bottleneck\.(conv|bn)\."), lambda m: f"decoder.psp.out_conv.{CONV_MODULE[m[1]]}."),
    (
        re.compile(r"^decode_head\.lateral_convs\.(\d+)\.(conv|bn)\."),
        lambda m: f"decoder.fpn_lateral_blocks.{FPN_LEVELS - 1 - int(m[1])}.conv_norm_relu.{CONV_MODULE[m[2]]}.",
    ),
    (
        re.compile(r"^decode_head\.fpn_convs\.(\d+)\.(conv|bn)\."),
        lambda m: f"decoder.fpn_conv_blocks.{FPN_LEVELS - 1 - int(m[1])}.{CONV_MODULE[m[2]]}.",
    ),
    (re.compile(r"^decode_head\.fpn_bottleneck\.(conv|bn)\."), lambda m: f"decoder.fusion_block.{CONV_MODULE[m[1]]}."),
    (re.compile(r"^decode_head\.conv_seg\."), lambda m: "segmentation_head.classifier."),
]
"""mmsegmentation's ``UPerHead`` in the :class:`~vim.dense.segmentation.UPerNet` of ``head_layout="mmseg"`` (smp's
decoder without its input norms, mmseg's classifier): the pyramid pooling, its bottleneck, the lateral and output
convs (numbered from the other end), the fusion and the classifier."""

DENSE_PARTS: dict[str, tuple[re.Pattern[str], KeyRules]] = {
    "body.norms.": (re.compile(r"^backbone\.outnorm\d+\."), OUT_NORMS),
    "fpn.": (re.compile(r"^neck\."), NECK),
}
"""The parts of a :class:`~vim.dense.detection.DenseBackbone` that a detection / segmentation checkpoint fills: the
pattern of their keys in the file (a key of theirs that no rule renames is unexpected) and their key rules."""


def dense_parts(state_dict: Mapping[str, torch.Tensor], dense: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The tensors of an unwrapped detection / segmentation state dict for the output norms and FPN of ``dense`` (a
    :class:`~vim.dense.detection.DenseBackbone`), under its names, and the keys left out (the heads; a neck when
    ``dense`` has no FPN). The trunk's ``backbone.*`` keys are neither (the family's filter takes them).

    Raises:
        ValueError: naming the keys of a part that ``dense`` has but the checkpoint does not fill (missing), the
            checkpoint's keys of such a part that ``dense`` lacks (unexpected), or a tensor of the wrong shape.
    """
    expected = dense.state_dict()
    taken: dict[str, torch.Tensor] = {}
    file_keys: dict[str, str] = {}  # ours -> the file's
    left_out = []
    for key, value in state_dict.items():
        part = next((part for part, (pattern, _) in DENSE_PARTS.items() if pattern.match(key)), None)
        if part is None:
            if not key.startswith("backbone."):
                left_out.append(key)
        elif not any(name.startswith(part) for name in expected):
            left_out.append(key)  # a neck without an FPN here
        else:
            name = rename_key(key, DENSE_PARTS[part][1])
            file_keys[name], taken[name] = key, value
    # the output norms are always the file's (MM_VSSM has them); a neck only when the file has one (UperNet's has none)
    required = ("body.norms.", *(part for part in DENSE_PARTS if any(key.startswith(part) for key in taken)))
    missing = [key for key in expected if key.startswith(required) and key not in taken]
    unexpected = [file_keys[key] for key in taken if key not in expected]
    if missing or unexpected:
        raise ValueError(
            f"detection / segmentation checkpoint does not fit the {type(dense).__name__}: missing keys "
            f"{sorted(missing)} (the model's names; the checkpoint's in vim.dense.checkpoints' table), unexpected keys "
            f"{sorted(unexpected)}"
        )
    return {key: checked(key, value, expected) for key, value in taken.items()}, left_out


def decode_head_weights(
    state_dict: Mapping[str, torch.Tensor], model: nn.Module, ignore: tuple[str, ...] = ()
) -> dict[str, torch.Tensor]:
    """The ``decode_head.*`` tensors of an unwrapped mmseg UperNet state dict under the names of ``model``, a
    :class:`~vim.dense.segmentation.UPerNet` of ``head_layout="mmseg"`` (:data:`DECODE_HEAD`).

    Raises:
        ValueError: naming the decoder's keys that the file does not fill, the file's head keys the model lacks, or a
            tensor of the wrong shape.
    """
    expected = model.state_dict()
    taken = {rename_key(key, DECODE_HEAD): value for key, value in state_dict.items() if key.startswith("decode_head.")}
    ours = [key for key in expected if key.startswith(("decoder.", "segmentation_head.")) and not key.startswith(ignore)]
    missing = [key for key in ours if key not in taken and not key.endswith("num_batches_tracked")]  # BatchNorm's count
    unexpected = [key for key in taken if key not in expected]
    if missing or unexpected:
        raise ValueError(
            f"the checkpoint's decode_head does not fit UperNet's decoder: missing keys {sorted(missing)}, unexpected keys "
            f"{sorted(unexpected)} (the model's names; the checkpoint's in vim.dense.checkpoints.DECODE_HEAD)"
        )
    return {key: checked(key, value, expected) for key, value in taken.items()}


def load_dense_parts(dense: nn.Module, path: str | os.PathLike, loaded_elsewhere: tuple[str, ...] = ()) -> list[str]:
    """Load the output norms and the FPN neck of the detection / segmentation checkpoint at ``path`` into ``dense``, a
    :class:`~vim.dense.detection.DenseBackbone` (see :func:`dense_parts`); nothing for another checkpoint. Warns once
    naming the keys left out, but for those starting with ``loaded_elsewhere`` (a head its caller loads).

    Returns:
        The checkpoint's keys left out.
    """
    state_dict = load_official_checkpoint(Path(path), mmap=True)  # the trunk's reading, again: its tensors are not copied
    if not is_dense_checkpoint(state_dict):
        return []
    parts, left_out = dense_parts(state_dict, dense)
    dense.load_state_dict(parts, strict=False)
    left_out = [key for key in left_out if not key.startswith(loaded_elsewhere)]
    if left_out:
        warnings.warn(
            f"{os.fspath(path)!r}: {described_groups(left_out)} not loaded: vim.dense builds no module of the same "
            "architecture (see docs/dense.md, 'Starting from VMamba's detection and segmentation checkpoints')",
            UserWarning,
            stacklevel=3,
        )
    return left_out
