r"""VMamba (Liu et al. 2024, MzeroMiko/VMamba) on the shared hierarchical trunk, registered with timm under its
official names.

API::

    import vim, timm
    model = timm.create_model("vmamba_tiny_s1l8")                      # VMamba-T[s1l8], 30,249,064 parameters
    model = timm.create_model("vmamba_small_s2l15.in1k", pretrained=True)   # the released ImageNet-1k weights
    maps = timm.create_model("vmamba_base_s2l15", features_only=True)(images)   # 4 NCHW maps, reductions 4 to 32
    official = to_official_state_dict(model.state_dict())              # upstream's key names, to load into its VSSM

The network is upstream's ``VSSM`` of the released v2 classifiers (``classification/models/vmamba.py``, configs
``vmambav2v_tiny_224.yaml``, ``vmambav2_small_224.yaml``, ``vmambav2_base_224.yaml``): the "v2" patch embed (conv
3x3 stride 2 -> LayerNorm -> GELU -> conv 3x3 stride 2 -> LayerNorm), four stages of blocks ``x + SS2D(norm(x))``,
``x + Mlp(norm2(x))`` (GELU, ratio 4) at reductions 4 / 8 / 16 / 32, the "v3" downsampling between stages (conv 3x3
stride 2 -> LayerNorm), then LayerNorm, global average pooling and a linear head. Every norm is a LayerNorm of eps
1e-5 over the channels. Upstream's ``ln2d`` models run channels-first (``LayerNorm2d``, ``Linear2d`` as a 1x1
conv); here the tokens are channels-last (B, L, C) and the same numbers come out of the same weights
(``Linear2d``'s weights are 2-D, as ``nn.Linear``'s).

The blocks are :class:`~vim.models.block.MambaBlock` (mixer :class:`~vim.models.ss2d.SS2D` given its stage's grid,
timm's ``Mlp``), so the residual stream is float32 and each add + norm is fused. Stochastic depth follows
upstream's schedule, ``linspace(0, drop_path_rate, sum(depths))`` over all blocks (0.2 / 0.3 / 0.6 for T / S / B
in the configs). The shared block applies each rate one branch late (see
:func:`~vim.models.backbone.drop_path_schedule`): a block's MLP output gets its own rate, as upstream, except at a
stage's end (the block before's), and its SS2D output the block before's; the final norm's input the full rate.

Names: the module tree keeps the shared trunk's names; :func:`checkpoint_filter_fn` maps upstream's keys onto them
and :func:`to_official_state_dict` back:

==========================================  ==========================================
upstream                                    here
==========================================  ==========================================
``patch_embed.{0,2,5,7}.*``                 the same
``layers.{i}.blocks.{j}.op.*``              ``stages.{i}.blocks.{j}.mixer.*``
``layers.{i}.blocks.{j}.{norm,norm2,mlp}``  ``stages.{i}.blocks.{j}.{norm,norm2,mlp}``
``layers.{i}.downsample.{1,3}.*``           ``stages.{i+1}.downsample.{conv,norm}.*``
``classifier.norm.*``, ``classifier.head``  ``norm_f.*``, ``head.*``
==========================================  ==========================================

The released Mask R-CNN and UperNet checkpoints hold upstream's dense backbone ``MM_VSSM`` under ``backbone.``: the
same keys without the classifier, and a LayerNorm2d ``outnorm{i}`` per stage map, which :attr:`VMamba.stage_out_norm`
declares for :mod:`vim.dense` (see :mod:`vim.dense.checkpoints`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import LayerNorm2d, to_2tuple
from timm.models import generate_default_cfgs, register_model
from torch import nn

from .block import PartFactory, gelu_mlp
from .builder import build_backbone
from .checkpoint import (
    KeyRules,
    is_dense_checkpoint,
    rename_key,
    renamed_state_dict,
    trunk_of_dense_checkpoint,
    unwrap_state_dict,
)
from .hierarchical import GridDownsample, HierarchicalImageBackbone
from .ss2d import SS2D

__all__ = ["VMamba", "checkpoint_filter_fn", "to_official_state_dict"]

REDUCTIONS = (4, 8, 16, 32)
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's and LayerNorm2d's default, upstream's every norm


class Permute(nn.Module):
    """``x.permute(*dims)``: the layout changes of the stem, where upstream's Sequential holds them (its indices)."""

    def __init__(self, *dims: int) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(*self.dims)


def patch_embed_v2(in_chans: int, embed_dim: int, norm_cls: PartFactory, device=None, dtype=None) -> nn.Sequential:
    """Upstream's ``_make_patch_embed_v2`` (patch size 4), tokens out: (B, C, H, W) -> (B, H/4 * W/4, embed_dim).

    conv 3x3 stride 2 (C -> embed_dim / 2) -> LayerNorm -> GELU -> conv 3x3 stride 2 -> LayerNorm; parameters at
    upstream's Sequential indices 0, 2, 5, 7 (the permutes sit where its channels-last variant has them), then the
    (H/4, W/4) grid flattened.
    """
    dd = {"device": device, "dtype": dtype}
    half = embed_dim // 2
    return nn.Sequential(
        nn.Conv2d(in_chans, half, kernel_size=3, stride=2, padding=1, **dd),
        Permute(0, 2, 3, 1),
        norm_cls(half, **dd),
        Permute(0, 3, 1, 2),
        nn.GELU(),
        nn.Conv2d(half, embed_dim, kernel_size=3, stride=2, padding=1, **dd),
        Permute(0, 2, 3, 1),
        norm_cls(embed_dim, **dd),
        nn.Flatten(1, 2),
    )


