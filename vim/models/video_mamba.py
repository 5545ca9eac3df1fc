"""VideoMamba video backbones (arXiv 2403.06977, OpenGVLab/VideoMamba), registered with timm.

API::

    import vim, timm
    model = timm.create_model("videomamba_tiny", num_frames=8, img_size=224, num_classes=400)
    logits = model(clips)                                    # (B, 3, T, H, W) -> (B, 400)
    tokens = model.forward_features(clips)                   # (B, 1 + T' * H' * W', D), class token first
    pooled = model.forward_head(tokens, pre_logits=True)     # (B, D) clip feature
    final, maps = model.forward_intermediates(clips, indices=[5, 11])   # maps: (B, D, T', H', W') each

    state_dict = load_official_checkpoint("videomamba_t16_k400_f8_res224.pth")    # released files, as they are
    model.load_state_dict(checkpoint_filter_fn(state_dict, model))                # resampled / inflated to fit

A clip is cut into tubelets by a Conv3d with kernel = stride = (tubelet, 16, 16) (``tubelet_size``
1 by default: one token per frame patch). Every frame gets the same spatial position embedding
``pos_embed`` (1, 1 + H' * W', D), whose first slot belongs to the class token, plus one row of
``temporal_pos_embedding`` (1, T', D). Tokens are ordered spatial-first (all patches of frame 1,
then frame 2, ...), the class token goes in front, and the sequence runs through the same
bidirectional Mamba trunk as the image models (:class:`~vim.models.backbone.MambaBackbone`), with
the two directions summed rather than averaged (``divide_out=False``, as VideoMamba does). The
class token's final state feeds the linear head. Parameter names equal the official checkpoints'.

:func:`checkpoint_filter_fn` maps onto a model: an official VideoMamba checkpoint (its position
embeddings resampled to the model's frame count and image size), or an image checkpoint (ours or
official Vim), inflated: the 2-D patch kernel goes into the centre slice of the 3-D kernel, the Vim
middle-class-token position layout is converted to VideoMamba's front one, the temporal embedding
starts at zero and ``out_proj`` is halved so that the summing mixer computes what the averaging
one did. Registered: ``videomamba_{tiny,small,middle}`` and the small ``test_videomamba``; tags (see
:data:`RELEASED_WEIGHTS`) name the released files on OpenGVLab/VideoMamba (Hugging Face Hub, or the official
URL): ``k400_f8`` ... ``k400_f64``, ``ssv2_f8``, ``ssv2_f16`` (a ``_f<T>`` tag sets ``num_frames=T``) and ``in1k``,
VideoMamba's image model inflated with its own layout.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import lecun_normal_, resample_abs_pos_embed, to_2tuple, trunc_normal_
from timm.models import generate_default_cfgs, register_model, resolve_pretrained_cfg
from torch import nn

from .backbone import MambaBackbone
from .builder import build_backbone
from .checkpoint import (
    CUSTOM_LOAD,
    checked,
    classifier_keys,
    square_grid,
    unwrap_state_dict,
)
from .pos_embed import split_middle_token
from .timm_api import InputAxis, PoolType

__all__ = [
    "TubeletEmbed",
    "VideoMamba",
    "checkpoint_filter_fn",
    "inflate_image_state_dict",
    "resample_spatial_pos_embed",
    "resample_temporal_pos_embed",
]


class TubeletEmbed(nn.Module):
    """Clip to tubelet tokens: Conv3d with kernel = stride = (tubelet_size, patch_size, patch_size).

    Args:
        img_size: nominal frame size (H, W) or an int.
        patch_size: spatial patch size.
        tubelet_size: frames per token.
        num_frames: nominal clip length T (a multiple of ``tubelet_size``).
        in_chans: input channels.
        embed_dim: token width D.
        strict_size: require inputs of exactly ``num_frames`` x ``img_size``.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        tubelet_size: int = 1,
        num_frames: int = 8,
        in_chans: int = 3,
        embed_dim: int = 192,
        strict_size: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.patch_size = to_2tuple(patch_size)
        self.tubelet_size = tubelet_size
        self.strict_size = strict_size
        self.proj = nn.Conv3d(
            in_chans,
            embed_dim,
            kernel_size=(tubelet_size, *self.patch_size),
            stride=(tubelet_size, *self.patch_size),
            device=device,
            dtype=dtype,
        )
        self.num_frames, self.img_size = num_frames, to_2tuple(img_size)
        self.set_input_size()

    def set_input_size(self, img_size: int | tuple[int, int] | None = None, num_frames: int | None = None) -> None:
        """Change the nominal frame size and clip length (None keeps them) and the token grid ``grid_size`` (T', H', W')."""
        self.img_size = self.img_size if img_size is None else to_2tuple(img_size)
        self.num_frames = self.num_frames if num_frames is None else num_frames
        self.grid_size = self.dynamic_feat_size((self.num_frames, *self.img_size))
        self.num_patches = self.grid_size[1] * self.grid_size[2]  # per frame, as the spatial pos_embed counts them

    def dynamic_feat_size(self, clip_size: tuple[int, int, int]) -> tuple[int, int, int]:
        """Token grid (T', H', W') of a clip of size (T, H, W); ValueError if it cannot be tokenized."""
        frames, height, width = clip_size
        if frames % self.tubelet_size:
            raise ValueError(f"num_frames={frames} is not a multiple of tubelet_size={self.tubelet_size}")
        if height < self.patch_size[0] or width < self.patch_size[1]:
            raise ValueError(f"frame size ({height}, {width}) is smaller than the patch size {self.patch_size}")
        return frames // self.tubelet_size, height // self.patch_size[0], width // self.patch_size[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) -> (B, D, T', H', W')."""
        if x.dim() != 5:
            raise ValueError(f"expected a clip batch (B, C, T, H, W), got shape {tuple(x.shape)}")
        size = (x.shape[2], x.shape[3], x.shape[4])
        self.dynamic_feat_size(size)
        if self.strict_size and size != (self.num_frames, *self.img_size):
            raise ValueError(
                f"input clip size (T, H, W) = {size} does not match the model's (num_frames, *img_size) = "
                f"{(self.num_frames, *self.img_size)}; create the model with dynamic_img_size=True or call set_input_size()"
            )
        return self.proj(x)


