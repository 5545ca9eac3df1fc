"""One way from a name or a file to a model: released weights, a weights file, a ``vimkit fit`` checkpoint, or random.

API::

    loaded = load_model("vim_small_patch16_224.in1k")                     # released weights (cached, else downloaded)
    loaded = load_model("vim_tiny_patch16_224", weights="vim_t.pth")       # a weights file, through the family's filter
    loaded = load_model(weights="runs/quickstart/latest/checkpoints/last.ckpt")  # the run's model, settings and EMA weights
    loaded = load_model("test_vim", random_weights=True, seed=0)            # seeded random weights, asked for by name
    loaded.model, loaded.name, loaded.kwargs, loaded.weights                # the model and what it was made from

    checkpoint = read_training_checkpoint("last.ckpt")                    # the one reader of our .ckpt files
    checkpoint.model, checkpoint.num_classes, checkpoint.class_names, checkpoint.weights(use_ema=True)

Training (the classifiers), ``vimkit predict``, ``vimkit export`` and ``vimkit extract`` all build their models here, so a
name, a file or a tag behaves the same everywhere, with the same errors: :class:`~vim.models.weights.NoReleasedWeightsError`
for a name without released weights, :class:`~vim.models.weights.WeightsUnavailableError` (naming the file and the cache)
when they cannot be had, ValueError naming the file for a file that is missing, empty, unsafe or does not fit.

Weight files are read without running pickled code: ``.ckpt`` files by :func:`read_training_checkpoint`, every other file
through timm's pretrained path into :func:`~vim.models.checkpoint.load_checkpoint_into` (the family's filter, position
embeddings resampled, a classifier of another size dropped). No Lightning is imported: a ``.ckpt`` is a dict.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import timm
import torch
from torch import nn

from vim.files import check_weights_file, is_remote

from .checkpoint import read_checkpoint
from .weights import create_released_model, released_weights

__all__ = [
    "CHECKPOINT_SUFFIX",
    "LoadedModel",
    "TrainingCheckpoint",
    "create_model",
    "load_model",
    "read_training_checkpoint",
]

CHECKPOINT_SUFFIX = ".ckpt"
"""The suffix of ``vimkit fit`` checkpoints (Lightning's), which record the model's name and settings beside its weights."""
MODEL_PREFIX = "model."
EMA_PREFIX = "ema.module."
SIZE_ARGUMENTS = ("img_size", "num_frames", "num_groups", "group_size")
"""Hyper-parameters of a classifier that are model arguments too (besides its ``model_kwargs``)."""


@dataclass(frozen=True)
class TrainingCheckpoint:
    """What a ``vimkit fit`` checkpoint records of its model.

    Attributes:
        path: the file (absolute) or URL.
        model: the timm name it was trained as (None in a checkpoint of another LightningModule).
        model_kwargs: the ``create_model`` arguments besides the class count (``model_kwargs`` and the size arguments).
        num_classes: the classifier's outputs.
        class_names: the class of each output.
        data_settings: the data module's hyper-parameters (image size, crop, normalisation, points per cloud, ...).
        hparams: the task module's hyper-parameters (what else its task builds, e.g. a segmentation decoder's width).
        state_dict: the LightningModule's state dict (``model.*`` and, with EMA, ``ema.module.*``).
    """

    path: str
    model: str | None
    model_kwargs: dict[str, Any]
    num_classes: int | None
    class_names: list[str]
    data_settings: dict[str, Any]
    hparams: dict[str, Any]
    state_dict: dict[str, torch.Tensor] = field(repr=False)

    def weights(self, use_ema: bool = True) -> dict[str, torch.Tensor]:
        """The model's state dict (timm key names): the EMA weights when ``use_ema`` and the run kept them, else the
        trained ones. ValueError when the checkpoint holds no classifier's model."""
        has_ema = any(key.startswith(EMA_PREFIX) for key in self.state_dict)
        prefix = EMA_PREFIX if use_ema and has_ema else MODEL_PREFIX
        weights = {key[len(prefix) :]: value for key, value in self.state_dict.items() if key.startswith(prefix)}
        if not weights:
            raise ValueError(f"checkpoint '{self.path}' has no '{MODEL_PREFIX}*' weights: not a checkpoint of vimkit fit")
        return weights


