"""timm's builder for our families: every weight source, the Hugging Face Hub included, read by our safe loader.

API::

    model = build_backbone(VisionMamba, "vim_tiny_patch16_224", pretrained, **kwargs)   # in a family's _create_*
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from timm.models import build_model_with_cfg
from torch import nn

from .backbone import MambaBackbone
from .checkpoint import CUSTOM_LOAD

__all__ = ["RENAMED_ARGUMENTS", "build_backbone", "renamed_arguments"]

RENAMED_ARGUMENTS = {"scan_backend": "kernel_backend"}
"""Old model arguments, still read from saved configs and checkpoints' ``model_kwargs``, and their new names."""


def _filter_with_model(state_dict: Mapping, model: MambaBackbone) -> dict[str, torch.Tensor]:
    return model.checkpoint_filter(state_dict)


def renamed_arguments(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with each old name of :data:`RENAMED_ARGUMENTS` replaced by its new one, with a FutureWarning (shown once
    per calling place); ValueError when both names are given."""
    for old, new in RENAMED_ARGUMENTS.items():
        if old in kwargs:
            if new in kwargs:
                raise ValueError(f"model arguments {old!r} and {new!r} are one setting ({old!r} is its old name): give {new!r}")
            message = f"model argument {old!r} is now called {new!r}; the old name will be removed"
            warnings.warn(message, FutureWarning, stacklevel=4)
            kwargs = {**{key: value for key, value in kwargs.items() if key != old}, new: kwargs[old]}
    return kwargs


def _released_file(variant: str, pretrained_cfg: Any) -> dict[str, str]:
    """``{"file": path}`` of the released weights of ``variant`` at the tag timm passes (``pretrained_cfg``: a tag, or
    None for the default one), from the cache or downloaded, through :func:`~vim.models.weights.resolve_pretrained`:
    offline, a missing file is one :class:`~vim.models.weights.WeightsUnavailableError` naming the file and the flag
    that takes a local one, not the Hub client's retries and raw error. Empty for a cfg timm resolved otherwise (a
    dict) or a name without released weights (timm then warns and keeps the random weights, as for its own models)."""
    from .weights import has_released_weights, resolve_pretrained

    if pretrained_cfg is not None and not isinstance(pretrained_cfg, str):
        return {}
    name = f"{variant}.{pretrained_cfg}" if pretrained_cfg else variant
    return {"file": str(resolve_pretrained(name))} if has_released_weights(name) else {}


def build_backbone(model_cls: type[nn.Module], variant: str, pretrained: bool = False, feature_cfg: dict | None = None, **kwargs):
    """timm's ``build_model_with_cfg`` for our families, with every weight source read by
    :func:`~vim.models.checkpoint.load_checkpoint_into`.

    ``custom_load`` is set on the resolved pretrained cfg, including when ``pretrained_cfg_overlay`` names a file
    (timm resets it there otherwise); a ``state_dict`` overlay goes through the family's filter as well. Released
    weights are found by :func:`_released_file` (cache first, one clear error when they cannot be had).
    ``out_indices`` (default 3) and ``feature_cfg`` configure ``features_only`` (intermediates through
    ``forward_intermediates``). Old argument names (:data:`RENAMED_ARGUMENTS`) are accepted with a warning.
    """
    kwargs = renamed_arguments(kwargs)
    out_indices = kwargs.pop("out_indices", 3)
    overlay = {**(kwargs.pop("pretrained_cfg_overlay", None) or {}), "custom_load": CUSTOM_LOAD}
    if pretrained and not {"file", "state_dict", "hf_hub_id", "url"} & overlay.keys():  # else the overlay names the source
        overlay.update(_released_file(variant, kwargs.get("pretrained_cfg")))
    return build_model_with_cfg(
        model_cls,
        variant,
        pretrained,
        pretrained_cfg_overlay=overlay,
        pretrained_filter_fn=_filter_with_model,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter", **(feature_cfg or {})),
        **kwargs,
    )
