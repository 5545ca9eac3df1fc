"""The model to export: loaded with its weights, checked to be one of vim's exportable models, and sized.

Export reads each family's input contract (:class:`~vim.models.timm_api.TimmBackbone`, flat or hierarchical; a
segmentation model, :class:`vim.dense.segmentation.UPerNet`, passes on its trunk's): ``modality`` names the graph's
input, ``nominal_input_shape`` gives the size it is traced at, ``set_input_size`` changes that size and
``export_refusal`` says why a family cannot be exported.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from torch import nn

from vim.models import loading

__all__ = ["INPUT_SIZES", "exportable", "input_sizes", "load_model", "nominal_input_size", "set_input_size"]

INPUT_SIZES = {"img_size": "images or frames", "num_frames": "clips", "num_points": "point clouds"}
"""The size arguments of the families' ``set_input_size`` and what each one sizes (for the error naming a size a family
does not take)."""


@runtime_checkable
class Exportable(Protocol):
    """The input contract that export reads (see the module docstring)."""

    modality: str
    input_kind: str
    export_refusal: str | None

    def nominal_input_shape(self) -> tuple[int, ...]: ...

    def set_input_size(self, *args: Any, **kwargs: Any) -> None: ...


def exportable(model: nn.Module) -> Any:
    """``model`` as an :class:`Exportable` whose family can be exported; ValueError saying why for any other model.

    Typed ``Any``: the model is an ``nn.Module`` and an :class:`Exportable`, which Python's types cannot say together."""
    if not isinstance(model, Exportable):
        raise ValueError(
            f"cannot export a {type(model).__name__}: vim.deploy knows the inputs of vim's backbones (TimmBackbone "
            "models, which declare them) and of their segmentation models only; a features_only wrapper or another timm "
            "model has no input size and output that it knows"
        )
    if model.export_refusal is not None:
        raise ValueError(f"cannot export a {type(model).__name__}: {model.export_refusal}")
    return model


def nominal_input_size(model: nn.Module) -> tuple[int, ...]:
    """The model's nominal input for one sample: (C, H, W), (C, T, H, W) or (N, 3)."""
    return tuple(exportable(model).nominal_input_shape())


def output_name(model: nn.Module) -> str:
    """The name of the exported graph's output: the model's ``output_name``, else ``logits`` for a model with a
    classifier and ``features`` without one."""
    name = getattr(model, "output_name", None)
    if name is not None:
        return name
    get_classifier = getattr(model, "get_classifier", None)
    return "logits" if get_classifier is not None and not isinstance(get_classifier(), nn.Identity) else "features"


def input_sizes(model: Any) -> list[str]:
    """The size arguments of :data:`INPUT_SIZES` that the model's ``set_input_size`` takes (e.g. ``["num_points"]``)."""
    parameters = inspect.signature(model.set_input_size).parameters
    return [key for key in INPUT_SIZES if key in parameters]


def set_input_size(
    model: nn.Module,
    img_size: int | tuple[int, int] | None = None,
    num_frames: int | None = None,
    num_points: int | None = None,
) -> None:
    """Change the nominal frame size (images, video), clip length (video) or cloud size (points) through the family's
    ``set_input_size`` (which resamples the position embeddings); None keeps a size.

    Raises:
        ValueError: naming a size the model's family does not take, and the ones it does.
    """
    backbone = exportable(model)
    given = {key: value for key, value in zip(INPUT_SIZES, (img_size, num_frames, num_points)) if value is not None}
    if not given:
        return
    taken = input_sizes(backbone)
    for key, value in given.items():
        if key not in taken:
            raise ValueError(
                f"{key}={value}: a {type(model).__name__} takes no {INPUT_SIZES[key]}; it takes {backbone.input_kind}, "
                f"sized by {', '.join(taken)}"
            )
    backbone.set_input_size(**given)


def load_model(
    name: str | None = None,
    checkpoint: str | os.PathLike | None = None,
    pretrained: bool = False,
    head: bool = True,
    num_classes: int | None = None,
    img_size: int | tuple[int, int] | None = None,
    num_frames: int | None = None,
    use_ema: bool = True,
    **model_kwargs: Any,
) -> Any:
    """A registered backbone with its weights (:func:`vim.models.loading.load_model`), in eval mode, ready to export.

    Args:
        name: timm model name, with a pretrained tag for ``pretrained`` (e.g. ``vim_tiny_patch16_224.in1k``);
            may be left out with a Lightning checkpoint, which records it.
        checkpoint: a Lightning ``.ckpt`` of a vim task (a classifier: its model settings, class count, (EMA) weights and,
            for points, the cloud size it trained on; a segmenter: its whole UperNet), or a weights file (``.safetensors``
            from ``vimkit export``, an official ``.pth``) loaded through timm's pretrained path (position embeddings
            resampled, shapes checked).
        pretrained: load the timm tag's weights (timm downloads them).
        head: keep the classifier; False: the model outputs its pooled pre-logits features.
        num_classes: size of the classifier in a weights file (default: the model's default).
        img_size: frame size to export at; the position embeddings are resampled (images and video).
        num_frames: clip length to export at (video).
        use_ema: take a Lightning checkpoint's EMA weights when it has them.
        model_kwargs: more ``timm.create_model`` arguments.
    """
    segmenter = load_segmenter(checkpoint, use_ema)
    if segmenter is not None:
        set_input_size(segmenter, img_size)
        return segmenter.eval()
    loaded = loading.load_model(
        name, checkpoint, pretrained=pretrained, num_classes=num_classes, head=head, use_ema=use_ema, argument="checkpoint",
        **model_kwargs,
    )  # fmt: skip
    model = exportable(loaded.model)
    trained_points = loaded.checkpoint.data_settings.get("num_points") if loaded.checkpoint is not None else None
    if trained_points and "num_points" in input_sizes(model):  # a point run's cloud size: what it trained and validated on
        set_input_size(model, num_points=trained_points)
    set_input_size(model, img_size, num_frames)
    return model.eval()


def load_segmenter(checkpoint: str | os.PathLike | None, use_ema: bool = True) -> nn.Module | None:
    """The UperNet of a segmentation run's ``.ckpt`` (:meth:`vim.dense.segmentation.UPerNet.from_training_checkpoint`);
    None for any other file, and for a missing file or a URL (the classifier's loading says what is wrong with those)."""
    if checkpoint is None or Path(checkpoint).suffix != ".ckpt" or not Path(checkpoint).is_file():
        return None
    training = loading.read_training_checkpoint(checkpoint, "checkpoint")
    if "decoder_channels" not in training.hparams:
        return None
    from vim.dense.segmentation import UPerNet  # needs segmentation-models-pytorch (the dense extra)

    return UPerNet.from_training_checkpoint(training, use_ema)