def resample_spatial_pos_embed(pos_embed: torch.Tensor, new_size: tuple[int, int], old_size: tuple[int, int]) -> torch.Tensor:
    """(1, 1 + h * w, D) front-class-slot embedding -> (1, 1 + gh * gw, D), bicubic; itself when unchanged."""
    if tuple(new_size) == tuple(old_size):
        return pos_embed
    if pos_embed.shape[1] != old_size[0] * old_size[1] + 1:
        raise ValueError(f"pos_embed has shape {tuple(pos_embed.shape)}, expected (1, 1 + {old_size[0]} * {old_size[1]}, D)")
    return resample_abs_pos_embed(pos_embed, new_size=list(new_size), old_size=list(old_size), num_prefix_tokens=1)


def resample_temporal_pos_embed(temporal: torch.Tensor, num_frames: int) -> torch.Tensor:
    """(1, T, D) temporal embedding -> (1, num_frames, D), linear (as VideoMamba's fine-tuning); itself when unchanged."""
    if temporal.shape[1] == num_frames:
        return temporal
    resampled = F.interpolate(temporal.transpose(1, 2).float(), size=num_frames, mode="linear", align_corners=False)
    return resampled.transpose(1, 2).to(temporal.dtype)


class VideoMamba(MambaBackbone):
    """VideoMamba: spatio-temporal tokens through the bidirectional Mamba trunk, class token in front.

    Args:
        img_size: frame size.
        patch_size: spatial patch size.
        tubelet_size: frames per token (the Conv3d's temporal kernel and stride).
        num_frames: clip length T.
        in_chans: input channels.
        num_classes: classifier outputs, 0 for none.
        global_pool: "token" (the class token, as VideoMamba), "avg" (mean of all tokens) or "" (none).
        embed_dim: token width D.
        depth: number of Mamba blocks.
        d_state: SSM state size N.
        expand: mixer inner width ``expand * embed_dim``.
        drop_rate: dropout before the classifier (VideoMamba's ``fc_drop_rate``).
        pos_drop_rate: dropout after the position embeddings.
        drop_path_rate: stochastic depth of the last block and of the final norm.
        norm_eps: RMSNorm epsilon.
        dynamic_img_size: accept any frame count (multiple of the tubelet) and frame size, resampling the
            position embeddings to the clip's token grid.
        kernel_backend: backend of the kernels (scan, conv + SiLU, add + norm), None for ``$VIM_SCAN_BACKEND`` or "auto".
    """

    stem_no_weight_decay = ("pos_embed", "cls_token", "temporal_pos_embedding")
    stem_pattern = r"^cls_token|^pos_embed|^temporal_pos_embedding|^patch_embed"
    modality = "video"
    input_kind = "clips"

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        tubelet_size: int = 1,
        num_frames: int = 8,
        in_chans: int = 3,
        num_classes: int = 400,
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

        self.patch_embed = TubeletEmbed(
            img_size, patch_size, tubelet_size, num_frames, in_chans, embed_dim, strict_size=not dynamic_img_size, **dd
        )
        num_temporal = self.patch_embed.grid_size[0]
        self.cls_token = nn.Parameter(torch.empty(1, 1, embed_dim, **dd))
        self.pos_embed = nn.Parameter(torch.empty(1, self.patch_embed.num_patches + 1, embed_dim, **dd))
        self.temporal_pos_embedding = nn.Parameter(torch.empty(1, num_temporal, embed_dim, **dd))
        self.pos_drop = nn.Dropout(pos_drop_rate)
        self.build_trunk(
            embed_dim,
            depth,
            drop_path_rate=drop_path_rate,
            norm_eps=norm_eps,
            d_state=d_state,
            expand=expand,
            divide_out=False,
            kernel_backend=kernel_backend,
            **dd,
        )
        self.head_drop = nn.Dropout(drop_rate)
        self.head = self.linear_head(num_classes, **dd)

        self.feature_info = self.describe_features([embed_dim] * depth, [patch_size] * depth)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, mode: str = "") -> None:
        """VideoMamba's initialisation (``mode`` is accepted for timm compatibility); temporal embedding zero."""
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        nn.init.zeros_(self.temporal_pos_embedding)
        lecun_normal_(self.patch_embed.proj.weight)
        if self.patch_embed.proj.bias is not None:
            nn.init.zeros_(self.patch_embed.proj.bias)
        self._init_head()
        self.init_trunk_weights()

    def set_input_size(
        self,
        img_size: int | tuple[int, int] | None = None,
        patch_size: int | tuple[int, int] | None = None,
        num_frames: int | None = None,
    ) -> None:
        """Change the nominal frame size and clip length (timm's argument order; None keeps a setting).

        The position embeddings are resampled to the new token grid; a parameter whose grid axis did not
        change is left as it is (the same ``nn.Parameter``). The patch size is fixed: ValueError if another is asked for.
        """
        if patch_size is not None and to_2tuple(patch_size) != self.patch_embed.patch_size:
            raise ValueError(f"VideoMamba cannot change patch_size from {self.patch_embed.patch_size} to {to_2tuple(patch_size)}")
        old_grid = self.patch_embed.grid_size
        self.patch_embed.set_input_size(img_size=img_size, num_frames=num_frames)
        new_grid = self.patch_embed.grid_size
        with torch.no_grad():
            if new_grid[1:] != old_grid[1:]:
                pos_embed = resample_spatial_pos_embed(self.pos_embed, new_grid[1:], old_grid[1:])
                self.pos_embed = nn.Parameter(pos_embed.detach().clone(), requires_grad=self.pos_embed.requires_grad)
            if new_grid[0] != old_grid[0]:
                temporal = resample_temporal_pos_embed(self.temporal_pos_embedding, new_grid[0])
                self.temporal_pos_embedding = nn.Parameter(
                    temporal.detach().clone(), requires_grad=self.temporal_pos_embedding.requires_grad
                )

    def _position_embeddings(self, grid: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``pos_embed`` (1, 1 + H' * W', D) and ``temporal_pos_embedding`` (1, T', D) for the token grid ``grid``."""
        pos_embed = resample_spatial_pos_embed(self.pos_embed, grid[1:], self.patch_embed.grid_size[1:])
        return pos_embed, resample_temporal_pos_embed(self.temporal_pos_embedding, grid[0])

    def input_axes(self) -> tuple[InputAxis, ...]:
        """(B, C, T, H, W), C the tubelet embedding's input channels."""
        return ("B", (self.patch_embed.proj.in_channels, "channels"), "T", "H", "W")

    def nominal_input_shape(self) -> tuple[int, ...]:
        """(C, T, H, W) at the nominal clip length and frame size."""
        return (self.patch_embed.proj.in_channels, self.patch_embed.num_frames, *self.patch_embed.img_size)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) clips -> (B, 1 + T' * H' * W', D) tokens, class token first, spatial-first order."""
        x = self.patch_embed(x).permute(0, 2, 3, 4, 1)  # (B, T', H', W', D)
        batch, grid = x.shape[0], (x.shape[1], x.shape[2], x.shape[3])
        pos_embed, temporal = self._position_embeddings(grid)
        x = x.flatten(2, 3) + pos_embed[:, None, 1:] + temporal[:, :, None]  # (B, T', H' * W', D)
        cls_token = (self.cls_token + pos_embed[:, :1]).expand(batch, -1, -1)
        return self.pos_drop(torch.cat([cls_token.to(x.dtype), x.flatten(1, 2)], dim=1))

    def class_token_index(self, num_tokens: int) -> int:
        """Position of the class token: the front, 0."""
        return 0

    def checkpoint_filter(self, state_dict: Mapping) -> dict[str, torch.Tensor]:
        return checkpoint_filter_fn(state_dict, self)

    def token_grid(self, x: torch.Tensor) -> tuple[int, int, int]:
        """The (T', H', W') tubelet grid of (B, C, T, H, W) clips: ``forward_intermediates`` gives "NCTHW" maps on it."""
        return self.patch_embed.dynamic_feat_size((x.shape[2], x.shape[3], x.shape[4]))


# --------------------------------------------------------------------------------------------- checkpoints
def inflate_image_state_dict(
    state_dict: Mapping[str, torch.Tensor], model: VideoMamba, middle_cls_token: bool = True, divide_out: bool = True
) -> dict[str, torch.Tensor]:
    """Turn an image checkpoint into a video one for ``model`` (sizes are resampled later by the filter).

    Args:
        state_dict: image weights with a (D, C, p, p) ``patch_embed.proj.weight``.
        model: the target video model (its tubelet size and temporal embedding length are used).
        middle_cls_token: the image ``pos_embed`` has its class slot in the middle (Vim); False for a front
            class slot (VideoMamba's image models).
        divide_out: the image mixer averaged its two directions (Vim); ``out_proj`` is then halved so that
            the summing video mixer computes the same function.

    Returns:
        A state dict with a (D, C, t, p, p) patch kernel (the 2-D kernel in the centre slice ``t // 2``, the
        other slices zero), a front-class-slot ``pos_embed`` and a zero ``temporal_pos_embedding``.
    """
    out = dict(state_dict)
    kernel = out["patch_embed.proj.weight"]
    tubelet = model.patch_embed.tubelet_size
    inflated = kernel.new_zeros(kernel.shape[0], kernel.shape[1], tubelet, *kernel.shape[2:])
    inflated[:, :, tubelet // 2] = kernel
    out["patch_embed.proj.weight"] = inflated
    if middle_cls_token and "pos_embed" in out:
        cls_slot, patches = split_middle_token(out["pos_embed"])
        out["pos_embed"] = torch.cat([cls_slot, patches], dim=1)
    out.setdefault("temporal_pos_embedding", torch.zeros_like(model.temporal_pos_embedding, device="cpu"))
    if divide_out and not model.blocks[0].mixer.divide_out:
        for key in [k for k in out if k.endswith("mixer.out_proj.weight")]:
            out[key] = out[key] * 0.5
    return out


VIDEOMAMBA_IMAGE_TAGS = ("in1k",)
"""Tags whose file is a VideoMamba image model (class token in front, directions summed), not a Vim one."""


def checkpoint_filter_fn(state_dict: Mapping, model: VideoMamba) -> dict[str, torch.Tensor]:
    """Map a VideoMamba or image state dict, or a whole training checkpoint, onto ``model``.

    Image checkpoints (a 4-D patch kernel) are inflated with :func:`inflate_image_state_dict`: in the Vim layout
    (middle class token, averaged directions), or in VideoMamba's image layout (front class token, summed
    directions) when the model was created with a tag of :data:`VIDEOMAMBA_IMAGE_TAGS` (``videomamba_tiny.in1k``).
    ``pos_embed`` is resampled to the model's frame size (the checkpoint's grid is taken to be square) and
    ``temporal_pos_embedding`` to its frame count.

    Raises:
        ValueError: naming the key and both shapes, when a tensor cannot fit the model (the classifier is left
            to the loader, which drops it when ``num_classes`` differs).
    """
    state_dict = unwrap_state_dict(state_dict)
    if state_dict.get("patch_embed.proj.weight", torch.empty(0)).dim() == 4:
        vim_layout = getattr(model, "pretrained_cfg", {}).get("tag") not in VIDEOMAMBA_IMAGE_TAGS
        state_dict = inflate_image_state_dict(state_dict, model, middle_cls_token=vim_layout, divide_out=vim_layout)
    expected = model.state_dict()
    classifier = classifier_keys(model, state_dict)
    out = {}
    for key, value in state_dict.items():
        if key == "pos_embed" and value.shape != expected[key].shape:
            old_grid = square_grid(value.shape[1] - 1, key)
            value = resample_spatial_pos_embed(value, model.patch_embed.grid_size[1:], old_grid)
        elif key == "temporal_pos_embedding":
            value = resample_temporal_pos_embed(value, model.patch_embed.grid_size[0])
        out[key] = checked(key, value, expected, classifier)
    return out


# --------------------------------------------------------------------------------------------- registry
def _create_video_mamba(variant: str, pretrained: bool = False, **kwargs) -> VideoMamba:
    """Build through :func:`~vim.models.builder.build_backbone`; a ``_f<T>`` tag sets the default ``num_frames``."""
    tag = resolve_pretrained_cfg(variant, kwargs.get("pretrained_cfg")).tag or ""
    clip_length = re.search(r"_f(\d+)$", tag)
    if clip_length:
        kwargs.setdefault("num_frames", int(clip_length.group(1)))
    return build_backbone(VideoMamba, variant, pretrained, **kwargs)


OFFICIAL_URL = "https://pjlab-gvm-data.oss-cn-shanghai.aliyuncs.com/videomamba/"
OFFICIAL_HF_HUB_ID = "OpenGVLab/VideoMamba"


def _cfg(file: str = "", **kwargs) -> dict[str, Any]:
    """A pretrained cfg; ``file``: the released file's name, hosted on the Hugging Face Hub and at the official URL."""
    source = dict(url=OFFICIAL_URL + file, hf_hub_id=OFFICIAL_HF_HUB_ID, hf_hub_filename=file) if file else dict(url="")
    return {
        **source,
        "num_classes": 400,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "fixed_input_size": True,
        "crop_pct": 1.0,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "apache-2.0",
        "paper_ids": "arXiv:2403.06977",
        "paper_name": "VideoMamba: State Space Model for Efficient Video Understanding",
        "origin_url": "https://github.com/OpenGVLab/VideoMamba",
        "custom_load": CUSTOM_LOAD,  # released .pth files hold an argparse.Namespace: our safe reader loads every source
        **kwargs,
    }


RELEASED_WEIGHTS = (
    # (tag, file name after "videomamba_<t|s|m>16_", num_classes), as OpenGVLab/VideoMamba's model zoo lists them
    ("k400_f8", "k400_f8_res224.pth", 400),
    ("k400_f16", "k400_f16_res224.pth", 400),
    ("k400_f32", "k400_f32_res224.pth", 400),
    ("k400_f64", "k400_f64_res224.pth", 400),
    ("ssv2_f8", "ssv2_f8_res224.pth", 174),
    ("ssv2_f16", "ssv2_f16_res224.pth", 174),
    ("in1k", "in1k_res224.pth", 1000),  # the ImageNet-1K image model, inflated (VideoMamba's own init for video)
)

# A "_f<T>" tag is a clip length: the model gets that num_frames unless given another (then the temporal
# embedding is resampled). An "in1k" tag inflates the image weights to any num_frames (8 by default).
default_cfgs = generate_default_cfgs(
    {
        **{
            f"videomamba_{size}.{tag}": _cfg(f"videomamba_{size[0]}16_{file}", num_classes=num_classes)
            for size in ("tiny", "small", "middle")
            for tag, file, num_classes in RELEASED_WEIGHTS
        },
        "test_videomamba.untrained": _cfg(input_size=(3, 32, 32), num_classes=10),
    }
)


@register_model
def videomamba_tiny(pretrained: bool = False, **kwargs) -> VideoMamba:
    """VideoMamba-Ti: width 192, 24 blocks (7M parameters); ``num_frames`` and ``img_size`` may be given."""
    model_args = dict(patch_size=16, embed_dim=192, depth=24)
    return _create_video_mamba("videomamba_tiny", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def videomamba_small(pretrained: bool = False, **kwargs) -> VideoMamba:
    """VideoMamba-S: width 384, 24 blocks (26M parameters)."""
    model_args = dict(patch_size=16, embed_dim=384, depth=24)
    return _create_video_mamba("videomamba_small", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def videomamba_middle(pretrained: bool = False, **kwargs) -> VideoMamba:
    """VideoMamba-M: width 576, 32 blocks (74M parameters)."""
    model_args = dict(patch_size=16, embed_dim=576, depth=32)
    return _create_video_mamba("videomamba_middle", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def test_videomamba(pretrained: bool = False, **kwargs) -> VideoMamba:
    """A tiny VideoMamba for tests: 4 frames of 32 px, 8 px patches, 2 blocks of width 32."""
    model_args = dict(img_size=32, num_frames=4, patch_size=8, embed_dim=32, depth=2, d_state=8)
    return _create_video_mamba("test_videomamba", pretrained=pretrained, **dict(model_args, **kwargs))
