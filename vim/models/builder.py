"""timm's builder for our families: every weight source, the Hugging Face Hub included, read by our safe loader.

API::

    model = build_backbone(VisionMamba, "vim_tiny_patch16_224", pretrained, **kwargs)   # in a family's _create_*
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from timm.models import build_model_with_cfg
from torch import nn

from .backbone import MambaBackbone
from .checkpoint import CUSTOM_LOAD

__all__ = ["build_backbone"]


def _filter_with_model(state_dict: Mapping, model: MambaBackbone) -> dict[str, torch.Tensor]:
    return model.checkpoint_filter(state_dict)


def build_backbone(model_cls: type[nn.Module], variant: str, pretrained: bool = False, feature_cfg: dict | None = None, **kwargs):
    """timm's ``build_model_with_cfg`` for our families, with every weight source read by
    :func:`~vim.models.checkpoint.load_checkpoint_into`.

    ``custom_load`` is set on the resolved pretrained cfg, including when ``pretrained_cfg_overlay`` names a file
    (timm resets it there otherwise); a ``state_dict`` overlay goes through the family's filter as well.
    ``out_indices`` (default 3) and ``feature_cfg`` configure ``features_only`` (intermediates through
    ``forward_intermediates``).
    """
    out_indices = kwargs.pop("out_indices", 3)
    overlay = {**(kwargs.pop("pretrained_cfg_overlay", None) or {}), "custom_load": CUSTOM_LOAD}
    return build_model_with_cfg(
        model_cls,
        variant,
        pretrained,
        pretrained_cfg_overlay=overlay,
        pretrained_filter_fn=_filter_with_model,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter", **(feature_cfg or {})),
        **kwargs,
    )