def read_training_checkpoint(source: str | os.PathLike, argument: str = "checkpoint") -> TrainingCheckpoint:
    """Read a ``vimkit fit`` checkpoint, a local file (memory-mapped: tensors are read when used) or a URL (downloaded
    into a temporary folder, as ``--ckpt_path`` takes it), without running pickled code; ``argument`` names the setting
    in errors.

    Raises:
        ValueError: the file is missing or empty, holds objects that are not plain data, or is no Lightning checkpoint.
    """
    path = source if is_remote(source) else check_weights_file(source, argument).resolve()
    checkpoint = read_checkpoint(path, mmap=True)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise ValueError(f"{argument}: '{path}' is not a Lightning checkpoint (no 'state_dict')")
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    kwargs = dict(hparams.get("model_kwargs") or {})
    kwargs.pop("pretrained", None)  # the checkpoint's weights replace any released ones (older runs set it here)
    kwargs.update({key: hparams[key] for key in SIZE_ARGUMENTS if hparams.get(key) is not None})
    return TrainingCheckpoint(
        path=str(path),
        model=hparams.get("model"),
        model_kwargs=kwargs,
        num_classes=hparams.get("num_classes"),
        class_names=list(checkpoint.get("class_names") or []),
        data_settings=dict(checkpoint.get("datamodule_hyper_parameters") or {}),
        hparams=hparams,
        state_dict=checkpoint["state_dict"],
    )


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, **kwargs)``; an unknown name raises ValueError listing the closest known names."""
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.5)
        hint = f"; close names: {', '.join(close)}" if close else "; see timm.list_models()"
        raise ValueError(f"model '{name}' is not a registered timm model{hint}")
    return timm.create_model(name, **kwargs)


@dataclass
class LoadedModel:
    """A model and what it was made from.

    Attributes:
        model: the model, in train mode as timm returns it.
        name: its timm name.
        kwargs: the ``create_model`` arguments that shape it (a checkpoint's settings, then the caller's), without the
            weight source and the class count.
        weights: where the weights came from: ``{"checkpoint": {"path"}}``, ``{"released": {"tag", "source"}}`` or
            ``{"random": {"seed"}}``.
        checkpoint: the ``vimkit fit`` checkpoint it came from (class names, data settings), None otherwise.
    """

    model: nn.Module
    name: str
    kwargs: dict[str, Any]
    weights: dict[str, Any]
    checkpoint: TrainingCheckpoint | None = None


def load_model(
    name: str | None = None,
    weights: str | os.PathLike | None = None,
    *,
    pretrained: bool = False,
    random_weights: bool = False,
    seed: int | None = None,
    num_classes: int | None = None,
    head: bool = True,
    file_head: bool = True,
    use_ema: bool = True,
    argument: str = "weights",
    **model_kwargs: Any,
) -> LoadedModel:
    """A model from one weight source: ``weights`` (a file), ``pretrained`` (the name's released weights) or
    ``random_weights`` (seeded by ``seed``); with none of them, timm's random initialisation.

    Args:
        name: timm name, with a tag for released weights (``vim_tiny_patch16_224.in1k``); may be left out with a
            ``.ckpt``, which records it.
        weights: a ``vimkit fit`` checkpoint (``.ckpt``: its model settings, class count and (EMA) weights) or a weights
            file (``.safetensors`` from ``vimkit export``, an official ``.pth``).
        pretrained: the released weights of ``name``'s tag (timm's cache, else downloaded).
        random_weights: random weights, asked for explicitly (``seed`` makes them reproducible).
        seed: seed of the random initialisation.
        num_classes: classifier outputs (default: the checkpoint's, else the model's).
        head: keep the classifier; False gives the pooled pre-logits features (timm's ``num_classes=0``).
        file_head: a weights file's classifier is the model's: ``num_classes`` is its size, and one that does not fit is
            refused. False: timm's rule for fine-tuning, the file's classifier is dropped (re-initialised) when
            ``num_classes`` differs from the class count of the model's released weights.
        use_ema: take a ``.ckpt``'s EMA weights when the run kept them.
        argument: the setting that gave ``weights``, named in errors (``--checkpoint``, ``model.pretrained_file``).
        model_kwargs: more ``timm.create_model`` arguments; they win over a checkpoint's.

    Raises:
        ValueError: no name, sources that exclude each other, an unknown name, or a file that is missing, empty, unsafe
            or does not fit (naming the file and the setting).
        NoReleasedWeightsError, WeightsUnavailableError: from :mod:`vim.models.weights`, for ``pretrained``.
    """
    sources = {"weights": weights is not None, "pretrained": pretrained, "random_weights": random_weights}
    given = [source for source, on in sources.items() if on]
    if len(given) > 1:
        raise ValueError(f"{' and '.join(given)} each choose the weights: give one")
    if weights is not None:
        weights = check_weights_file(weights, argument)  # a local file: the commands that load models take no URL
    if weights is not None and weights.suffix == CHECKPOINT_SUFFIX:
        checkpoint = read_training_checkpoint(weights, argument)
        return _from_training_checkpoint(name, checkpoint, num_classes, head, use_ema, model_kwargs)
    if name is None:
        raise ValueError(f"no model: pass a timm model name, or a {CHECKPOINT_SUFFIX} file of vimkit fit that records one")
    kwargs = dict(model_kwargs)
    classes = {} if head and num_classes is None else {"num_classes": num_classes if head else 0}
    if weights is not None:
        file_classes = num_classes if file_head and head else None
        return _from_weights_file(name, weights, argument, kwargs, classes, file_classes)
    if pretrained:
        model = create_released_model(name, **kwargs, **classes)  # NoReleasedWeightsError for a name without any
        info = released_weights(name)
        assert info is not None  # create_released_model found them
        return LoadedModel(model, name, kwargs, {"released": {"tag": info.name, "source": info.location}})
    if seed is not None:
        torch.manual_seed(seed)
    return LoadedModel(create_model(name, **kwargs, **classes), name, kwargs, {"random": {"seed": seed}})


def _from_training_checkpoint(
    name: str | None, checkpoint: TrainingCheckpoint, num_classes: int | None, head: bool, use_ema: bool, model_kwargs: dict
) -> LoadedModel:
    """The checkpoint's model (its name unless ``name`` is given) with its (EMA) weights, loaded strictly."""
    name = name or checkpoint.model
    if name is None:
        raise ValueError(f"checkpoint '{checkpoint.path}' records no model name: pass one")
    kwargs = {**checkpoint.model_kwargs, **model_kwargs}
    classes = num_classes if num_classes is not None else checkpoint.num_classes
    model = create_model(name, **kwargs, **({"num_classes": classes} if classes is not None else {}))
    missing, unexpected = model.load_state_dict(checkpoint.weights(use_ema), strict=False)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint '{checkpoint.path}' does not fit {name} ({kwargs}): missing keys {missing[:5]}, unexpected keys "
            f"{unexpected[:5]} (check the model name and its arguments)"
        )
    if not head:
        cast(Any, model).reset_classifier(0)  # every timm model has it; nn.Module does not declare it
    return LoadedModel(model, name, kwargs, {"checkpoint": {"path": checkpoint.path}}, checkpoint)


def _from_weights_file(
    name: str, path: Path, argument: str, kwargs: dict, classes: dict, file_classes: int | None
) -> LoadedModel:
    """``name`` with the weights of ``path`` through timm's pretrained path (the family's filter and safe reader);
    ``file_classes``: the file's classifier size, so that its classifier is loaded (and checked) rather than dropped."""
    overlay: dict[str, Any] = {"file": str(path)}
    if file_classes is not None:
        overlay["num_classes"] = file_classes
    try:
        model = create_model(name, **kwargs, **classes, pretrained=True, pretrained_cfg_overlay=overlay)
    except (RuntimeError, ValueError) as error:
        where = "" if str(path) in str(error) else f"'{path}' does not fit {name} (arguments {kwargs}): "
        raise ValueError(f"{argument}: {where}{error}") from error
    return LoadedModel(model, name, kwargs, {"checkpoint": {"path": str(path.resolve())}})
