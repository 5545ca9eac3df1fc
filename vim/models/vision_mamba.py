"""Vision Mamba (Vim) image backbones, registered with timm.

API::

    import vim, timm
    model = timm.create_model("vim_small_patch16_224.in1k", pretrained=True)   # hustvl's release, via the Hub
    model = timm.create_model("vim_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file="vim_t.pth"))
    logits = model(images)                                   # (B, 3, 224, 224) -> (B, 1000)
    tokens = model.forward_features(images)                  # (B, M + 1, D), class token at M // 2
    final, inter = model.forward_intermediates(images, indices=4, output_fmt="NCHW")

Vim (arXiv 2401.09417, hustvl/Vim): patch tokens with a learned absolute position embedding and a
class token inserted in the middle of the sequence, 24 bidirectional Mamba blocks
(:class:`~vim.models.backbone.MambaBackbone`), the class token's final state as the pooled
feature and a linear head. Registered: ``vim_{tiny,small}_patch16{,_stride8}_224``,
``vim_base_patch16_224`` (tag ``in1k``: the released ImageNet-1K weights, hustvl/Vim-*-midclstok on the
Hugging Face Hub) and the small ``test_vim``. :func:`checkpoint_filter_fn` maps a released or exported
state dict onto a model (the names are the official ones; ``pos_embed`` is resampled to the model's grid).

The registered models take any image size (``dynamic_img_size=True``: the position embedding is
resampled to the token grid of each input; at the nominal size nothing changes). Pass
``dynamic_img_size=False`` for a model that, like the official code, accepts its ``img_size`` only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import lecun_normal_, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from torch import nn

from .backbone import MambaBackbone
from .builder import build_backbone
from .checkpoint import CUSTOM_LOAD, checked, classifier_keys, square_grid, unwrap_state_dict
from .patch_embed import StridedPatchEmbed
from .pos_embed import insert_middle_token, middle_token_index, resample_middle_token_pos_embed
from .timm_api import InputAxis, PoolType

__all__ = ["VisionMamba", "checkpoint_filter_fn"]


# torch.fx autowraps no-trace functions only in the module of the traced forward (MambaBackbone's):
# wrap the size-dependent pos-embed resampling in this module, where VisionMamba calls it.
torch.fx.wrap("resample_middle_token_pos_embed")


class VisionMamba(MambaBackbone):
    """Vision Mamba with a middle class token, behaving like a timm ViT.

    Args:
        img_size: input image size.
        patch_size: patch (conv kernel) size.
        stride: patch stride, ``patch_size`` if None (8 for the "stride8" variants).
        in_chans: input channels.
        num_classes: classifier outputs, 0 for none.
        global_pool: "token" (the middle class token, as in Vim), "avg" (mean of all tokens) or "" (none).
        embed_dim: token width D.
        depth: number of Mamba blocks.
        d_state: SSM state size N.
        expand: mixer inner width ``expand * embed_dim``.
        drop_rate: dropout before the classifier.
        pos_drop_rate: dropout after adding the position embedding.
        drop_path_rate: stochastic depth of the last block and of the final norm.
        norm_eps: RMSNorm epsilon.
        dynamic_img_size: accept any image size, resampling the position embedding to its grid.
        kernel_backend: backend of the kernels (scan, conv + SiLU, add + norm), None for ``$VIM_SCAN_BACKEND`` or "auto".
    """

    stem_no_weight_decay = ("pos_embed", "cls_token")
    stem_pattern = r"^cls_token|^pos_embed|^patch_embed"
    modality = "images"
    input_kind = "images"

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        stride: int | None = None,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: PoolType = "token",
        embed_dim: int = 192,
        depth: int = 24,
        d_state: int = 16,
        expand: int = 2,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-5,
        dynamic_img_size: bool = False,
        kernel_backend: str | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.init_head_attributes(num_classes, global_pool, embed_dim)
        self.in_chans = in_chans
        self.dynamic_img_size = dynamic_img_size

        self.patch_embed = StridedPatchEmbed(
            img_size=img_size,
            patch_size=patch_size,
            stride=stride,
            in_chans=in_chans,
            embed_dim=embed_dim,
            output_fmt="NHWC" if dynamic_img_size else None,
            strict_img_size=not dynamic_img_size,
            **dd,
        )
        self.cls_token = nn.Parameter(torch.empty(1, 1, embed_dim, **dd))
        self.pos_embed = nn.Parameter(torch.empty(1, self.patch_embed.num_patches + 1, embed_dim, **dd))
        self.pos_drop = nn.Dropout(pos_drop_rate)
        self.build_trunk(
            embed_dim,
            depth,
            drop_path_rate=drop_path_rate,
            norm_eps=norm_eps,
            d_state=d_state,
            expand=expand,
            divide_out=True,
            kernel_backend=kernel_backend,
            **dd,
        )
        self.head_drop = nn.Dropout(drop_rate)
        self.head = self.linear_head(num_classes, **dd)

        self.feature_info = self.describe_features([embed_dim] * depth, [max(self.patch_embed.stride)] * depth)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, mode: str = "") -> None:
        """The official Vim initialisation of every parameter (``mode`` is accepted for timm compatibility)."""
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        lecun_normal_(self.patch_embed.proj.weight)
        if self.patch_embed.proj.bias is not None:
            nn.init.zeros_(self.patch_embed.proj.bias)
        self._init_head()
        self.init_trunk_weights()

    def set_input_size(self, img_size: int | tuple[int, int] | None = None, patch_size: int | None = None) -> None:
        """Change the nominal image size, resampling the position embedding to the new grid."""
        old_grid = self.patch_embed.grid_size
        self.patch_embed.set_input_size(img_size=img_size, patch_size=patch_size)
        if self.patch_embed.grid_size != old_grid:
            with torch.no_grad():
                resampled = resample_middle_token_pos_embed(self.pos_embed, self.patch_embed.grid_size, old_grid)
            self.pos_embed = nn.Parameter(resampled, requires_grad=self.pos_embed.requires_grad)

    def input_axes(self) -> tuple[InputAxis, ...]:
        """(B, C, H, W), C the patch embedding's input channels."""
        return ("B", (self.patch_embed.proj.in_channels, "channels"), "H", "W")

    def nominal_input_shape(self) -> tuple[int, ...]:
        """(C, H, W) at the nominal image size."""
        return (self.patch_embed.proj.in_channels, *self.patch_embed.img_size)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> (B, M + 1, D) tokens with the class token at M // 2, position embedded."""
        x = self.patch_embed(x)
        pos_embed = self.pos_embed
        if self.dynamic_img_size:
            grid = x.shape[1:3]
            pos_embed = resample_middle_token_pos_embed(pos_embed, grid, self.patch_embed.grid_size)
            x = x.flatten(1, 2)
        x = insert_middle_token(x, self.cls_token) + pos_embed
        return self.pos_drop(x)

    def class_token_index(self, num_tokens: int) -> int:
        """Position of the class token in a sequence of ``num_tokens`` = M + 1: the middle, M // 2."""
        return middle_token_index(num_tokens)

    def checkpoint_filter(self, state_dict: Mapping) -> dict[str, torch.Tensor]:
        return checkpoint_filter_fn(state_dict, self)

    def token_grid(self, x: torch.Tensor) -> tuple[int, int]:
        """The (gh, gw) patch grid of (B, C, H, W) images: ``forward_intermediates`` gives "NCHW" maps on it."""
        return self.patch_embed.dynamic_feat_size((x.shape[-2], x.shape[-1]))


