"""Released checkpoints: one safe reader and one loading path for every family and every weight source.

API::

    state_dict = load_official_checkpoint("vim_t_midclstok_76p1acc.pth")   # any family's .pth, or a .safetensors file
    load_checkpoint_into(model, "finetune_modelnet.pth")                    # read, map (the family's filter), load

The released files are training checkpoints: the weights sit under ``"model"`` (Vim, VideoMamba; also
``"model_ema"`` when EMA was on, which is read only on request: the published accuracies are those of
``"model"``) or ``"base_model"`` (PointMamba), next to optimizer / scheduler state,
metrics and often an ``argparse.Namespace`` of the run's arguments. They are read by :func:`read_checkpoint`,
the one reader of every torch checkpoint in vim (Lightning ``.ckpt`` files included, from a path or a URL):
``torch.load(weights_only=True)``, allowing only :data:`SAFE_GLOBALS`, so no pickled code runs; a file that holds
anything else is refused with :class:`CheckpointError`.

Every registered model of ours is built by :func:`vim.models.builder.build_backbone`, which sets timm's ``custom_load``: timm
resolves the weight source as usual (a ``pretrained_cfg_overlay`` file, a URL downloaded into torch hub's
cache, a Hugging Face Hub file downloaded into its cache) and hands the local file to the model's
``load_pretrained``, which calls :func:`load_checkpoint_into`. So a file is read the same way whether it came
from disk, a URL or the Hub. :func:`load_checkpoint_into` reads it with :func:`load_official_checkpoint`,
maps it with the family's ``checkpoint_filter_fn`` (``model.checkpoint_filter``), adapts the input channels of
a 2-D patch kernel and drops a classifier that does not fit (both as timm does), then loads it with every key
accounted for: a missing or unexpected key is refused, naming it. A family's filter takes its trunk out of a
detection / segmentation checkpoint (mmdetection / mmsegmentation: the backbone under ``backbone.``) with
:func:`trunk_of_dense_checkpoint`.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import pickle
import re
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import fsspec
import torch
from timm.models import adapt_input_conv
from torch import nn

from vim.files import is_remote

__all__ = [
    "CUSTOM_LOAD",
    "SAFE_GLOBALS",
    "CheckpointError",
    "FilteredModel",
    "KeyRules",
    "checked",
    "classifier_keys",
    "described_groups",
    "is_dense_checkpoint",
    "load_checkpoint_into",
    "load_official_checkpoint",
    "read_checkpoint",
    "rename_key",
    "renamed_state_dict",
    "safely_unpickled",
    "square_grid",
    "trunk_of_dense_checkpoint",
    "unwrap_state_dict",
]

_logger = logging.getLogger(__name__)

SAFE_GLOBALS: list = [argparse.Namespace]
"""Non-tensor types a released checkpoint may hold that ``torch.load(weights_only=True)`` accepts."""


class Bookkeeping:
    """What a released weights file's training bookkeeping (mmengine's ``message_hub`` of ``HistoryBuffer`` objects and
    the numpy arrays in them) is read as: an empty object. It is created and filled without calling anything of the
    type it stands for, so reading it runs no code of the file; the weights never depend on it."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Bookkeeping:
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


BOOKKEEPING_TYPES = (
    "mmengine.logging.history_buffer.HistoryBuffer",
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    "numpy.ndarray",
    "numpy.dtype",
)
"""Types that training frameworks pickle beside the weights of a released file (mmengine's checkpoint hook saves its
message hub's ``HistoryBuffer`` objects and their numpy arrays): :func:`load_official_checkpoint` reads them as inert
:class:`Bookkeeping` objects instead of refusing the file. Numpy's own types among them are never called either, so an
object array's contents go through the same restricted unpickler."""

WEIGHT_KEYS = ("model", "base_model", "state_dict")
"""Where training checkpoints keep the model weights: Vim / VideoMamba / DeiT, PointMamba, Lightning."""

