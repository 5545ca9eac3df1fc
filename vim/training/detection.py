"""Object detection and instance segmentation on the shared :class:`~vim.training.task.TaskModule` recipe: torchvision's
Mask R-CNN or Faster R-CNN on a Vim backbone (:func:`vim.dense.backbone`: the trunk's maps at strides 4..32 and an FPN).

Classes: the data's K classes (``class_names``, the COCO categories sorted by id) are labels 1..K of the detector,
whose K + 1 outputs start with torchvision's background (label 0). ``num_classes`` is K. The COCO category id of each
class is saved in the checkpoint beside the names, so ``vimkit predict`` writes the training file's category ids.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchmetrics.detection import MeanAveragePrecision
from torchvision.io import write_png
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.poolers import LevelMapper
from torchvision.transforms.v2 import functional as TF
from torchvision.utils import draw_bounding_boxes

import vim.dense
from vim.data.images import read_rgb
from vim.training.task import TaskModule

HEADS = {"mask_rcnn": MaskRCNN, "faster_rcnn": FasterRCNN}
"""The detectors ``Detector(head=...)`` builds."""
BOX_ROI_SIDE = 7
"""The side of torchvision's box RoI pooling (``MultiScaleRoIAlign(output_size=7)``), which the box head flattens."""
POOLED_STRIDES = (4, 8, 16, 32)
"""The strides of the backbone's maps "0".."3" (:class:`vim.dense.DenseBackbone`), which the RoI heads pool from."""
ANCHOR_ASPECT_RATIOS = (0.5, 1.0, 2.0)
"""Height / width of the anchors of each size (torchvision's)."""


class DataSizedTransform(GeneralizedRCNNTransform):
    """torchvision's detector input transform (normalisation, batching padded to a multiple of 32) without its resize:
    the images come sized by the data module (its evaluation size and training scale range), as in mmdetection."""

    def resize(self, image: torch.Tensor, target: dict[str, Any] | None = None) -> tuple[torch.Tensor, dict[str, Any] | None]:
        return image, target


def set_pooler_strides(pooler: MultiScaleRoIAlign) -> None:
    """Give torchvision's RoI pooler the strides of the backbone's maps "0".."3" (4, 8, 16, 32) and the levels they
    make (2..5). Left unset, the pooler infers them once, from the first batch's padded maps over its largest image,
    which for small images of varied sizes can round to the wrong scale (0.5 for the stride-4 map), and then a resumed
    run (whose first batch is another) pools with other scales than the uninterrupted one."""
    pooler.scales = [1.0 / stride for stride in POOLED_STRIDES]
    levels = [int(math.log2(stride)) for stride in POOLED_STRIDES]
    pooler.map_levels = LevelMapper(levels[0], levels[-1], pooler.canonical_scale, pooler.canonical_level)


def map_metric(masks: bool) -> MeanAveragePrecision:
    """COCO mAP (pycocotools) of boxes, and of instance masks when ``masks``."""
    if importlib.util.find_spec("pycocotools") is None:
        raise ImportError("COCO mAP needs pycocotools: pip install 'vim-toolkit[dense]'")
    return MeanAveragePrecision(iou_type=("bbox", "segm") if masks else "bbox", backend="pycocotools")


