"""Released weights by model name: which names have them, where their file lives, one clear error when it cannot be had.

API::

    has_released_weights("videomamba_tiny.k400_f16")           # True; False for a name whose tags have no weights
    info = released_weights("pointmamba_scan_small.modelnet40")  # ReleasedWeights (source, file, URL, cache path)
    path = resolve_pretrained("vim_tiny_patch16_224.in1k")       # the local file: cached, else downloaded
    model = create_released_model("videomamba_tiny.k400_f8", num_classes=0)   # timm.create_model(pretrained=True)

A name is ``architecture.tag`` as timm registers it; a bare architecture means its default tag (the first
with weights). The files come from where the upstream projects host them (Hugging Face Hub or a URL) and are
cached where timm caches them: Hugging Face's cache (``HF_HUB_CACHE`` / ``HF_HOME``) for Hub files, torch
hub's ``checkpoints`` folder (``$TORCH_HOME/hub/checkpoints``) for URLs. :func:`resolve_pretrained` takes the
cached file when there is one (``HF_HUB_OFFLINE=1`` never touches the network) and downloads it otherwise.
:func:`create_released_model` then loads it through timm's normal pretrained path, so the family's safe
reader and filter apply (see :mod:`vim.models.checkpoint`).

A name without released weights raises :class:`NoReleasedWeightsError`; a file that is neither cached nor
downloadable raises :class:`WeightsUnavailableError`, whose message names the file, where it was looked for
and where to put it.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
import torch
from timm.models import get_pretrained_cfg, split_model_name_tag
from torch import nn

__all__ = [
    "NoReleasedWeightsError",
    "ReleasedWeights",
    "WeightsUnavailableError",
    "create_released_model",
    "has_released_weights",
    "released_weights",
    "resolve_pretrained",
]


WEIGHTS_FILE_OPTIONS = (
    "timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=PATH)), vim.models.loading.load_model(name, "
    "PATH), vimkit fit --model.pretrained_file PATH, vimkit extract --checkpoint PATH, vimkit export --ckpt PATH"
)
"""Every way to give a weights file instead of released weights, for the error messages."""


class NoReleasedWeightsError(ValueError):
    """The model name has no released weights (unknown name, or a tag without a file)."""


class WeightsUnavailableError(FileNotFoundError):
    """The released file is not in the local cache and could not be downloaded."""


@dataclass(frozen=True)
class ReleasedWeights:
    """Where the released file of a model name comes from and where it is cached.

    Attributes:
        name: ``architecture.tag``.
        num_classes: classifier outputs of the released weights (0: no classifier, e.g. a pre-training file).
        hf_hub_id: the Hugging Face Hub repository, when the file is hosted there (preferred, as timm does).
        filename: the file's name (on the Hub, or in torch hub's cache for a URL).
        url: the upstream URL, when there is one.
    """

    name: str
    num_classes: int
    hf_hub_id: str | None
    filename: str
    url: str | None

    @property
    def source(self) -> str:
        """ "hf-hub" or "url": where :func:`resolve_pretrained` fetches the file from."""
        return "hf-hub" if self.hf_hub_id else "url"

    @property
    def location(self) -> str:
        """The file itself: ``hf-hub:<repository>/<filename>`` for a Hub file, else its URL."""
        return f"hf-hub:{self.hf_hub_id}/{self.filename}" if self.hf_hub_id else str(self.url)

    @property
    def url_cache_file(self) -> Path:
        """Where timm keeps a file downloaded from :attr:`url`: ``<torch hub dir>/checkpoints/<filename>``."""
        return Path(torch.hub.get_dir()) / "checkpoints" / self.filename

    def cached_file(self) -> Path | None:
        """The file in the local cache (Hugging Face's for Hub files, torch hub's for URLs), None if absent."""
        if self.hf_hub_id:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(self.hf_hub_id, self.filename)
            return Path(found) if isinstance(found, str) else None
        return self.url_cache_file if self.url_cache_file.is_file() else None

    def unavailable_message(self, reason: object) -> str:
        """What was looked for, where, and where to put the file."""
        explicit = f"or pass the file itself: {WEIGHTS_FILE_OPTIONS}"

        if self.hf_hub_id:
            from huggingface_hub import constants

            fallback = f" (it is also at {self.url})" if self.url else ""
            return (
                f"released weights of {self.name!r}: file {self.filename!r} of the Hugging Face Hub repository "
                f"{self.hf_hub_id!r} is not in the Hugging Face cache {constants.HF_HUB_CACHE} and could not be "
                f"downloaded ({reason}). Where there is network, run `hf download {self.hf_hub_id} {self.filename}` "
                f"and copy that cache here (or point HF_HUB_CACHE at it){fallback}, {explicit}."
            )
        return (
            f"released weights of {self.name!r}: {self.filename!r} is not in torch hub's cache and could not be "
            f"downloaded from {self.url} ({reason}). Download it where there is network and put it at "
            f"{self.url_cache_file}, {explicit}."
        )


def _split(name: str) -> tuple[str, str | None]:
    architecture, tag = split_model_name_tag(name)
    if not timm.is_model(architecture):
        close = difflib.get_close_matches(architecture, timm.list_models(), n=5, cutoff=0.5)
        hint = f"; close names: {', '.join(close)}" if close else ""
        raise NoReleasedWeightsError(f"model {architecture!r} is not a registered timm model{hint}")
    return architecture, tag or None


def released_weights(name: str) -> ReleasedWeights | None:
    """The released file of ``name`` (``architecture.tag``; a bare architecture means its default tag), None if none.

    Raises:
        NoReleasedWeightsError: ``name`` is not a registered model, or its tag is unknown (listing the known ones).
    """
    architecture, tag = _split(name)
    try:
        cfg = get_pretrained_cfg(f"{architecture}.{tag}" if tag else architecture, allow_unregistered=False)
    except RuntimeError as error:  # timm: "Invalid pretrained tag"
        tags = ", ".join(_tags(architecture))
        raise NoReleasedWeightsError(f"model {architecture!r} has no tag {tag!r}; its tags: {tags}") from error
    if cfg is None:  # registered without any pretrained cfg
        return None
    # timm accepts (url, cache file name) for a URL; ours name generic upstream files ("pretrain.pth") uniquely
    url, url_filename = cfg.url if isinstance(cfg.url, (list, tuple)) else (cfg.url, None)
    if not (cfg.hf_hub_id or url):
        return None
    hub_filename = cfg.hf_hub_filename or "model.safetensors"  # timm's preferred file in a Hub repository
    filename = hub_filename if cfg.hf_hub_id else url_filename or Path(str(urlparse(url).path)).name
    return ReleasedWeights(f"{architecture}.{cfg.tag}", cfg.num_classes, cfg.hf_hub_id, filename, url or None)


def _tags(architecture: str) -> list[str]:
    """Every registered tag of ``architecture`` ("arch.tag" names), with or without weights."""
    return [name.split(".", 1)[1] for name in timm.list_pretrained(f"{architecture}.*")]


def has_released_weights(name: str) -> bool:
    """Whether ``name`` resolves to released weights (False also for names that are not registered)."""
    try:
        return released_weights(name) is not None
    except NoReleasedWeightsError:
        return False


def _require(name: str) -> ReleasedWeights:
    info = released_weights(name)
    if info is None:
        architecture, _ = _split(name)
        with_weights = [tag for tag in _tags(architecture) if released_weights(f"{architecture}.{tag}") is not None]
        hint = f"; its tags with weights: {', '.join(with_weights)}" if with_weights else "; no tag of it has any"
        raise NoReleasedWeightsError(
            f"model {name!r} has no released weights{hint}. Give a weights file ({WEIGHTS_FILE_OPTIONS}), or use random "
            "weights (pretrained=False; vimkit extract --random-weights)"
        )
    return info


def resolve_pretrained(name: str, progress: bool = True) -> Path:
    """The local file of ``name``'s released weights: from the cache, else downloaded into it (with a progress bar).

    Raises:
        NoReleasedWeightsError: ``name`` has no released weights.
        WeightsUnavailableError: the file is not cached and the download failed (no network, offline mode, ...);
            the message names the file, the cache and where to put it.
    """
    info = _require(name)
    cached = info.cached_file()
    if cached is not None:
        return cached
    try:
        if info.hf_hub_id:
            from huggingface_hub import hf_hub_download

            return Path(hf_hub_download(info.hf_hub_id, info.filename))
        assert info.url is not None  # a cfg without a Hub file has a URL (released_weights)
        info.url_cache_file.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(info.url, str(info.url_cache_file), progress=progress)
    except Exception as error:  # no network, offline mode, HTTP errors: all mean the file cannot be had
        raise WeightsUnavailableError(info.unavailable_message(error)) from error
    return info.url_cache_file


def create_released_model(name: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, pretrained=True, **kwargs)`` on the file :func:`resolve_pretrained` found.

    The tag's pretrained cfg is kept (its classifier size, input settings and weight layout); the file is read by
    the family's safe loader. Raises what :func:`resolve_pretrained` raises.
    """
    path = resolve_pretrained(name)
    overlay = {**(kwargs.pop("pretrained_cfg_overlay", None) or {}), "file": str(path)}
    return timm.create_model(_require(name).name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
