"""Random norm weights (and biases), so that a test compares norms that are not the identity at init."""

from __future__ import annotations

import torch
from torch import nn


def randomize_norms(model: nn.Module, generator: torch.Generator) -> None:
    """Every LayerNorm / RMSNorm of ``model``: weight ~ 1 + 0.3 N(0, 1), bias ~ 0.3 N(0, 1), drawn from ``generator``."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                module.weight.copy_(1 + 0.3 * torch.randn(module.weight.shape, generator=generator))
                if getattr(module, "bias", None) is not None:
                    module.bias.copy_(0.3 * torch.randn(module.bias.shape, generator=generator))