class VMamba(HierarchicalImageBackbone):
    """VMamba's ``VSSM`` (the v2 classifiers: ``v05_noz`` SS2D, patch embed v2, downsample v3); see the module docstring.

    Args:
        img_size: nominal image size (any size works; sides divisible by 32 give whole grids at every stage).
        in_chans: input channels.
        num_classes: classifier outputs, 0 for none.
        global_pool: "avg" (upstream's), "max" or "".
        dims: each stage's width.
        depths: each stage's number of blocks.
        d_state: SSM state size N.
        ssm_ratio: SS2D's inner width over the stage width.
        dt_rank: SS2D's step-size rank, "auto" for ``ceil(dim / 16)``.
        d_conv: SS2D's depthwise conv size.
        conv_bias: give SS2D's conv a bias.
        mlp_ratio: the MLP's hidden width over the stage width.
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth of the last block (linspace over all blocks from 0).
        kernel_backend: backend of the kernels, None for ``$VIM_SCAN_BACKEND`` or "auto".
    """

    stage_out_norm = partial(LayerNorm2d, eps=LAYER_NORM_EPS)  # upstream's MM_VSSM: outnorm{i}, a LayerNorm2d

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        dims: Sequence[int] = (96, 192, 384, 768),
        depths: Sequence[int] = (2, 2, 8, 2),
        d_state: int = 1,
        ssm_ratio: float = 1.0,
        dt_rank: int | str = "auto",
        d_conv: int = 3,
        conv_bias: bool = False,
        mlp_ratio: float = 4.0,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        kernel_backend: str | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        norm_cls = partial(nn.LayerNorm, eps=LAYER_NORM_EPS)
        self.img_size = to_2tuple(img_size)
        self.in_chans = in_chans
        self.init_head_attributes(num_classes, global_pool, dims[-1])
        self.patch_embed = patch_embed_v2(in_chans, dims[0], norm_cls, **dd)
        self.build_stages(
            dims, depths, drop_path_rate, "layernorm", LAYER_NORM_EPS, kernel_backend,
            mlp_cls=partial(gelu_mlp, mlp_ratio=mlp_ratio),
            mixer_cls=SS2D,
            downsample_cls=partial(GridDownsample, kernel_size=3, norm_cls=norm_cls),
            d_state=d_state, ssm_ratio=ssm_ratio, dt_rank=dt_rank, d_conv=d_conv, conv_bias=conv_bias, **dd,
        )  # fmt: skip
        self.head_drop = nn.Dropout(drop_rate)
        self.head = self.linear_head(num_classes, **dd)
        self.feature_info = self.describe_features(dims, REDUCTIONS[: len(dims)])
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, mode: str = "") -> None:
        """Upstream's init (``mode`` for timm): SS2D's own (``ssm_init="v0"``), then every Linear truncated normal
        (std 0.02, bias 0) and every LayerNorm ones / zeros, as ``VSSM._init_weights``; PyTorch's for the convs."""
        self.init_parts((nn.Conv2d, nn.LayerNorm, SS2D))

    def checkpoint_filter(self, state_dict: Mapping) -> dict[str, torch.Tensor]:
        return checkpoint_filter_fn(state_dict, self)


_DOWNSAMPLE_PARTS = {"1": "conv", "3": "norm"}  # upstream's Sequential(Permute, Conv2d, Permute, LayerNorm)