def checkpoint_filter_fn(state_dict: Mapping, model: VisionMamba) -> dict[str, torch.Tensor]:
    """Map an official Vim state dict (or a whole training checkpoint) onto ``model``.

    Our parameter names equal the official ones: the weights are unwrapped, a DDP ``module.`` prefix is
    stripped, and ``pos_embed`` is resampled to the model's token grid when the image size or stride differs
    (the checkpoint's grid is taken to be square).

    Raises:
        ValueError: naming the key and both shapes, when a tensor cannot fit the model. The classifier and the
            patch embedding's input channels are left to the loader, which adapts them to ``num_classes`` / ``in_chans``.
    """
    state_dict = unwrap_state_dict(state_dict)
    expected = model.state_dict()
    classifier = classifier_keys(model, state_dict)
    out = {}
    for key, value in state_dict.items():
        if key == "pos_embed" and key in expected and value.shape != expected[key].shape:
            value = resample_middle_token_pos_embed(
                value, new_size=model.patch_embed.grid_size, old_size=square_grid(value.shape[1] - 1, key)
            )
        out[key] = checked(key, value, expected, classifier)
    return out


def _create_vision_mamba(variant: str, pretrained: bool = False, **kwargs) -> VisionMamba:
    return build_backbone(VisionMamba, variant, pretrained, **kwargs)


