"""Patch embedding whose stride may differ from the patch size (Vim's "stride 8" variants).

API::

    embed = StridedPatchEmbed(img_size=224, patch_size=16, stride=8, embed_dim=192)
    tokens = embed(images)                      # (B, 3, H, W) -> (B, M, D), M = prod((H - 16) // 8 + 1)
    embed.dynamic_feat_size((H, W))             # the token grid (gh, gw) for another image size

timm's :class:`~timm.layers.PatchEmbed` with ``Conv2d(kernel=patch_size, stride=stride)`` and the
grid ``(img - patch) // stride + 1`` of the official Vim code; with ``stride == patch_size`` it is
timm's patch embedding.
"""

from __future__ import annotations

import torch
from timm.layers import Format, PatchEmbed, nchw_to, register_notrace_module, to_2tuple
from torch import nn

__all__ = ["StridedPatchEmbed"]


@register_notrace_module  # its input checks branch on the image size
class StridedPatchEmbed(PatchEmbed):
    """Image to (possibly overlapping) patch tokens.

    Args:
        img_size: nominal input size (H, W) or an int.
        patch_size: conv kernel size.
        stride: conv stride, ``patch_size`` if None.
        in_chans: input channels.
        embed_dim: token width D.
        output_fmt: None for flattened (B, M, D) tokens, else a timm ``Format`` such as "NHWC".
        bias: conv bias.
        strict_img_size: require inputs of exactly ``img_size``.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        stride: int | tuple[int, int] | None = None,
        in_chans: int = 3,
        embed_dim: int = 768,
        output_fmt: str | None = None,
        bias: bool = True,
        strict_img_size: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        self.stride = to_2tuple(stride or patch_size)  # read by _init_img_size during PatchEmbed.__init__
        super().__init__(
            img_size=img_size,
            patch_size=patch_size,  # type: ignore[arg-type]  # timm annotates int; it takes (h, w) through to_2tuple
            in_chans=in_chans,
            embed_dim=embed_dim,
            output_fmt=output_fmt,
            bias=bias,
            strict_img_size=strict_img_size,
        )
        self.proj = nn.Conv2d(
            in_chans, embed_dim, kernel_size=self.patch_size, stride=self.stride, bias=bias, device=device, dtype=dtype
        )

    def _init_img_size(self, img_size):
        if img_size is None:
            return None, None, None
        img_size = to_2tuple(img_size)
        grid_size = self.dynamic_feat_size(img_size)
        return img_size, grid_size, grid_size[0] * grid_size[1]

    def dynamic_feat_size(self, img_size: tuple[int, int]) -> tuple[int, int]:
        """Token grid (gh, gw) of an image of size ``img_size`` (H, W)."""
        return (
            (img_size[0] - self.patch_size[0]) // self.stride[0] + 1,
            (img_size[1] - self.patch_size[1]) // self.stride[1] + 1,
        )

    def feat_ratio(self, as_scalar: bool = True) -> int | tuple[int, int]:
        """Pixels between neighbouring tokens: the stride."""
        return max(self.stride) if as_scalar else self.stride

    def set_input_size(self, img_size=None, patch_size=None) -> None:
        """Change the nominal image size; the patch size is fixed."""
        if patch_size is not None and to_2tuple(patch_size) != self.patch_size:
            raise ValueError(f"StridedPatchEmbed cannot change patch_size from {self.patch_size} to {to_2tuple(patch_size)}")
        if img_size is not None:
            self.img_size, self.grid_size, self.num_patches = self._init_img_size(img_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, M, D), or the ``output_fmt`` layout of the (B, D, gh, gw) grid."""
        height, width = x.shape[-2:]
        if self.strict_img_size and self.img_size is not None and (height, width) != tuple(self.img_size):
            raise ValueError(
                f"input image size ({height}, {width}) does not match the model's img_size {tuple(self.img_size)}; "
                "create the model with dynamic_img_size=True or call set_input_size()"
            )
        if height < self.patch_size[0] or width < self.patch_size[1]:
            raise ValueError(f"input image size ({height}, {width}) is smaller than the patch size {self.patch_size}")
        x = self.proj(x)
        if self.flatten:
            x = x.flatten(2).transpose(1, 2)
        elif self.output_fmt != Format.NCHW:
            x = nchw_to(x, self.output_fmt)
        return self.norm(x)