_TO_OURS: KeyRules = [
    (re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.op\."), lambda m: f"stages.{m[1]}.blocks.{m[2]}.mixer."),
    (re.compile(r"^layers\.(\d+)\.blocks\."), lambda m: f"stages.{m[1]}.blocks."),
    (
        re.compile(r"^layers\.(\d+)\.downsample\.([13])\."),
        lambda m: f"stages.{int(m[1]) + 1}.downsample.{_DOWNSAMPLE_PARTS[m[2]]}.",
    ),
    (re.compile(r"^classifier\.norm\."), lambda m: "norm_f."),
    (re.compile(r"^classifier\.head\."), lambda m: "head."),
]
_TO_OFFICIAL: KeyRules = [
    (re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.mixer\."), lambda m: f"layers.{m[1]}.blocks.{m[2]}.op."),
    (re.compile(r"^stages\.(\d+)\.blocks\."), lambda m: f"layers.{m[1]}.blocks."),
    (
        re.compile(r"^stages\.(\d+)\.downsample\.(conv|norm)\."),
        lambda m: f"layers.{int(m[1]) - 1}.downsample.{'1' if m[2] == 'conv' else '3'}.",
    ),
    (re.compile(r"^norm_f\."), lambda m: "classifier.norm."),
    (re.compile(r"^head\."), lambda m: "classifier.head."),
]


_OUT_NORMS = re.compile(r"^outnorm\d+\.")  # MM_VSSM's per-stage output norms, on the dense backbone's maps


def checkpoint_filter_fn(state_dict: Mapping, model: VMamba) -> dict[str, torch.Tensor]:
    """Map an official VMamba state dict (or a whole training checkpoint: weights under ``"model"``) onto ``model``.

    Upstream's keys are renamed (module docstring's table); our own keys (an exported model) pass unchanged. From a
    Mask R-CNN or UperNet checkpoint (mmdetection / mmsegmentation: ``MM_VSSM`` under ``backbone.``), the trunk is
    taken (:func:`~vim.models.checkpoint.trunk_of_dense_checkpoint`): the final norm and the classifier keep their
    initialisation, and the output norms ``outnorm{i}``, the neck and the heads are left out, as a log line says
    (:func:`vim.dense.backbone` loads the output norms into its maps' norms).

    Raises:
        ValueError: naming the key and both shapes, when a tensor cannot fit the model. The classifier and the stem's
            input channels are left to the loader, which adapts them to ``num_classes`` / ``in_chans``.
    """
    state_dict = unwrap_state_dict(state_dict)
    if is_dense_checkpoint(state_dict):
        state_dict = trunk_of_dense_checkpoint(state_dict, model, _OUT_NORMS)
    return renamed_state_dict(state_dict, model, _TO_OURS)


def to_official_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our VMamba state dict under upstream's key names (loads into its ``VSSM`` of the same config)."""
    return {rename_key(key, _TO_OFFICIAL): value for key, value in state_dict.items()}


_RELEASES = "https://github.com/MzeroMiko/VMamba/releases/download/%23v2cls/"


def _cfg(url: str = "", **kwargs: Any) -> dict[str, Any]:
    return {
        "url": url,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "min_input_size": (3, 32, 32),
        "pool_size": (7, 7),
        "crop_pct": 0.875,  # upstream's eval: resize to 256 / 224 of the size, centre crop
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.0",
        "classifier": "head",  # upstream's classifier.head, under this model's name (what the loader reads)
        "license": "mit",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "vmamba_tiny_s1l8.in1k": _cfg(_RELEASES + "vssm1_tiny_0230s_ckpt_epoch_264.pth"),
        "vmamba_small_s2l15.in1k": _cfg(_RELEASES + "vssm_small_0229_ckpt_epoch_222.pth"),
        "vmamba_base_s2l15.in1k": _cfg(_RELEASES + "vssm_base_0229_ckpt_epoch_237.pth"),
        "test_vmamba.untrained": _cfg(input_size=(3, 64, 64), pool_size=(2, 2)),
    }
)


def _create_vmamba(variant: str, pretrained: bool = False, **kwargs: Any) -> VMamba:
    kwargs.setdefault("out_indices", len(kwargs.get("depths", REDUCTIONS)))  # features_only: every stage
    return build_backbone(VMamba, variant, pretrained, **kwargs)


@register_model
def vmamba_tiny_s1l8(pretrained: bool = False, **kwargs: Any) -> VMamba:
    """VMamba-T[s1l8] (``vmambav2v_tiny_224.yaml``): widths 96-768, depths 2/2/8/2, ssm_ratio 1, 30.2M parameters."""
    args = dict(dims=(96, 192, 384, 768), depths=(2, 2, 8, 2), ssm_ratio=1.0, drop_path_rate=0.2)
    return _create_vmamba("vmamba_tiny_s1l8", pretrained, **{**args, **kwargs})


@register_model
def vmamba_small_s2l15(pretrained: bool = False, **kwargs: Any) -> VMamba:
    """VMamba-S[s2l15] (``vmambav2_small_224.yaml``): widths 96-768, depths 2/2/15/2, ssm_ratio 2."""
    args = dict(dims=(96, 192, 384, 768), depths=(2, 2, 15, 2), ssm_ratio=2.0, drop_path_rate=0.3)
    return _create_vmamba("vmamba_small_s2l15", pretrained, **{**args, **kwargs})


@register_model
def vmamba_base_s2l15(pretrained: bool = False, **kwargs: Any) -> VMamba:
    """VMamba-B[s2l15] (``vmambav2_base_224.yaml``): widths 128-1024, depths 2/2/15/2, ssm_ratio 2."""
    args = dict(dims=(128, 256, 512, 1024), depths=(2, 2, 15, 2), ssm_ratio=2.0, drop_path_rate=0.6)
    return _create_vmamba("vmamba_base_s2l15", pretrained, **{**args, **kwargs})


@register_model
def test_vmamba(pretrained: bool = False, **kwargs: Any) -> VMamba:
    """A tiny VMamba for tests: widths 16 / 32 / 64 / 128, one block per stage, reductions 4 to 32."""
    args = dict(img_size=64, dims=(16, 32, 64, 128), depths=(1, 1, 1, 1), ssm_ratio=2.0)
    return _create_vmamba("test_vmamba", pretrained, **{**args, **kwargs})
