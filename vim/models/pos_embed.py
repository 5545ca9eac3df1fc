"""A class token in the middle of the token sequence, and its learned absolute position embedding.

API::

    x = insert_middle_token(patches, cls_token)       # (B, M, D), (1, 1, D) -> (B, M + 1, D), token at M // 2
    cls, patches = split_middle_token(x)              # (B, M + 1, D) -> (B, 1, D), (B, M, D)
    i = middle_token_index(x.shape[1])                # M // 2
    pos = resample_middle_token_pos_embed(pos_embed, new_size=(gh, gw), old_size=(h, w))

Vision Mamba reads the sequence in both directions, so the class token sits at index ``M // 2``
for ``M`` patches and its position embedding ``(1, M + 1, D)`` is laid out in sequence order with
the class slot there. Resampling to another grid interpolates the patch part and re-inserts the
class slot in the middle of the new sequence.
"""

from __future__ import annotations

import torch
from timm.layers import register_notrace_function, resample_abs_pos_embed

__all__ = ["insert_middle_token", "middle_token_index", "resample_middle_token_pos_embed", "split_middle_token"]


def middle_token_index(num_tokens: int) -> int:
    """Index of the class token in a sequence of ``num_tokens`` = M + 1 tokens: M // 2."""
    return (num_tokens - 1) // 2


def insert_middle_token(patches: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """Insert ``token`` (1, 1, D) at index M // 2 of ``patches`` (B, M, D); returns (B, M + 1, D)."""
    middle = patches.shape[1] // 2
    token = token.expand(patches.shape[0], -1, -1).to(patches.dtype)
    return torch.cat([patches[:, :middle], token, patches[:, middle:]], dim=1)


def split_middle_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Undo :func:`insert_middle_token`: (B, M + 1, D) -> class token (B, 1, D), patches (B, M, D)."""
    middle = middle_token_index(x.shape[1])
    return x[:, middle : middle + 1], torch.cat([x[:, :middle], x[:, middle + 1 :]], dim=1)


@register_notrace_function  # branches on the grid size
def resample_middle_token_pos_embed(
    pos_embed: torch.Tensor,
    new_size: tuple[int, int],
    old_size: tuple[int, int],
    interpolation: str = "bicubic",
    antialias: bool = True,
) -> torch.Tensor:
    """Resample a (1, h * w + 1, D) middle-class-slot position embedding to the grid ``new_size``.

    Args:
        pos_embed: (1, h * w + 1, D), the class slot at index (h * w) // 2.
        new_size: target grid (gh, gw).
        old_size: the grid (h, w) of ``pos_embed``.

    Returns:
        (1, gh * gw + 1, D) with the class slot at index (gh * gw) // 2; ``pos_embed`` itself when
        the grid is unchanged.
    """
    if tuple(new_size) == tuple(old_size):
        return pos_embed
    if pos_embed.shape[1] != old_size[0] * old_size[1] + 1:
        raise ValueError(
            f"pos_embed has shape {tuple(pos_embed.shape)}, expected (1, {old_size[0]} * {old_size[1]} + 1, D) "
            f"for the grid {tuple(old_size)}"
        )
    cls_slot, patches = split_middle_token(pos_embed)
    patches = resample_abs_pos_embed(
        patches,
        new_size=list(new_size),
        old_size=list(old_size),
        num_prefix_tokens=0,
        interpolation=interpolation,
        antialias=antialias,
    )
    return insert_middle_token(patches, cls_slot)
