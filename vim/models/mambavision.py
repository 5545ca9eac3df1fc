r"""MambaVision (NVlabs/MambaVision, CVPR 2025) on the shared hierarchical trunk, with upstream's released weights.

API::

    import timm, vim
    model = timm.create_model("mambavision_tiny.in1k", pretrained=True)         # nvidia/MambaVision-T-1K, CC-BY-NC-SA-4.0
    maps = timm.create_model("mambavision_tiny", features_only=True)(images)   # 4 NCHW maps at reductions 4 to 32

The architecture of upstream's ``MambaVision`` (``mambavision/models/mamba_vision.py``): a stem of two (conv 3x3
stride 2, BatchNorm, ReLU) to stride 4, four stages of widths ``dim * 2**i`` at reductions 4 / 8 / 16 / 32 joined by
a 3x3 stride-2 conv without bias or norm, a BatchNorm of the last stage's output, global average pooling and a linear
head. The first two stages hold :class:`~vim.models.block.ConvBlock`\ s; the last two hold blocks
``x + ls1(mixer(norm(x)))``, ``x + ls2(Mlp(norm2(x)))`` (LayerNorm, GELU MLP of ratio 4, layer scale in B / L / L2 / L3)
whose mixer is :class:`~vim.models.mambavision_mixer.MambaVisionMixer` in the first half of the stage and timm's
self-attention in the second half (the middle block of an odd stage is a Mamba one). Those two stages run on square
windows (``window_size``: 14 and 7 for the 224-pixel models, one window each at 224), the grid zero-padded to whole
windows as upstream pads it, so any input size works.

Names: the module tree keeps the shared trunk's names; :func:`checkpoint_filter_fn` maps upstream's keys onto them
and :func:`to_official_state_dict` back:

==================================================  ==================================================
upstream                                            here
==================================================  ==================================================
``patch_embed.conv_down.{0,1,3,4}.*``               the same
``levels.{0,1}.blocks.{j}.{conv1,norm1,conv2,...}`` ``stages.{i}.blocks.{j}.{conv1,norm1,conv2,...}``
``levels.{i}.blocks.{j}.gamma``                     ``stages.{i}.blocks.{j}.ls.gamma``
``levels.{2,3}.blocks.{j}.norm1``                   ``stages.{i}.blocks.{j}.norm``
``levels.{2,3}.blocks.{j}.{mixer,norm2,mlp}``       the same under ``stages``
``levels.{i}.blocks.{j}.gamma_{1,2}``               ``stages.{i}.blocks.{j}.ls{1,2}.gamma``
``levels.{i}.downsample.reduction.0.weight``        ``stages.{i+1}.downsample.conv.weight``
``norm.*``, ``head.*``                              ``norm_f.*``, ``head.*``
==================================================  ==================================================

Names are not upstream's (``mamba_vision_T``): ``mambavision_tiny`` and co., so that both packages install side by side.
The weights are licensed CC-BY-NC-SA-4.0 by NVIDIA (non-commercial); each tag's ``license`` says so.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import LayerScale, register_notrace_module, to_2tuple
from timm.models import generate_default_cfgs, register_model
from torch import nn

from .attention import mambavision_attention
from .block import ConvBlock, gelu_mlp
from .builder import build_backbone
from .checkpoint import KeyRules, rename_key, renamed_state_dict, unwrap_state_dict
from .hierarchical import GridDownsample, HierarchicalImageBackbone
from .mambavision_mixer import MambaVisionMixer

__all__ = ["MambaVision", "attention_blocks", "checkpoint_filter_fn", "to_official_state_dict"]

REDUCTIONS = (4, 8, 16, 32)
CONV_STAGES = 2  # upstream's first two levels are convolutional
STEM_BN_EPS = 1e-4  # the stem's BatchNorms; the ConvBlocks' and the final norm keep PyTorch's 1e-5
LAYER_NORM_EPS = 1e-5


class ConvStem(nn.Module):
    """Upstream's ``PatchEmbed``: conv 3x3 stride 2 (C -> in_dim, no bias), BatchNorm, ReLU, conv 3x3 stride 2 (in_dim ->
    dim, no bias), BatchNorm, ReLU; (B, C, H, W) -> (B, H/4 * W/4, dim) tokens (each side halved twice, rounded up)."""

    def __init__(self, in_chans: int, in_dim: int, dim: int, device=None, dtype=None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.conv_down = nn.Sequential(
            nn.Conv2d(in_chans, in_dim, 3, stride=2, padding=1, bias=False, **dd),
            nn.BatchNorm2d(in_dim, eps=STEM_BN_EPS, **dd),
            nn.ReLU(),
            nn.Conv2d(in_dim, dim, 3, stride=2, padding=1, bias=False, **dd),
            nn.BatchNorm2d(dim, eps=STEM_BN_EPS, **dd),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_down(x).flatten(2).transpose(1, 2)


@register_notrace_module  # a leaf for torch.fx: BatchNorm1d checks the input's rank in Python
class TokenBatchNorm(nn.BatchNorm1d):
    """BatchNorm over the channels of (B, L, C) tokens: upstream's ``BatchNorm2d`` of the (B, C, H, W) map, the same
    statistics (over B, H and W) and the same state dict."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


