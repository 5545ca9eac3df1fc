"""Semantic segmentation on the shared training loop (:class:`~vim.training.task.TaskModule`): UperNet on any image
family, trained and scored as mmsegmentation does (cross-entropy with an ignore index, mIoU over the classes).

``vimkit fit --config configs/segmentation_quickstart.yaml`` trains it on generated scenes; the ADE20K recipes are
``configs/upernet_*_ade20k.yaml``. Batches come from :class:`~vim.data.segmentation.SegmentationDataModule`.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchmetrics.classification import MulticlassConfusionMatrix

from vim.data.images.dataset import read_rgb
from vim.data.segmentation.transforms import IGNORE_INDEX
from vim.dense.inference import whole_logits, window_logits
from vim.files import is_remote
from vim.training.task import TaskModule

EVAL_MODES = ("slide", "whole")


def scores_from_confusion(confusion: torch.Tensor) -> dict[str, torch.Tensor]:
    """mmseg's scores of a (K, K) confusion matrix (rows: true class, columns: predicted): ``IoU`` (K,) and ``Acc``
    (K,) per class (NaN for a class absent from both annotation and prediction), ``mIoU`` and ``mAcc`` their means
    over the classes that are not NaN, ``aAcc`` the share of labelled pixels predicted right."""
    confusion = confusion.double()
    hits, labelled, predicted = confusion.diagonal(), confusion.sum(dim=1), confusion.sum(dim=0)
    union = labelled + predicted - hits
    iou = torch.where(union > 0, hits / union.clamp_min(1), torch.nan)
    accuracy = torch.where(labelled > 0, hits / labelled.clamp_min(1), torch.nan)
    return {
        "IoU": iou,
        "Acc": accuracy,
        "mIoU": iou.nanmean(),
        "mAcc": accuracy.nanmean(),
        "aAcc": hits.sum() / confusion.sum().clamp_min(1),
    }


def segmentation_loss(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of (B, K, H, W) logits against (B, H, W) class indices, ignored pixels left out; 0 (with a
    gradient) for a batch whose pixels are all ignored, which the mean would turn into NaN."""
    if not (masks != IGNORE_INDEX).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits, masks, ignore_index=IGNORE_INDEX)


def palette(num_classes: int) -> np.ndarray:
    """(num_classes, 3) uint8 colours of the classes in predicted masks and overlays: fixed, well apart in hue."""
    hues = (np.arange(num_classes) * 0.618034) % 1.0  # golden-ratio steps
    rgb = [Image.new("HSV", (1, 1), (int(h * 255), 200, 230)).convert("RGB").getpixel((0, 0)) for h in hues]
    return np.asarray(rgb, dtype=np.uint8).reshape(num_classes, 3)


