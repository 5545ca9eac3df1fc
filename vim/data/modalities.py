"""The modalities a model can take, in one table: how files of each are recognised, how a model's evaluation data are
prepared, and how a list of files becomes the dataset that feeds it. No Lightning.

API::

    MODALITIES["images"].extensions                         # (".jpg", ".jpeg", ".png", ...)
    modality_of("clips/a.mp4")                              # "video" (None: no modality's extension)
    spec = MODALITIES[model.modality]                       # the family declares its modality (MambaBackbone.modality)
    preprocessing = evaluation_preprocessing(model, data_settings, num_points=None)
    dataset = spec.dataset(model, ["a.png", "b.png"], preprocessing)   # items: a sample (input first) or Unreadable

Each entry reads only the model's declared contract and its timm attributes (``patch_embed``, ``pretrained_cfg``,
``min_points``), never its class, so a new family plugs in by declaring its ``modality``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from vim.data.images.dataset import IMAGE_EXTENSIONS, ImageFiles
from vim.data.images.transforms import create_image_transform
from vim.data.points.dataset import PointClouds
from vim.data.points.readers import POINT_EXTENSIONS
from vim.data.points.sources import HDF5_EXTENSIONS, HDF5Clouds, PointFiles
from vim.data.samples import UNLABELLED
from vim.data.video.dataset import VideoClips
from vim.data.video.decoding import VIDEO_EXTENSIONS
from vim.data.video.transforms import create_video_transform
from vim.models.point_mamba import trained_on_unit_sphere

__all__ = ["MODALITIES", "TRANSFORM_KEYS", "Modality", "evaluation_preprocessing", "modality_of", "model_modality"]

Preprocessing = Callable[[Any, dict[str, Any]], dict[str, Any]]
"""``(model, data_settings) -> settings``: how the model's evaluation inputs are prepared (:func:`evaluation_preprocessing`).
The model is ``Any``: the table reads its timm attributes (``patch_embed``, ``pretrained_cfg``, ``min_points``), which
``nn.Module`` does not declare."""
DatasetFactory = Callable[[Any, list[str], dict[str, Any]], Dataset]
"""``(model, inputs, preprocessing) -> Dataset`` whose items are a loaded sample (input tensor first, ``path``) or
:class:`~vim.data.samples.Unreadable` (``path``, ``reason``)."""


@dataclass(frozen=True)
class Modality:
    """How one kind of input is recognised and turned into model inputs.

    Args:
        name: "images", "video" or "points" (what a family declares as its ``modality``).
        unit: what one input is called ("image", "clip", "cloud"), e.g. on a progress bar.
        extensions: file name endings of this modality.
        preprocessing: the model's evaluation preprocessing, each setting from the training data module's
            ``data_settings`` where it has one, else the model's.
        dataset: the dataset of a list of input files, prepared with ``preprocessing``'s settings.
    """

    name: str
    unit: str
    extensions: tuple[str, ...]
    preprocessing: Preprocessing
    dataset: DatasetFactory


TRANSFORM_KEYS = ("interpolation", "crop_pct", "mean", "std")
"""Evaluation transform settings that a data module records besides the sizes, which the model is created with."""


def _image_preprocessing(model: Any, data_settings: dict[str, Any]) -> dict[str, Any]:
    """``img_size``, ``interpolation``, ``crop_pct``, ``mean`` and ``std``: the model's pretrained cfg's resize, crop and
    normalisation at the input size the model was created with (which may differ from the cfg's), the data module's
    transform settings winning."""
    from timm.data import resolve_data_config

    config = resolve_data_config({}, model=model)
    nominal = getattr(model, "nominal_input_shape", None)  # a family's input contract; timm's cfg for another model
    img_size = nominal()[-2:] if callable(nominal) else config["input_size"][-2:]
    settings = {"img_size": tuple(img_size), **{key: config[key] for key in TRANSFORM_KEYS}}
    settings.update({key: data_settings[key] for key in TRANSFORM_KEYS if data_settings.get(key) is not None})
    return settings


def _video_preprocessing(model: Any, data_settings: dict[str, Any]) -> dict[str, Any]:
    """The image settings of each frame, and ``num_frames``: the clip length the model was created with."""
    return {**_image_preprocessing(model, data_settings), "num_frames": model.patch_embed.num_frames}


def _point_preprocessing(model: Any, data_settings: dict[str, Any]) -> dict[str, Any]:
    """``num_points`` (the data module's, else the pretrained cfg's ``input_size[-1]``) and ``normalize`` (the data
    module's, else whether the weights were trained on unit-sphere clouds)."""
    return {
        "num_points": data_settings.get("num_points") or model.pretrained_cfg["input_size"][-1],
        "normalize": data_settings.get("normalize", trained_on_unit_sphere(model)),  # as the weights were trained
    }


def _image_dataset(model: Any, inputs: list[str], preprocessing: dict[str, Any]) -> Dataset:
    """Images through the evaluation transform (resize, centre crop, normalise): (3, H, W) each."""
    return ImageFiles([(path, UNLABELLED) for path in inputs], create_image_transform(**preprocessing))


def _video_dataset(model: Any, inputs: list[str], preprocessing: dict[str, Any]) -> Dataset:
    """Clips of ``num_frames`` evenly spaced frames through the evaluation transform: (3, T, H, W) each."""
    settings = {key: value for key, value in preprocessing.items() if key != "num_frames"}
    transform = create_video_transform(**{**settings, "img_size": settings["img_size"][0]})
    return VideoClips([(path, UNLABELLED) for path in inputs], preprocessing["num_frames"], transform)


def _hdf5_file_of(name: str) -> str | None:
    """The HDF5 file of input ``name``: that of a cloud ``<file>[<row>]``, or the name itself for an HDF5 file whose
    clouds could not be counted (:func:`~vim.data.points.sources.hdf5_cloud_names`); None for a point file."""
    if name.endswith("]"):
        return name.rpartition("[")[0]
    return name if name.lower().endswith(HDF5_EXTENSIONS) else None


def _point_dataset(model: Any, inputs: list[str], preprocessing: dict[str, Any]) -> Dataset:
    """Clouds resampled by farthest point sampling to ``num_points`` and (``normalize``) scaled into the unit sphere:
    (N, 3) each. HDF5 rows (``<file>[<row>]``) or point files, not both."""
    h5_files = list(dict.fromkeys(file for file in map(_hdf5_file_of, inputs) if file is not None))
    source: HDF5Clouds | PointFiles
    if h5_files:
        source = HDF5Clouds(h5_files, skip_unreadable=True)  # listed as failed by the caller, as any unreadable input
        if source.names != inputs:
            raise ValueError("point inputs mix HDF5 rows and point files; extract them in separate runs")
    else:
        source = PointFiles([(path, UNLABELLED) for path in inputs])
    return PointClouds(source, preprocessing["num_points"], model.min_points, normalize=preprocessing["normalize"])


MODALITIES: dict[str, Modality] = {
    "images": Modality("images", "image", IMAGE_EXTENSIONS, _image_preprocessing, _image_dataset),
    "points": Modality("points", "cloud", POINT_EXTENSIONS + HDF5_EXTENSIONS, _point_preprocessing, _point_dataset),
    "video": Modality("video", "clip", VIDEO_EXTENSIONS, _video_preprocessing, _video_dataset),
}


def modality_of(path: str) -> str | None:
    """The modality whose extension ``path`` has, or None."""
    lower = path.lower()
    return next((m.name for m in MODALITIES.values() if lower.endswith(m.extensions)), None)


def model_modality(model: nn.Module) -> str:
    """What ``model`` takes: its family's declared ``modality``; "images" for timm's own models, which declare none."""
    return getattr(model, "modality", None) or "images"


def evaluation_preprocessing(
    model: nn.Module, data_settings: dict[str, Any] | None = None, num_points: int | None = None
) -> dict[str, Any]:
    """How inputs are prepared for ``model`` (its modality's :attr:`Modality.preprocessing`): ``{"num_points",
    "normalize"}`` for point clouds, else the evaluation transform's ``img_size``, ``interpolation``, ``crop_pct``,
    ``mean`` and ``std`` (and ``num_frames`` for clips).

    Each setting is, first found: the explicit ``num_points``; the training data module's (``data_settings``, the
    ``datamodule_hyper_parameters`` of a Lightning checkpoint); the model's (its size, its pretrained cfg).
    """
    data_settings = {**(data_settings or {}), **({"num_points": num_points} if num_points else {})}
    return MODALITIES[model_modality(model)].preprocessing(model, data_settings)