def attention_blocks(depth: int) -> range:
    """The indices of a stage's self-attention blocks: its second half, the middle block of an odd stage excluded
    (upstream's ``transformer_blocks``)."""
    return range((depth + 1) // 2, depth)


class MambaVision(HierarchicalImageBackbone):
    """Upstream's ``MambaVision``; see the module docstring.

    Args:
        img_size: nominal image size (any size works).
        in_chans: input channels.
        num_classes: classifier outputs, 0 for none.
        global_pool: "avg" (upstream's), "max" or "".
        dim: the first stage's width; stage i has ``dim * 2**i``.
        in_dim: the stem's inner width.
        depths: blocks per stage (four stages, the first two convolutional).
        num_heads: attention heads per stage (the conv stages' are not used).
        window_size: per stage, the side of the windows of the Mamba / attention stages (the conv stages' not used).
        mlp_ratio: the MLPs' hidden width over the stage width.
        layer_scale: initial layer scale of the Mamba / attention blocks, None for none (B, L, L2, L3: 1e-5).
        layer_scale_conv: initial layer scale of the conv blocks, None for none (every released model).
        drop_rate: dropout before the classifier (upstream has none there).
        proj_drop_rate: dropout in the MLPs and after the attention's projection (upstream's ``drop_rate``).
        attn_drop_rate: attention dropout.
        drop_path_rate: stochastic depth of the last block (linspace over all blocks from 0).
        kernel_backend: backend of the kernels, None for ``$VIM_SCAN_BACKEND`` or "auto".
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        dim: int = 80,
        in_dim: int = 32,
        depths: Sequence[int] = (1, 3, 8, 4),
        num_heads: Sequence[int] = (2, 4, 8, 16),
        window_size: Sequence[int] = (8, 8, 14, 7),
        mlp_ratio: float = 4.0,
        layer_scale: float | None = None,
        layer_scale_conv: float | None = None,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.2,
        kernel_backend: str | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if not len(depths) == len(num_heads) == len(window_size) > CONV_STAGES:
            raise ValueError(
                f"depths {list(depths)}, num_heads {list(num_heads)} and window_size {list(window_size)}: one entry per "
                f"stage, more than {CONV_STAGES} stages"
            )
        dd = {"device": device, "dtype": dtype}
        dims = [dim * 2**i for i in range(len(depths))]
        self.img_size = to_2tuple(img_size)
        self.in_chans = in_chans
        self.init_head_attributes(num_classes, global_pool, dims[-1])
        self.patch_embed = ConvStem(in_chans, in_dim, dims[0], **dd)
        conv_block = partial(ConvBlock, layer_scale=layer_scale_conv)
        attention = [
            partial(mambavision_attention, num_heads=heads, attn_drop=attn_drop_rate, proj_drop=proj_drop_rate)
            for heads in num_heads
        ]
        conv_stages = range(CONV_STAGES)
        self.build_stages(
            dims, depths, drop_path_rate, "layernorm", LAYER_NORM_EPS, kernel_backend,
            mlp_cls=partial(gelu_mlp, mlp_ratio=mlp_ratio, drop=proj_drop_rate),
            layer_mixers=[{j: attention[i] for j in attention_blocks(depth)} for i, depth in enumerate(depths)],
            mixer_cls=MambaVisionMixer,
            downsample_cls=partial(GridDownsample, kernel_size=3, bias=False),
            stage_blocks=[conv_block if i in conv_stages else None for i in range(len(depths))],
            window_sizes=[None if i in conv_stages else size for i, size in enumerate(window_size)],
            layer_scale=layer_scale,
            norm_f_cls=TokenBatchNorm,
            **dd,
        )  # fmt: skip
        self.head_drop = nn.Dropout(drop_rate)
        self.head = self.linear_head(num_classes, **dd)
        self.feature_info = self.describe_features(dims, REDUCTIONS[: len(dims)])
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, mode: str = "") -> None:
        """Upstream's init (``mode`` for timm): PyTorch's for the convs, every Linear truncated normal (std 0.02, bias
        0), every norm ones / zeros, the mixers' own (``A_log = log(1..N)``, ``D = 1``), layer scales at their value."""
        self.init_parts((nn.Conv2d, nn.BatchNorm2d, nn.BatchNorm1d, nn.LayerNorm, MambaVisionMixer, LayerScale))

    def checkpoint_filter(self, state_dict: Mapping) -> dict[str, torch.Tensor]:
        return checkpoint_filter_fn(state_dict, self)


def _block_norm(match: re.Match[str]) -> str:
    """A block's first norm: a conv block's ``norm1`` keeps its name, a Mamba / attention block's is ``norm``."""
    norm = "norm1" if int(match[1]) < CONV_STAGES else "norm"
    return f"stages.{match[1]}.blocks.{match[2]}.{norm}."


_TO_OURS: KeyRules = [
    (re.compile(r"^levels\.(\d+)\.blocks\.(\d+)\.norm1\."), _block_norm),
    (re.compile(r"^levels\.(\d+)\.blocks\.(\d+)\.gamma$"), lambda m: f"stages.{m[1]}.blocks.{m[2]}.ls.gamma"),
    (re.compile(r"^levels\.(\d+)\.blocks\.(\d+)\.gamma_([12])$"), lambda m: f"stages.{m[1]}.blocks.{m[2]}.ls{m[3]}.gamma"),
    (re.compile(r"^levels\.(\d+)\.blocks\."), lambda m: f"stages.{m[1]}.blocks."),
    (re.compile(r"^levels\.(\d+)\.downsample\.reduction\.0\."), lambda m: f"stages.{int(m[1]) + 1}.downsample.conv."),
    (re.compile(r"^norm\."), lambda m: "norm_f."),
]
_TO_OFFICIAL: KeyRules = [
    (re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.norm\."), lambda m: f"levels.{m[1]}.blocks.{m[2]}.norm1."),
    (re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.ls\.gamma$"), lambda m: f"levels.{m[1]}.blocks.{m[2]}.gamma"),
    (re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.ls([12])\.gamma$"), lambda m: f"levels.{m[1]}.blocks.{m[2]}.gamma_{m[3]}"),
    (re.compile(r"^stages\.(\d+)\.blocks\."), lambda m: f"levels.{m[1]}.blocks."),
    (re.compile(r"^stages\.(\d+)\.downsample\.conv\."), lambda m: f"levels.{int(m[1]) - 1}.downsample.reduction.0."),
    (re.compile(r"^norm_f\."), lambda m: "norm."),
]


def checkpoint_filter_fn(state_dict: Mapping, model: MambaVision) -> dict[str, torch.Tensor]:
    """Map an official MambaVision state dict (a ``.pth.tar`` with the weights under ``"state_dict"``, keys maybe
    under ``module.``; or the Hub's ``transformers`` files, under ``model.``) onto ``model``.

    Upstream's keys are renamed (module docstring's table); our own keys (an exported model) pass unchanged.

    Raises:
        ValueError: naming the key and both shapes, when a tensor cannot fit the model. The classifier and the stem's
            input channels are left to the loader, which adapts them to ``num_classes`` / ``in_chans``.
    """
    state_dict = unwrap_state_dict(state_dict)
    if state_dict and all(key.startswith("model.") for key in state_dict):  # transformers' MambaVisionModel
        state_dict = {key.removeprefix("model."): value for key, value in state_dict.items()}
    return renamed_state_dict(state_dict, model, _TO_OURS)


def to_official_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our MambaVision state dict under upstream's key names (loads into its ``MambaVision`` of the same config)."""
    return {rename_key(key, _TO_OFFICIAL): value for key, value in state_dict.items()}


def _cfg(hub: str = "", filename: str = "", **kwargs: Any) -> dict[str, Any]:
    weights = {"hf_hub_id": f"nvidia/{hub}", "hf_hub_filename": filename} if hub else {}
    return {
        "url": "",
        **weights,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "min_input_size": (3, 32, 32),
        "pool_size": (7, 7),
        "crop_pct": 1.0,
        "crop_mode": "center",
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.conv_down.0",
        "classifier": "head",
        "license": "cc-by-nc-sa-4.0",
        "origin_url": "https://github.com/NVlabs/MambaVision",
        "paper_ids": "arXiv:2407.08083",
        **kwargs,
    }


# upstream's default_cfgs: the Hub repository, its file, and the evaluation crop of each released model
default_cfgs = generate_default_cfgs(
    {
        "mambavision_tiny.in1k": _cfg("MambaVision-T-1K", "mambavision_tiny_1k.pth.tar"),
        "mambavision_tiny2.in1k": _cfg("MambaVision-T2-1K", "mambavision_tiny2_1k.pth.tar", crop_pct=0.98),
        "mambavision_small.in1k": _cfg("MambaVision-S-1K", "mambavision_small_1k.pth.tar", crop_pct=0.93),
        "mambavision_base.in1k": _cfg("MambaVision-B-1K", "mambavision_base_1k.pth.tar"),
        "mambavision_base.in21k_ft_in1k": _cfg("MambaVision-B-21K", "mambavision_base_21k.pth.tar"),
        "mambavision_large.in1k": _cfg("MambaVision-L-1K", "mambavision_large_1k.pth.tar"),
        "mambavision_large.in21k_ft_in1k": _cfg("MambaVision-L-21K", "mambavision_large_21k.pth.tar"),
        "mambavision_large2.in1k": _cfg("MambaVision-L2-1K", "mambavision_large2_1k.pth.tar"),
        "mambavision_large2_512.in21k_ft_in1k": _cfg(
            "MambaVision-L2-512-21K",
            "mambavision_L2_21k_240m_512.pth.tar",
            input_size=(3, 512, 512),
            pool_size=(16, 16),
            crop_pct=0.93,
            crop_mode="squash",
        ),
        "mambavision_large3_256.in21k_ft_in1k": _cfg(
            "MambaVision-L3-256-21K", "mambavision_L3_21k_740m_256.pth.tar", input_size=(3, 256, 256), pool_size=(8, 8)
        ),
        "mambavision_large3_512.in21k_ft_in1k": _cfg(
            "MambaVision-L3-512-21K",
            "mambavision_L3_21k_740m_512.pth.tar",
            input_size=(3, 512, 512),
            pool_size=(16, 16),
            crop_pct=0.93,
            crop_mode="squash",
        ),
        "test_mambavision.untrained": _cfg(input_size=(3, 64, 64), pool_size=(2, 2), license="apache-2.0"),
    }
)


def _create_mambavision(variant: str, pretrained: bool = False, **kwargs: Any) -> MambaVision:
    kwargs.setdefault("out_indices", len(kwargs.get("depths", REDUCTIONS)))  # features_only: every stage
    return build_backbone(MambaVision, variant, pretrained, **kwargs)


_LARGE = dict(dim=196, in_dim=64, num_heads=(4, 8, 16, 32), drop_path_rate=0.3, layer_scale=1e-5)
_LARGE3 = dict(_LARGE, dim=256, depths=(3, 3, 20, 10), drop_path_rate=0.5)


@register_model
def mambavision_tiny(pretrained: bool = False, **kwargs: Any) -> MambaVision:
    """MambaVision-T (upstream's ``mamba_vision_T``): width 80, depths 1/3/8/4, 31.8M parameters."""
    args = dict(dim=80, in_dim=32, depths=(1, 3, 8, 4), drop_path_rate=0.2)
    return _create_mambavision("mambavision_tiny", pretrained, **{**args, **kwargs})


@register_model
def mambavision_tiny2(pretrained: bool = False, **kwargs: Any) -> MambaVision:
    """MambaVision-T2 (``mamba_vision_T2``): width 80, depths 1/3/11/4, 35.1M parameters."""
    args = dict(dim=80, in_dim=32, depths=(1, 3, 11, 4), drop_path_rate=0.2)
    return _create_mambavision("mambavision_tiny2", pretrained, **{**args, **kwargs})


@register_model
def mambavision_small(pretrained: bool = False, **kwargs: Any) -> MambaVision:
    """MambaVision-S (``mamba_vision_S``): width 96, depths 3/3/7/5, 50.1M parameters."""
    args = dict(dim=96, in_dim=64, depths=(3, 3, 7, 5), drop_path_rate=0.2)
    return _create_mambavision("mambavision_small", pretrained, **{**args, **kwargs})


@register_model
def mambavision_base(pretrained: bool = False, **kwargs: Any) -> MambaVision:
    """MambaVision-B (``mamba_vision_B``, ``mamba_vision_B_21k``): width 128, depths 3/3/10/5, 97.7M parameters."""
    args = dict(dim=128, in_dim=64, depths=(3, 3, 10, 5), drop_path_rate=0.3, layer_scale=1e-5)
    return _create_mambavision("mambavision_base", pretrained, **{**args, **kwargs})


@register_model
def mambavision_large(pretrained: bool = False, **kwargs: Any) -> MambaVision:
    """MambaVision-L (``mamba_vision_L``, ``mamba_vision_L_21k``): width 196, depths 3/3/10/5, 227.9M parameters."""
    args = dict(_LARGE, depths=(3, 3, 10, 5))
    return _create_mambavision("mambavision_large", pretrained, **{**args, **kwargs})


@register_model
def mambavision_large2(pretrained: bool = False, **kwargs: Any) -> MambaVision:
    """MambaVision-L2 (``mamba_vision_L2``): width 196, depths 3/3/12/5, 241.5M parameters."""
    args = dict(_LARGE, depths=(3, 3, 12, 5))
    return _create_mambavision("mambavision_large2", pretrained, **{**args, **kwargs})


@register_model
def mambavision_large2_512(pretrained: bool = False, **kwargs: Any) -> MambaVision:
    """MambaVision-L2 at 512 pixels (``mamba_vision_L2_512_21k``): windows 32 and 16, 241.5M parameters."""
    args = dict(_LARGE, img_size=512, depths=(3, 3, 12, 5), window_size=(8, 8, 32, 16))
    return _create_mambavision("mambavision_large2_512", pretrained, **{**args, **kwargs})


@register_model
def mambavision_large3_256(pretrained: bool = False, **kwargs: Any) -> MambaVision:
    """MambaVision-L3 at 256 pixels (``mamba_vision_L3_256_21k``): width 256, depths 3/3/20/10, 739.6M parameters."""
    args = dict(_LARGE3, img_size=256, window_size=(8, 8, 16, 8))
    return _create_mambavision("mambavision_large3_256", pretrained, **{**args, **kwargs})


@register_model
def mambavision_large3_512(pretrained: bool = False, **kwargs: Any) -> MambaVision:
    """MambaVision-L3 at 512 pixels (``mamba_vision_L3_512_21k``): width 256, depths 3/3/20/10, 739.6M parameters."""
    args = dict(_LARGE3, img_size=512, window_size=(8, 8, 32, 16))
    return _create_mambavision("mambavision_large3_512", pretrained, **{**args, **kwargs})


@register_model
def test_mambavision(pretrained: bool = False, **kwargs: Any) -> MambaVision:
    """A tiny MambaVision for tests: widths 16 / 32 / 64 / 128, depths 1/1/3/2 (an attention block in each of the last
    two stages), windows of 3 and 2 (several windows, padded, at 64 pixels)."""
    args = dict(
        img_size=64, dim=16, in_dim=8, depths=(1, 1, 3, 2), num_heads=(1, 2, 2, 4), window_size=(8, 8, 3, 2),
        drop_path_rate=0.0,
    )  # fmt: skip
    return _create_mambavision("test_mambavision", pretrained, **{**args, **kwargs})