DENSE_BACKBONE_PREFIX = "backbone."
"""Where an mmdetection / mmsegmentation checkpoint keeps its backbone's weights (beside ``neck.``, ``decode_head.``,
``rpn_head.``, ...): VMamba's released Mask R-CNN and UperNet files."""

CUSTOM_LOAD = "hf"
"""timm's ``custom_load`` value that sends every source, Hugging Face Hub included, to ``model.load_pretrained``."""


class FilteredModel(Protocol):
    """What :func:`load_checkpoint_into` needs of a model: timm's ``nn.Module`` API and its family's checkpoint filter."""

    num_classes: int

    def checkpoint_filter(self, state_dict: Mapping) -> dict[str, torch.Tensor]: ...

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any: ...


class CheckpointError(ValueError):
    """A checkpoint that is not read: it holds pickled objects outside :data:`SAFE_GLOBALS` (code that unpickling would
    run), or its URL could not be downloaded. The message is one line naming the file or URL and why."""


def read_checkpoint(source: str | os.PathLike, map_location: Any = "cpu", mmap: bool = False, bookkeeping: bool = False) -> Any:
    """What the torch checkpoint at ``source`` holds, read without executing pickled code.

    ``torch.load(weights_only=True)`` with only :data:`SAFE_GLOBALS` allowed, whatever the caller or a library would
    default to (Lightning turns ``weights_only`` off for URLs).

    Args:
        source: a local path, or a URL fsspec reads (``https://``, ``s3://``, ...), downloaded into a temporary
            folder that is removed once read.
        map_location: as ``torch.load``'s.
        mmap: memory-map a local file (tensors are read when used); a download is read whole.
        bookkeeping: read objects of :data:`BOOKKEEPING_TYPES` as inert :class:`Bookkeeping` objects (for files read
            for their weights alone) instead of refusing the file.

    Raises:
        FileNotFoundError: no such local file.
        CheckpointError: the file holds objects outside :data:`SAFE_GLOBALS`, or the URL could not be downloaded.
    """
    with safely_unpickled(source, bookkeeping) as path:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap and not is_remote(source))


@contextlib.contextmanager
def safely_unpickled(source: str | os.PathLike, bookkeeping: bool = False) -> Iterator[Path]:
    """The local file of ``source`` (a URL downloaded, as :func:`read_checkpoint` does), to ``torch.load`` with
    ``weights_only=True`` inside: :data:`SAFE_GLOBALS` (and, with ``bookkeeping``, :data:`BOOKKEEPING_TYPES` as inert
    stand-ins) are allowed there, and an object outside them raises :class:`CheckpointError` naming ``source``. For
    loaders that take a path (Lightning's ``load_from_checkpoint``)."""
    allowed = SAFE_GLOBALS + ([(Bookkeeping, name) for name in BOOKKEEPING_TYPES] if bookkeeping else [])
    with _local_copy(source) as path:
        try:
            with torch.serialization.safe_globals(allowed):
                yield path
        except pickle.UnpicklingError as error:
            raise CheckpointError(
                f"checkpoint '{source}' is refused: it holds pickled objects that could run code when loaded, which "
                f"torch.load(weights_only=True) does not allow ({_refused_object(error)}). If you trust the file, allow "
                "their types with torch.serialization.add_safe_globals([...]) (or append them to "
                "vim.models.checkpoint.SAFE_GLOBALS), or re-save only its weights."
            ) from error


@contextlib.contextmanager
def _local_copy(source: str | os.PathLike) -> Iterator[Path]:
    """The local file of ``source``: the path itself, or a URL's download in a temporary folder (removed afterwards)."""
    if not is_remote(source):
        path = Path(fsspec.core.strip_protocol(str(source)))  # file:///a/b.ckpt is /a/b.ckpt
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint file '{path}' does not exist")
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="vim-checkpoint-") as folder:
        path = Path(folder) / "checkpoint"
        try:
            filesystem, remote_path = fsspec.core.url_to_fs(str(source))
            filesystem.get_file(remote_path, str(path))
        except Exception as error:  # the network's errors come from fsspec's backends: aiohttp, botocore, ...
            raise CheckpointError(f"checkpoint '{source}' could not be downloaded: {type(error).__name__}: {error}") from error
        yield path