def metric_target(target: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A batch target as torchmetrics takes it: ``boxes`` (N, 4), ``labels`` (N,), ``masks`` (N, H, W) bool if any."""
    wanted = {"boxes": target["boxes"], "labels": target["labels"]}
    if "masks" in target:
        wanted["masks"] = target["masks"].bool()
    return wanted


def metric_prediction(detection: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A detector output as torchmetrics takes it: mask probabilities (N, 1, H, W) thresholded at 0.5 to (N, H, W)."""
    wanted = {key: detection[key] for key in ("boxes", "scores", "labels")}
    if "masks" in detection:
        wanted["masks"] = detection["masks"][:, 0] > 0.5
    return wanted


def to_original_pixels(boxes: torch.Tensor, size: tuple[int, int], original: tuple[int, int]) -> torch.Tensor:
    """(N, 4) x0, y0, x1, y1 boxes in an image of ``size`` (H, W) scaled to the same image at its ``original`` (H, W)."""
    scale = torch.tensor([original[1] / size[1], original[0] / size[0]] * 2, dtype=boxes.dtype, device=boxes.device)
    return boxes * scale


class Detector(TaskModule):
    """Train, evaluate and predict with torchvision's Mask R-CNN or Faster R-CNN on a Vim backbone.

    Args:
        model: timm name of the backbone (``vmamba_tiny_s1l8``, ``test_vmamba``, ...); see :func:`vim.dense.backbone`.
        num_classes: the object classes K, without the background (the ``vimkit`` command sets it from the data).
        model_kwargs: extra ``timm.create_model`` arguments of the backbone.
        pretrained: the backbone starts from the released weights of the model name's tag.
        pretrained_file: the backbone starts from this weights file instead (``pretrained_cfg_overlay=dict(file=...)``).
        head: "mask_rcnn" (boxes and instance masks; the data must give masks) or "faster_rcnn" (boxes).
        min_size: torchvision's resize of the shorter side (``GeneralizedRCNNTransform``; the longer side at most
            ``max_size``). None (default): the model keeps the sizes the data module gives (its ``img_size``,
            ``max_size`` and training ``scale_range``), so the data's scale augmentation is not undone.
        max_size: torchvision's longest side, with ``min_size``.
        anchor_sizes: the side of the anchors (aspect ratios 0.5, 1, 2) on each FPN map, strides 4 to 64 (torchvision's:
            32 to 512 pixels).
        fpn_channels: the width of the FPN's maps (torchvision's: 256).
        box_head_width: the box head's width (torchvision's ``TwoMLPHead`` representation size: 1024).
        mask_head_width: the mask head's width (torchvision's ``MaskRCNNHeads`` layers: 256).
        detector_kwargs: more arguments of torchvision's detector (``rpn_post_nms_top_n_train``,
            ``box_detections_per_img``, ``box_score_thresh``, ...).
        draw_score_threshold: ``predict`` draws the boxes scoring at least this (the JSON has every detection).
        **kwargs: the rest of the recipe, see :class:`~vim.training.task.TaskModule`. The defaults follow Mask R-CNN
            1x as VMamba trains it: AdamW, lr 1e-4, weight decay 0.05, a short linear warmup, a poly decay to 0.
    """

    predictions_file = "detections.json"
    export_hint = "boxes of a folder of images: vimkit predict --config <config> --ckpt_path <it>"

    def __init__(
        self,
        model: str,
        num_classes: int | None = None,
        model_kwargs: dict[str, Any] | None = None,
        pretrained: bool = False,
        pretrained_file: str | None = None,
        head: str = "mask_rcnn",
        min_size: int | None = None,
        max_size: int | None = None,
        anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512),
        fpn_channels: int = 256,
        box_head_width: int = 1024,
        mask_head_width: int = 256,
        detector_kwargs: dict[str, Any] | None = None,
        draw_score_threshold: float = 0.5,
        lr: float = 1e-4,
        weight_decay: float = 0.05,
        warmup_epochs: float = 0.1,
        warmup_lr: float = 1e-7,
        min_lr: float = 0.0,
        schedule: str = "poly",
        **kwargs: Any,
    ) -> None:
        if head not in HEADS:
            raise ValueError(f"head {head!r} is not one of {', '.join(HEADS)}")
        if len(anchor_sizes) != len(POOLED_STRIDES) + 1:
            raise ValueError(f"anchor_sizes {anchor_sizes}: give one size for each of the FPN's 5 maps (strides 4 to 64)")
        if (min_size is None) != (max_size is None):
            raise ValueError("model.min_size and model.max_size go together: set both, or neither (the data sizes images)")
        super().__init__(
            model, num_classes, model_kwargs, pretrained, pretrained_file, lr=lr, weight_decay=weight_decay,
            warmup_epochs=warmup_epochs, warmup_lr=warmup_lr, min_lr=min_lr, schedule=schedule, **kwargs,
        )  # fmt: skip
        self.category_ids = list(range(1, self.num_classes + 1))
        self.val_metrics, self.val_ema_metrics, self.test_metrics = (map_metric(self.masks) for _ in range(3))

    @property
    def masks(self) -> bool:
        """Whether the detector predicts instance masks (Mask R-CNN)."""
        return self.hparams.head == "mask_rcnn"

    # ----------------------------------------------------------------------------------------- model
    def build_model(self, initial_weights: bool = True) -> nn.Module:
        """The detector (K + 1 outputs, background first) on the backbone with released weights (``pretrained``), a
        weights file (``pretrained_file``) or, without either or without ``initial_weights``, a random initialisation."""
        hp = self.hparams
        kwargs = self.timm_kwargs()
        if initial_weights and hp.pretrained_file is not None:
            kwargs["pretrained_cfg_overlay"] = dict(file=hp.pretrained_file)
        pretrained = initial_weights and (hp.pretrained or hp.pretrained_file is not None)
        body = vim.dense.backbone(hp.model, pretrained=pretrained, out_channels=hp.fpn_channels, **kwargs)
        min_size, max_size = (hp.min_size, hp.max_size) if hp.min_size is not None else (1, 1)  # (1, 1): replaced below
        settings = dict(min_size=min_size, max_size=max_size, **self.heads(), **(hp.detector_kwargs or {}))
        detector = HEADS[hp.head](body, **settings)
        for pooler in (detector.roi_heads.box_roi_pool, getattr(detector.roi_heads, "mask_roi_pool", None)):
            if pooler is not None:
                set_pooler_strides(pooler)
        if hp.min_size is None:
            transform = detector.transform
            detector.transform = DataSizedTransform(1, 1, transform.image_mean, transform.image_std, transform.size_divisible)
        return detector

    def heads(self) -> dict[str, nn.Module]:
        """torchvision's anchors, box (and mask) heads and predictors of K + 1 outputs, as its detectors build them by
        default but of ``anchor_sizes`` and of widths ``box_head_width`` and ``mask_head_width``."""
        hp = self.hparams
        box_head = TwoMLPHead(hp.fpn_channels * BOX_ROI_SIDE**2, hp.box_head_width)
        anchors = AnchorGenerator(tuple((side,) for side in hp.anchor_sizes), (ANCHOR_ASPECT_RATIOS,) * len(hp.anchor_sizes))
        heads = {
            "rpn_anchor_generator": anchors,
            "box_head": box_head,
            "box_predictor": FastRCNNPredictor(hp.box_head_width, hp.num_classes + 1),
        }
        if self.masks:
            heads["mask_head"] = MaskRCNNHeads(hp.fpn_channels, [hp.mask_head_width] * 4, dilation=1)
            heads["mask_predictor"] = MaskRCNNPredictor(hp.mask_head_width, hp.mask_head_width, hp.num_classes + 1)
        return heads

    def setup(self, stage: str) -> None:
        """The class names and their COCO category ids from the data; Mask R-CNN needs data that gives masks."""
        super().setup(stage)
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if stage == "predict" or datamodule is None or getattr(datamodule, "num_classes", None) is None:
            return
        self.category_ids = list(getattr(datamodule, "category_ids", self.category_ids))
        if self.masks and not getattr(datamodule, "masks", False):
            raise ValueError("model.head mask_rcnn trains instance masks: set data.masks true, or use head faster_rcnn")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["category_ids"] = self.category_ids

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.category_ids = checkpoint.get("category_ids", self.category_ids)

    # ----------------------------------------------------------------------------------------- training
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        """The sum of torchvision's losses (RPN objectness and box, box classifier and regression, masks), each logged."""
        images, targets = batch[0], batch[1]
        if not images:
            return None  # every image of the batch was unreadable: skip the step
        losses = self.model(images, targets)
        loss = sum(losses.values())
        self.log_dict({f"train/{name}": value for name, value in losses.items()}, batch_size=len(images))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(images))
        return loss

    # ----------------------------------------------------------------------------------------- evaluation
    def evaluate(self, batch: Any, metrics: MeanAveragePrecision, ema_metrics: MeanAveragePrecision | None) -> None:
        """Add a batch's detections by the model (and the EMA weights, with ``ema_metrics``) to the metrics."""
        images, targets = batch[0], batch[1]
        if not images:
            return
        references = [metric_target(target) for target in targets]
        metrics.update([metric_prediction(d) for d in self.model(images)], references)
        if self.ema is not None and ema_metrics is not None:
            ema_metrics.update([metric_prediction(d) for d in self.ema.module(images)], references)

    def log_map(self, stage: str, metrics: MeanAveragePrecision) -> None:
        """Log ``<stage>/map``, ``map_50``, ``map_75`` (boxes) and ``<stage>/mask_map`` (Mask R-CNN), then reset."""
        values = metrics.compute()
        box = "bbox_" if self.masks else ""
        logged = {f"{stage}/{name}": values[f"{box}{name}"] for name in ("map", "map_50", "map_75")}
        if self.masks:
            logged[f"{stage}/mask_map"] = values["segm_map"]
        self.log_dict({k: v.float() for k, v in logged.items()}, prog_bar=True)
        metrics.reset()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.evaluate(batch, self.val_metrics, self.val_ema_metrics)

    def on_validation_epoch_end(self) -> None:
        self.log_map("val", self.val_metrics)
        if self.ema is not None:
            self.log_map("val_ema", self.val_ema_metrics)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.evaluate(batch, self.test_metrics, None)

    def on_test_epoch_end(self) -> None:
        self.log_map("test", self.test_metrics)

    def final_metric_line(self, metrics: dict[str, Any]) -> str | None:
        """``Final validation box mAP 52.0% (mask mAP 48.1%) of the EMA weights (...)``: the weights export and predict
        use; None without validation mAP."""
        stage = "val_ema" if self.ema is not None else "val"
        if f"{stage}/map" not in metrics:
            return None
        line = f"Final validation box mAP {100 * float(metrics[f'{stage}/map']):.1f}%"
        if f"{stage}/mask_map" in metrics:
            line += f" (mask mAP {100 * float(metrics[f'{stage}/mask_map']):.1f}%)"
        weights = "EMA" if stage == "val_ema" else "trained"
        return f"{line} of the {weights} weights (what vimkit export and vimkit predict use)"

    # ----------------------------------------------------------------------------------------- prediction
    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        """Detections of each readable image by the :attr:`eval_model`, boxes in the original image's pixels:
        ``paths``, ``detections`` (dicts of ``boxes`` (N, 4) x0, y0, x1, y1, ``scores`` (N,), ``labels`` (N,) in 1..K);
        and ``failed``, ``(path, reason)`` of each image that could not be read (the batch's ``skipped``)."""
        images = batch[0]
        outputs = self.eval_model(images) if images else []
        detections = [
            {
                "boxes": to_original_pixels(out["boxes"], tuple(image.shape[-2:]), size).cpu(),
                "scores": out["scores"].cpu(),
                "labels": out["labels"].cpu(),
            }
            for out, image, size in zip(outputs, images, batch.sizes)
        ]
        failed = [(item.path, item.reason) for item in batch.skipped]
        return {"paths": list(batch.paths), "detections": detections, "failed": failed}

    def coco_detections(self, path: str, detection: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
        """The image's detections in COCO's results format: ``file_name``, ``category_id`` (the training file's),
        ``bbox`` [x, y, w, h] in the original image's pixels, ``score``."""
        return [
            {
                "file_name": path,
                "category_id": self.category_ids[int(label) - 1],
                "bbox": [round(v, 2) for v in (x0, y0, x1 - x0, y1 - y0)],
                "score": round(float(score), 4),
            }
            for (x0, y0, x1, y1), score, label in zip(detection["boxes"].tolist(), detection["scores"], detection["labels"])
        ]

    def draw(self, path: str, detection: dict[str, torch.Tensor], output: Path) -> None:
        """The image at ``path`` with its detections scoring at least ``draw_score_threshold`` drawn and named."""
        keep = detection["scores"] >= self.hparams.draw_score_threshold
        labels = [
            f"{self.class_names[int(label) - 1]} {float(score):.2f}"
            for label, score in zip(detection["labels"][keep], detection["scores"][keep])
        ]
        image = TF.pil_to_tensor(read_rgb(path))
        if labels:  # torchvision warns when given no boxes
            image = draw_bounding_boxes(image, detection["boxes"][keep], labels, colors="red")
        write_png(image, str(output))

    def write_predictions(self, predictions: list[Any], output: Path) -> str:
        """A COCO results JSON of every detection (see :meth:`coco_detections`) at ``output``; each input drawn with its
        boxes in the folder ``<output stem>_drawn`` beside it; inputs that could not be read, with the reason, in
        ``<output stem>_unreadable.json``."""
        drawn = output.parent / f"{output.stem}_drawn"
        drawn.mkdir(parents=True, exist_ok=True)
        results: list[dict[str, Any]] = []
        images = [(path, detection) for batch in predictions for path, detection in zip(batch["paths"], batch["detections"])]
        for index, (path, detection) in enumerate(images):
            results += self.coco_detections(path, detection)
            self.draw(path, detection, drawn / f"{index:05d}_{Path(path).stem}.png")
        output.write_text(json.dumps(results))
        failed = [{"file_name": path, "reason": reason} for batch in predictions for path, reason in batch["failed"]]
        unreadable = ""
        if failed:
            listed = output.parent / f"{output.stem}_unreadable.json"
            listed.write_text(json.dumps(failed, indent=1))
            unreadable = f"; {len(failed)} unreadable files (with the reason) in {listed}"
        return f"{len(results)} detections in {len(images)} images: {output} (drawn: {drawn}){unreadable}"