class Segmenter(TaskModule):
    """Semantic segmentation: smp's UperNet decoder on the four maps of any image family
    (:class:`vim.dense.segmentation.UPerNet`: a hierarchical trunk's stages, a flat trunk's simple feature pyramid).

    Args:
        model: timm name of the backbone, e.g. ``vmamba_tiny_s1l8`` or ``vim_tiny_patch16_224``; ``pretrained`` loads
            its released ImageNet weights (the decoder starts from smp's initialisation).
        num_classes: number of classes (the ``vimkit`` command sets it from the data's classes).
        img_size: the side of the training crops and of the evaluation windows (the ``vimkit`` command sets it from
            ``data.img_size``); it is also the model's input size (a flat trunk's position embedding).
        layers: a flat trunk's blocks that feed the pyramid, one per level (None: the last block for every level).
        decoder_channels: UperNet's width (512 in the papers' UperNet, smp's default 256).
        eval_mode: "slide" (overlapping ``img_size`` windows, ``stride`` apart, as mmseg evaluates ADE20K) or "whole"
            (each image at once, padded to a multiple of 32: for models that take any input size).
        stride: the windows' step in "slide" mode; None: two thirds of ``img_size`` (mmseg's 341 for 512).
        **kwargs: the recipe, see :class:`~vim.training.task.TaskModule` (``schedule="poly"`` is mmseg's).
    """

    predictions_file = "masks"
    export_hint = "ONNX: vimkit export --ckpt <it> --out <file>.onnx"

    def __init__(
        self,
        model: str,
        num_classes: int | None = None,
        img_size: int | None = None,
        layers: list[int] | None = None,
        decoder_channels: int = 512,
        eval_mode: str = "slide",
        stride: int | None = None,
        **kwargs: Any,
    ) -> None:
        if eval_mode not in EVAL_MODES:
            raise ValueError(f"eval_mode {eval_mode!r} is not one of {', '.join(EVAL_MODES)}")
        super().__init__(model, num_classes, **kwargs)
        stages = ("val", "val_ema", "test", "test_ema")
        self.confusion = {name: MulticlassConfusionMatrix(self.num_classes, ignore_index=IGNORE_INDEX) for name in stages}
        self.confusion_matrices = nn.ModuleDict(self.confusion)  # registered: they move with the module and sync

    # ----------------------------------------------------------------------------------------- model
    def model_kwargs(self) -> dict[str, Any]:
        img_size = self.hparams.img_size
        return {"img_size": img_size} if img_size is not None else {}

    def build_model(self, initial_weights: bool = True) -> nn.Module:
        """UperNet on the backbone ``model``, which starts from its released weights (``pretrained``), a weights file
        (``pretrained_file``: a backbone's, read through the family's filter) or, without either or without
        ``initial_weights``, a random initialisation."""
        from vim.dense.segmentation import UPerNet  # needs segmentation-models-pytorch (the dense extra)

        hp = self.hparams
        kwargs = self.timm_kwargs()
        pretrained = bool(hp.pretrained and initial_weights)
        if hp.pretrained_file is not None and initial_weights:
            if not is_remote(hp.pretrained_file) and not Path(hp.pretrained_file).is_file():
                raise ValueError(f"model.pretrained_file: '{hp.pretrained_file}' does not exist")
            kwargs["pretrained_cfg_overlay"] = dict(file=hp.pretrained_file)
            pretrained = True
        channels = hp.decoder_channels
        return UPerNet(hp.model, hp.num_classes, pretrained, layers=hp.layers, decoder_channels=channels, **kwargs)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (B, K, H, W) of (B, 3, H, W) images, H and W multiples of 32."""
        return self.model(images)

    def segment(self, model: Any, images: torch.Tensor) -> torch.Tensor:
        """Logits (B, K, H, W) of (B, 3, H, W) images of any size, by ``eval_mode``; ``model`` is the trained or the
        EMA UperNet."""
        hp = self.hparams
        if hp.eval_mode == "whole":
            return whole_logits(model, images)
        crop = hp.img_size or int(model.nominal_input_shape()[-1])
        return window_logits(model, images, self.num_classes, crop, hp.stride or max(1, crop * 2 // 3))

    def per_image_logits(self, model: nn.Module, batch: Any) -> list[torch.Tensor]:
        """(K, H_i, W_i) logits of each image of a batch at its original size (that of its mask)."""
        logits = self.segment(model, batch.images)
        return [
            F.interpolate(logits[i : i + 1, :, :h, :w], size=size, mode="bilinear", align_corners=False)[0]
            for i, ((h, w), size) in enumerate(zip(batch.image_sizes, batch.sizes))
        ]

    # ----------------------------------------------------------------------------------------- training
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        images, masks = batch[0], batch[1]
        if len(images) == 0:
            return None  # every pair of the batch was unreadable: skip the step
        loss = segmentation_loss(self.model(images), masks)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(images))
        return loss

    # ----------------------------------------------------------------------------------------- evaluation
    def evaluate(self, batch: Any, stage: str) -> None:
        """Add the batch to the confusion matrices of the model and, when enabled, of the EMA weights; log the loss."""
        if len(batch.images) == 0:
            return
        models = {stage: self.model} | ({f"{stage}_ema": self.ema.module} if self.ema is not None else {})
        for name, model in models.items():
            losses = []
            for logits, (h, w), mask in zip(self.per_image_logits(model, batch), batch.sizes, batch.masks):
                mask = mask[:h, :w]
                self.confusion[name].update(logits.argmax(dim=0).flatten(), mask.flatten())
                losses.append(segmentation_loss(logits[None], mask[None]))
            if name == stage:
                self.log(f"{stage}/loss", torch.stack(losses).mean(), batch_size=len(losses), sync_dist=True)

    def log_scores(self, stage: str) -> None:
        """Log mIoU, mAcc, aAcc and each class's IoU of the finished evaluation (the matrices are summed over devices)."""
        for name in (stage, f"{stage}_ema"):
            confusion = self.confusion[name]
            if not confusion.update_called:
                continue
            scores = scores_from_confusion(confusion.compute())
            self.log_dict({f"{name}/{key}": scores[key].float() for key in ("mIoU", "mAcc", "aAcc")}, prog_bar=True)
            self.log_dict({f"{name}/IoU/{c}": iou.float() for c, iou in zip(self.class_names, scores["IoU"])})
            confusion.reset()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.evaluate(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self.log_scores("val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.evaluate(batch, "test")

    def on_test_epoch_end(self) -> None:
        self.log_scores("test")

    def final_metric_line(self, metrics: dict[str, Any]) -> str | None:
        """``Final validation mIoU 71.3% (mAcc 80.2%, aAcc 95.1%) of the EMA weights (...)`` from the logged scores."""
        prefix = "val_ema/" if self.ema is not None and "val_ema/mIoU" in metrics else "val/"
        if f"{prefix}mIoU" not in metrics:
            return None
        mean_iou, mean_acc, all_acc = (100 * float(metrics[f"{prefix}{key}"]) for key in ("mIoU", "mAcc", "aAcc"))
        weights = "EMA" if prefix == "val_ema/" else "trained"
        return (
            f"Final validation mIoU {mean_iou:.1f}% (mAcc {mean_acc:.1f}%, aAcc {all_acc:.1f}%) of the {weights} weights "
            "(what vimkit export and vimkit predict use)"
        )

    # ----------------------------------------------------------------------------------------- prediction
    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        """The (H, W) uint8 class mask of each readable image at its original size with the :attr:`eval_model`:
        ``paths``, ``masks``; ``failed``, ``(path, reason)`` of each image that could not be read."""
        failed = [(item.path, item.reason) for item in batch.skipped]
        if len(batch.images) == 0:
            return {"paths": [], "masks": [], "failed": failed}
        masks = [logits.argmax(dim=0).to(torch.uint8).cpu() for logits in self.per_image_logits(self.eval_model, batch)]
        return {"paths": list(batch.paths), "masks": masks, "failed": failed}

    def write_predictions(self, predictions: list[Any], output: Path) -> str:
        """Under the folder ``output``, for each input at its path relative to the inputs' common folder: the mask
        (``.png``, palette colours, pixel values the class indices) and ``_overlay.jpg`` (the image with the mask's
        colours blended in); ``unreadable.csv`` lists the inputs that could not be read, with the reason."""
        paths = [path for batch in predictions for path in batch["paths"]]
        failed = [failure for batch in predictions for failure in batch["failed"]]
        folders = [str(Path(path).parent) for path in paths + [path for path, _ in failed]]
        root = Path(os.path.commonpath(folders)) if folders else None
        colours = palette(self.num_classes)
        for batch in predictions:
            for path, mask in zip(batch["paths"], batch["masks"]):
                target = output / Path(path).relative_to(root) if root is not None else output / Path(path).name
                target.parent.mkdir(parents=True, exist_ok=True)
                indices = mask.numpy()
                png = Image.fromarray(indices, mode="P")
                png.putpalette(colours.reshape(-1).tolist())
                png.save(target.with_suffix(".png"))
                image = np.asarray(read_rgb(path), dtype=np.float32)
                overlay = (0.5 * image + 0.5 * colours[indices]).astype(np.uint8)
                Image.fromarray(overlay).save(target.with_name(f"{target.stem}_overlay.jpg"), quality=90)
        output.mkdir(parents=True, exist_ok=True)
        unreadable = ""
        if failed:
            with (output / "unreadable.csv").open("w", newline="") as file:
                csv.writer(file).writerows([("path", "error"), *failed])
            unreadable = f"; {len(failed)} unreadable files listed in {output / 'unreadable.csv'}"
        return f"Masks (and colour overlays) of {len(paths)} images: {output}{unreadable}"