def _cfg(url: str = "", **kwargs) -> dict[str, Any]:
    return {
        "url": url,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "min_input_size": (3, 32, 32),  # a 2 x 2 patch grid; any size from one patch up works
        "pool_size": None,
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "apache-2.0",
        "paper_ids": "arXiv:2401.09417",
        "paper_name": "Vision Mamba: Efficient Visual Representation Learning with Bidirectional State Space Model",
        "origin_url": "https://github.com/hustvl/Vim",
        "custom_load": CUSTOM_LOAD,  # released .pth files hold an argparse.Namespace: our safe reader loads every source
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "vim_tiny_patch16_224.in1k": _cfg(hf_hub_id="hustvl/Vim-tiny-midclstok", hf_hub_filename="vim_t_midclstok_76p1acc.pth"),
        "vim_tiny_patch16_stride8_224.in1k": _cfg(
            hf_hub_id="hustvl/Vim-tiny-midclstok", hf_hub_filename="vim_t_midclstok_ft_78p3acc.pth"
        ),
        "vim_small_patch16_224.in1k": _cfg(hf_hub_id="hustvl/Vim-small-midclstok", hf_hub_filename="vim_s_midclstok_80p5acc.pth"),
        "vim_small_patch16_stride8_224.in1k": _cfg(
            hf_hub_id="hustvl/Vim-small-midclstok", hf_hub_filename="vim_s_midclstok_ft_81p6acc.pth"
        ),
        "vim_base_patch16_224.in1k": _cfg(hf_hub_id="hustvl/Vim-base-midclstok", hf_hub_filename="vim_b_midclstok_81p9acc.pth"),
        "test_vim.untrained": _cfg(input_size=(3, 32, 32), crop_pct=1.0),
    }
)


@register_model
def vim_tiny_patch16_224(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-Ti (7.1M parameters)."""
    model_args = dict(patch_size=16, embed_dim=192, depth=24, dynamic_img_size=True)
    return _create_vision_mamba("vim_tiny_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def vim_tiny_patch16_stride8_224(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-Ti with overlapping 16 px patches at stride 8 (729 tokens at 224 px)."""
    model_args = dict(patch_size=16, stride=8, embed_dim=192, depth=24, dynamic_img_size=True)
    return _create_vision_mamba("vim_tiny_patch16_stride8_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def vim_small_patch16_224(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-S (25.8M parameters)."""
    model_args = dict(patch_size=16, embed_dim=384, depth=24, dynamic_img_size=True)
    return _create_vision_mamba("vim_small_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def vim_small_patch16_stride8_224(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-S with overlapping 16 px patches at stride 8."""
    model_args = dict(patch_size=16, stride=8, embed_dim=384, depth=24, dynamic_img_size=True)
    return _create_vision_mamba("vim_small_patch16_stride8_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def vim_base_patch16_224(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-B (97.6M parameters)."""
    model_args = dict(patch_size=16, embed_dim=768, depth=24, dynamic_img_size=True)
    return _create_vision_mamba("vim_base_patch16_224", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def test_vim(pretrained: bool = False, **kwargs) -> VisionMamba:
    """A tiny Vim for tests: 32 px images, 8 px patches at stride 4, 4 blocks of width 32."""
    model_args = dict(img_size=32, patch_size=8, stride=4, embed_dim=32, depth=4, d_state=8, dynamic_img_size=True)
    return _create_vision_mamba("test_vim", pretrained=pretrained, **dict(model_args, **kwargs))
