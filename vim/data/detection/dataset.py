"""COCO images as a detection dataset: each image read as RGB with its objects as torchvision detectors' targets; an
unreadable image (or one whose size is not the one its annotations give) comes back as
:class:`~vim.data.samples.Unreadable`, never an exception mid-epoch."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF

from vim.data.detection.coco import CocoImage, decode_masks
from vim.data.images import read_rgb
from vim.data.samples import SampleFiles, Unreadable


class LoadedDetection(NamedTuple):
    """One transformed image (3, H, W) in [0, 1], its target (see :class:`DetectionBatch`), file and original (H, W)."""

    image: torch.Tensor
    target: dict[str, Any]
    path: str
    size: tuple[int, int]


class DetectionBatch(NamedTuple):
    """A collated batch, as torchvision's detectors take it: B ``images`` (3, H_i, W_i) of any sizes, B ``targets``
    (dicts of ``boxes`` (N_i, 4) x0, y0, x1, y1 float in the transformed image's pixels, ``labels`` (N_i,) int64 in
    1..K (0 is the background), ``masks`` (N_i, H_i, W_i) uint8 when the data has them, ``image_id``), the B file
    ``paths``, the original ``sizes`` (H, W) of the images (to map predictions back), and the unreadable samples left
    out (``skipped``)."""

    images: list[torch.Tensor]
    targets: list[dict[str, Any]]
    paths: list[str]
    skipped: list[Unreadable]
    sizes: list[tuple[int, int]]


class DetectionFiles(SampleFiles):
    """Images with their COCO objects (``images``), or without (a list of files to ``predict``), transformed.

    Args:
        images: the annotated images (:class:`~vim.data.detection.coco.CocoImage`), or plain file paths (no target).
        transform: a :func:`~vim.data.detection.transforms.detection_transform`.
        labels: the contiguous label (1..K) of each category id.
        with_masks: decode each object's instance mask (Mask R-CNN's targets).
    """

    def __init__(
        self,
        images: Sequence[CocoImage | str],
        transform: Callable,
        labels: dict[int, int] | None = None,
        with_masks: bool = False,
    ) -> None:
        self.images = list(images)
        super().__init__([(image if isinstance(image, str) else image.path, i) for i, image in enumerate(self.images)])
        self.transform, self.labels, self.with_masks = transform, labels or {}, with_masks

    def load(self, path: str, target: int) -> LoadedDetection:
        pixels = read_rgb(path)
        entry = self.images[target]
        coco = entry if isinstance(entry, CocoImage) else None
        if coco is not None and (coco.width, coco.height) != pixels.size:
            raise ValueError(f"the image is {pixels.size[0]}x{pixels.size[1]}, its annotations say {coco.width}x{coco.height}")
        image = tv_tensors.Image(TF.pil_to_tensor(pixels))
        image, objects = self.transform(image, self.target(coco, pixels.size[::-1]))
        return LoadedDetection(image.as_subclass(torch.Tensor), plain(objects), path, (pixels.height, pixels.width))

    def target(self, coco: CocoImage | None, size: tuple[int, int]) -> dict[str, Any]:
        """The untransformed target of an image of ``size`` (H, W): its objects, or none for an unlabelled file."""
        boxes = torch.from_numpy(coco.boxes) if coco is not None else torch.zeros(0, 4)
        ids = coco.category_ids.tolist() if coco is not None else []
        target = {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=size),
            "labels": torch.tensor([self.labels[i] for i in ids], dtype=torch.int64),
            "image_id": coco.image_id if coco is not None else -1,
        }
        if self.with_masks and coco is not None:
            target["masks"] = tv_tensors.Mask(torch.from_numpy(decode_masks(coco.segmentations, *size)))
        return target

    def read_errors(self) -> tuple[type[Exception], ...]:
        return (OSError, ValueError, SyntaxError, Image.DecompressionBombError)  # PIL raises all of these


def plain(target: dict[str, Any]) -> dict[str, Any]:
    """The target with its tv_tensors as plain tensors (what torchvision's detectors and torchmetrics take)."""
    return {k: v.as_subclass(torch.Tensor) if isinstance(v, torch.Tensor) else v for k, v in target.items()}


def collate_detections(samples: Sequence[LoadedDetection | Unreadable]) -> DetectionBatch:
    """The readable samples as a :class:`DetectionBatch` (lists: images differ in size); unreadable ones in ``skipped``."""
    loaded = [s for s in samples if isinstance(s, LoadedDetection)]
    return DetectionBatch(
        [s.image for s in loaded],
        [s.target for s in loaded],
        [s.path for s in loaded],
        [s for s in samples if isinstance(s, Unreadable)],
        [s.size for s in loaded],
    )
