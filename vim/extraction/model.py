"""The model an extraction runs: built by :func:`vim.models.loading.load_model`, headless and in eval mode, with what
the manifest records of it (its name, arguments and the identity of its weights) and the feature keys it can give."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from torch import nn

import vim.models  # noqa: F401  (registers the Vim backbones in timm)
from vim.data.modalities import model_modality
from vim.files import file_identity
from vim.models.loading import load_model

__all__ = ["ExtractionModel", "build_model"]


@dataclass
class ExtractionModel:
    """The headless model in eval mode and what the manifest records of it.

    Args:
        network: the model.
        name: its timm name.
        kwargs: the ``create_model`` arguments it was created with.
        weights: where its weights came from: ``{"checkpoint": {"path", "sha256", "size"}}``, ``{"random": {"seed"}}``
            or ``{"released": {"tag", "source"}}``.
        data_hparams: the training data module's settings (a Lightning checkpoint's ``datamodule_hyper_parameters``;
            empty otherwise).
    """

    network: nn.Module
    name: str
    kwargs: dict[str, Any]
    weights: dict[str, Any]
    data_hparams: dict[str, Any]

    @property
    def modality(self) -> str:
        """What the model takes (:func:`vim.data.modalities.model_modality`)."""
        return model_modality(self.network)

    def check_layers(self, layers: Sequence[int]) -> list[int]:
        """``layers`` sorted, once each; ValueError unless the model is a vim backbone with those intermediates (the
        blocks of a flat trunk, the stages of a hierarchical one: what its ``forward_intermediates`` numbers)."""
        layers = sorted(set(int(i) for i in layers))
        if not layers:
            return layers
        if not getattr(self.network, "modality", None):  # the input contract every vim family declares
            raise ValueError(f"layers={layers}: model '{self.name}' is not a vim backbone, whose blocks the layers number")
        count = cast(Any, self.network).num_intermediates  # a vim backbone's; nn.Module does not declare it
        if not all(0 <= i < count for i in layers):
            raise ValueError(f"layers={layers}: model '{self.name}' has intermediates 0..{count - 1} (blocks or stages)")
        return layers


def build_model(
    model: str | None, checkpoint: str | None, model_kwargs: dict[str, Any] | None, random_weights: bool = False, seed: int = 0
) -> ExtractionModel:
    """The headless model in eval mode, its name, the kwargs it was created with, and where its weights came from
    (:func:`vim.models.loading.load_model`).

    Weights: ``checkpoint`` (identified by its contents' sha256 and size, so that the same path rewritten is other
    weights); else, with ``random_weights``, a random initialisation seeded by ``seed``; else the released weights of
    the name's timm tag. ValueError when the name has none or they cannot be had.
    """
    if random_weights and checkpoint is not None:
        raise ValueError("random_weights (--random-weights) and a checkpoint exclude each other: pass one")
    loaded = load_model(
        model, checkpoint, pretrained=checkpoint is None and not random_weights, random_weights=random_weights,
        seed=seed if random_weights else None, head=False, argument="checkpoint", **(model_kwargs or {}),
    )  # fmt: skip
    weights = loaded.weights
    if checkpoint is not None:
        path = Path(weights["checkpoint"]["path"])
        weights = {"checkpoint": {"path": str(path), **file_identity(path)}}
    data_settings = loaded.checkpoint.data_settings if loaded.checkpoint is not None else {}
    return ExtractionModel(loaded.model.eval(), loaded.name, loaded.kwargs, weights, data_settings)