def _refused_object(error: pickle.UnpicklingError) -> str:
    """The reason torch's weights-only unpickler gives (e.g. ``Unsupported global: GLOBAL os.system ...``), without the
    paragraphs of advice around it."""
    found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\.\s|\n\n|$)", str(error), re.DOTALL)
    reason = found.group(1) if found is not None else str(error)
    return " ".join(reason.split())


def unwrap_state_dict(checkpoint: Mapping, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """The model weights of a training checkpoint, keys without a DDP ``module.`` prefix.

    Args:
        checkpoint: a state dict, or a dict holding one under :data:`WEIGHT_KEYS` (or ``"model_ema"``).
        use_ema: take ``"model_ema"`` when the checkpoint has it. Off by default: the DeiT-lineage training scripts
            (Vim, VideoMamba) save the EMA copy beside ``"model"``, but evaluate, select and publish ``"model"``.
    """
    for key in (("model_ema",) if use_ema else ()) + WEIGHT_KEYS:
        if isinstance(checkpoint.get(key), Mapping):
            checkpoint = checkpoint[key]
            break
    return {name.removeprefix("module."): value for name, value in checkpoint.items()}


def load_official_checkpoint(path: str | Path, use_ema: bool = False, mmap: bool = False) -> dict[str, torch.Tensor]:
    """Read a released ``.pth`` (Vim, VideoMamba, PointMamba, VMamba's mmdetection / mmsegmentation files) or a
    ``.safetensors`` file without executing pickled code (training bookkeeping beside the weights is read as inert
    objects: :data:`BOOKKEEPING_TYPES`).

    Args:
        path: the checkpoint file.
        use_ema: take the EMA weights (``"model_ema"``) when the checkpoint has them instead of ``"model"``, the
            weights upstream's published accuracy is for.
        mmap: memory-map a ``.pth`` file (its tensors are read when used).

    Returns:
        The model's state dict (the file's own parameter names).

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: the file holds pickled objects outside :data:`SAFE_GLOBALS`.
        ValueError: the file holds no dict of weights.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return unwrap_state_dict(load_file(path), use_ema)
    checkpoint = read_checkpoint(path, mmap=mmap, bookkeeping=True)
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"checkpoint {str(path)!r} holds a {type(checkpoint).__name__}, expected a dict of tensors")
    return unwrap_state_dict(checkpoint, use_ema)


def is_dense_checkpoint(state_dict: Mapping) -> bool:
    """Whether an unwrapped state dict (:func:`unwrap_state_dict`) is an mmdetection / mmsegmentation model's: its
    backbone under :data:`DENSE_BACKBONE_PREFIX`."""
    return any(key.startswith(DENSE_BACKBONE_PREFIX) for key in state_dict)


def described_groups(keys: Iterable[str]) -> str:
    """``keys`` by their first component, e.g. ``"neck.* (16 keys), rpn_head.* (6 keys)"``, for a message."""
    counts = Counter(key.split(".", 1)[0] for key in keys)
    return ", ".join(f"{group}.* ({count} key{'s' if count > 1 else ''})" for group, count in sorted(counts.items()))


def trunk_of_dense_checkpoint(state_dict: Mapping, model: nn.Module, dense_only: re.Pattern[str]) -> dict[str, torch.Tensor]:
    """The weights of a classification ``model``'s trunk in an mmdetection / mmsegmentation checkpoint
    (:func:`is_dense_checkpoint`), under the family's official names.

    The ``backbone.*`` keys lose their prefix; those of the dense backbone's own modules (matching ``dense_only``: its
    per-stage output norms) are left out, as are the neck's and the heads'. The dense backbone has no final norm: the
    model's ``norm_f.*`` (if not pruned) is returned as it is, so it keeps its initialisation; its classifier is
    absent, which the loader leaves at its initialisation too. One log line names what was left out.
    """
    backbone = {
        key.removeprefix(DENSE_BACKBONE_PREFIX): v for key, v in state_dict.items() if key.startswith(DENSE_BACKBONE_PREFIX)
    }
    trunk = {key: value for key, value in backbone.items() if not dense_only.match(key)}
    left_out = [key for key in state_dict if not key.startswith(DENSE_BACKBONE_PREFIX)]
    left_out += [DENSE_BACKBONE_PREFIX + key for key in backbone if key not in trunk]
    own_norm = {key: value.detach().clone() for key, value in model.state_dict().items() if key.startswith("norm_f.")}
    _logger.info(
        "checkpoint of a detection / segmentation model: its backbone.* weights load into %s's trunk; %s keep their "
        "initialisation (the dense backbone has no final norm and no classifier); left out: %s (vim.dense.backbone and "
        "vim.dense.segmentation.UPerNet load the output norms and an FPN neck)",
        type(model).__name__,
        sorted(own_norm) or "the final norm and classifier",
        described_groups(left_out),
    )
    return {**trunk, **own_norm}


def square_grid(num_patches: int, key: str) -> tuple[int, int]:
    """The (side, side) grid of ``num_patches`` position-embedding rows; ValueError naming ``key`` if not square."""
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f"checkpoint key {key!r}: {num_patches} patch positions do not form a square grid")
    return side, side


def classifier_keys(model: object, keys: Any) -> list[str]:
    """The entries of ``keys`` under the classifier that ``model.pretrained_cfg["classifier"]`` names ("head" without a cfg)."""
    names = getattr(model, "pretrained_cfg", {}).get("classifier") or "head"
    names = (names,) if isinstance(names, str) else tuple(names)
    return [key for key in keys if any(key.startswith(f"{name}.") for name in names)]


KeyRules = list[tuple[re.Pattern[str], Callable[[re.Match[str]], str]]]
"""Renaming rules of a family's checkpoint filter: a key prefix's pattern and the new prefix from its match."""


def rename_key(key: str, rules: KeyRules) -> str:
    """``key`` with the prefix of the first matching rule replaced (unchanged when none matches)."""
    for pattern, replacement in rules:
        match = pattern.match(key)
        if match:
            return replacement(match) + key[match.end() :]
    return key


def renamed_state_dict(state_dict: Mapping, model: nn.Module, rules: KeyRules) -> dict[str, torch.Tensor]:
    """A family's checkpoint filter from its key ``rules``: the weights of ``state_dict`` (see :func:`unwrap_state_dict`)
    under the model's names, each tensor :func:`checked` against ``model`` (ValueError naming a key that cannot fit);
    keys no rule matches (our own, an exported model's) pass unchanged."""
    state_dict = {rename_key(key, rules): value for key, value in unwrap_state_dict(state_dict).items()}
    expected = model.state_dict()
    classifier = classifier_keys(model, state_dict)
    return {key: checked(key, value, expected, classifier) for key, value in state_dict.items()}


def checked(key: str, value: torch.Tensor, expected: Mapping[str, torch.Tensor], classifier: Any = ()) -> torch.Tensor:
    """``value`` for ``key`` once it fits the model's ``expected`` state dict (keys the model lacks pass).

    Raises:
        ValueError: naming the key and both shapes. Keys in ``classifier`` are left to the loader, which drops a
            classifier of another size; so are a 2-D patch kernel's input channels, which it adapts.
    """
    if key in expected and key not in classifier and not _fits(key, value, expected[key]):
        raise ValueError(f"checkpoint key {key!r} has shape {tuple(value.shape)}, the model expects {tuple(expected[key].shape)}")
    return value


def _fits(key: str, value: torch.Tensor, target: torch.Tensor) -> bool:
    if key == "patch_embed.proj.weight" and value.dim() == target.dim() == 4:
        # in_chans may differ: the loader adapts the input channels afterwards
        return value.shape[0] == target.shape[0] and value.shape[2:] == target.shape[2:]
    return value.shape == target.shape


def _adapt_input_conv(model: object, state_dict: dict[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> None:
    """timm's adaptation of a 2-D first conv to the model's input channels (e.g. RGB weights for a grey model)."""
    first_conv = getattr(model, "pretrained_cfg", {}).get("first_conv")
    key = f"{first_conv}.weight"
    if first_conv and key in state_dict and key in expected and state_dict[key].dim() == 4:
        channels = expected[key].shape[1]
        if state_dict[key].shape[1] != channels:
            state_dict[key] = adapt_input_conv(channels, state_dict[key], base_chans=state_dict[key].shape[1])


def load_checkpoint_into(model: FilteredModel, path: str | Path, use_ema: bool = False, strict: bool = True) -> list[str]:
    """Load a released or exported weights file into ``model`` through its family's filter.

    The file is read by :func:`load_official_checkpoint`, mapped by ``model.checkpoint_filter`` (the family's
    ``checkpoint_filter_fn``: renames, resampled position embeddings, inflation), the input channels of a 2-D
    patch kernel are adapted, and the file's classifier is dropped when the model was asked for another class
    count than its ``pretrained_cfg`` states (or none), as timm does: the model's classifier keeps its
    initialisation. A classifier of the wrong shape is refused otherwise.

    Args:
        model: one of our backbones (anything with ``checkpoint_filter`` and timm's ``pretrained_cfg``).
        path: the file.
        use_ema: take the EMA weights (``"model_ema"``) instead of ``"model"`` when the checkpoint has them.
        strict: refuse missing and unexpected keys (the dropped classifier aside).

    Returns:
        The classifier keys that were dropped.

    Raises:
        FileNotFoundError, ValueError: from :func:`load_official_checkpoint`; ValueError naming the keys that are
            missing, unexpected or of the wrong shape.
    """
    state_dict = model.checkpoint_filter(load_official_checkpoint(path, use_ema=use_ema))
    expected = model.state_dict()
    _adapt_input_conv(model, state_dict, expected)
    classifier = classifier_keys(model, set(state_dict) | set(expected))
    # as timm: the file's classifier is dropped when the model asks for another class count than the weights'
    # (or none), and absent from a pre-training checkpoint; otherwise it must fit, or the model would predict
    # with a silently re-initialised head
    other_classes = model.num_classes != getattr(model, "pretrained_cfg", {}).get("num_classes", model.num_classes)
    replace_classifier = other_classes or not any(key in state_dict for key in classifier)
    if not replace_classifier:
        wrong = {
            key: tuple(state_dict[key].shape)
            for key in sorted(classifier)
            if key in state_dict and key in expected and state_dict[key].shape != expected[key].shape
        }
        if wrong:
            described = ", ".join(
                f"{key!r} has shape {shape}, the model expects {tuple(expected[key].shape)}" for key, shape in wrong.items()
            )
            file_classes = next(iter(wrong.values()))[0]
            raise ValueError(
                f"checkpoint {str(path)!r}: classifier {described}; pass num_classes={file_classes} (and the same "
                "num_classes in pretrained_cfg_overlay) to keep it, or another num_classes for a new classifier"
            )
    dropped = [key for key in classifier if key in state_dict] if replace_classifier else []
    for key in dropped:
        del state_dict[key]
    if dropped:
        _logger.info("%s: classifier %s left at its initialisation (it does not fit the model)", path, sorted(dropped))
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    missing = [key for key in missing if not (replace_classifier and key in classifier)]
    if strict and (missing or unexpected):
        raise ValueError(
            f"checkpoint {str(path)!r} does not fit {type(model).__name__}: missing keys {_listed(missing)}, "
            f"unexpected keys {_listed(unexpected)}"
        )
    return dropped


def _listed(keys: list[str], limit: int = 8) -> str:
    return f"{keys[:limit]}{f' and {len(keys) - limit} more' if len(keys) > limit else ''}"
