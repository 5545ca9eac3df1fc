"""COCO instance annotations read and checked once, at setup: images, their objects and the categories.

A file's problems that no epoch can work around (an empty or unparsable file, an annotation of an image the file does
not list, a category id the file does not define, a box of zero or negative width or height, a box more than
:data:`BOX_SLACK` pixels outside its image) raise a ValueError naming the file and the annotation id. A box outside its
image by at most :data:`BOX_SLACK` pixels (a rounding of the annotation tool) is clipped to the image, not refused.
Crowd annotations (``iscrowd: 1``) are left out of the targets, as torchvision's detection references do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

BOX_SLACK = 1.0
"""Pixels a box may reach outside its image (then clipped); further is an error."""


@dataclass(frozen=True)
class CocoImage:
    """One image of a COCO file: its file, id, listed size and its (non-crowd) objects.

    ``boxes`` are (N, 4) x0, y0, x1, y1 in pixels (clipped to the image), ``category_ids`` (N,) the file's ids,
    ``segmentations`` the N COCO segmentations (polygons or RLE; None where an object has none).
    """

    path: str
    image_id: int
    height: int
    width: int
    boxes: np.ndarray
    category_ids: np.ndarray
    segmentations: list[Any]


@dataclass(frozen=True)
class CocoFile:
    """A COCO instances file: ``categories`` as (id, name) sorted by id, and its images in the file's order."""

    categories: list[tuple[int, str]]
    images: list[CocoImage]


def load_json(path: Path) -> dict[str, Any]:
    """The file's JSON object; ValueError naming the file when it is missing, empty, unparsable or not COCO."""
    try:
        text = path.read_text()
    except OSError as error:
        raise ValueError(f"COCO annotations '{path}' cannot be read: {error}") from error
    if not text.strip():
        raise ValueError(f"COCO annotations '{path}' is empty")
    try:
        coco = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"COCO annotations '{path}' is not valid JSON: {error}") from error
    missing = [key for key in ("images", "annotations", "categories") if not isinstance(coco, dict) or key not in coco]
    if missing:
        raise ValueError(f"COCO annotations '{path}' lacks {', '.join(repr(k) for k in missing)}")
    return coco


def xywh_to_xyxy(bbox: list[float], height: int, width: int, where: str) -> list[float]:
    """COCO's [x, y, w, h] as [x0, y0, x1, y1], clipped to the ``height`` x ``width`` image when it reaches at most
    :data:`BOX_SLACK` pixels outside; ValueError (naming ``where``) for no area or a box further outside."""
    if len(bbox) != 4:
        raise ValueError(f"{where}: bbox {bbox} is not [x, y, width, height]")
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        raise ValueError(f"{where}: bbox {bbox} has zero or negative width or height")
    x0, y0, x1, y1 = x, y, x + w, y + h
    if x0 < -BOX_SLACK or y0 < -BOX_SLACK or x1 > width + BOX_SLACK or y1 > height + BOX_SLACK:
        raise ValueError(f"{where}: bbox {bbox} lies outside its {width}x{height} image")
    x0, x1 = min(max(x0, 0.0), width), min(max(x1, 0.0), width)
    y0, y1 = min(max(y0, 0.0), height), min(max(y1, 0.0), height)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"{where}: bbox {bbox} has no area inside its {width}x{height} image")
    return [x0, y0, x1, y1]


def read_coco(annotations: str | Path, images_root: str | Path, need_segmentations: bool = False) -> CocoFile:
    """Read and check a COCO instances file whose images' ``file_name`` lie under ``images_root`` (see the module
    docstring); ``need_segmentations``: every object must have a ``segmentation`` (Mask R-CNN's targets)."""
    path = Path(annotations)
    coco = load_json(path)
    categories = sorted((int(c["id"]), str(c["name"])) for c in coco["categories"])
    known = {category_id for category_id, _ in categories}
    images = {int(image["id"]): image for image in coco["images"]}
    objects: dict[int, list[dict[str, Any]]] = {image_id: [] for image_id in images}
    for annotation in coco["annotations"]:
        where = f"COCO annotations '{path}', annotation id {annotation.get('id')}"
        if annotation.get("image_id") not in images:
            raise ValueError(f"{where}: image_id {annotation.get('image_id')} is not among the file's images")
        if annotation.get("category_id") not in known:
            raise ValueError(f"{where}: category_id {annotation.get('category_id')} is not among the file's categories")
        if need_segmentations and not annotation.get("segmentation"):
            raise ValueError(f"{where}: no segmentation, which the instance masks need")
        if not annotation.get("iscrowd", 0):
            objects[annotation["image_id"]].append(annotation)
    root = Path(images_root)
    return CocoFile(categories, [coco_image(image, objects[int(image["id"])], root, path) for image in coco["images"]])


def coco_image(image: dict[str, Any], objects: list[dict[str, Any]], images_root: Path, path: Path) -> CocoImage:
    """The :class:`CocoImage` of a COCO ``image`` entry and its annotations (checked, boxes converted)."""
    height, width = int(image["height"]), int(image["width"])
    boxes = [xywh_to_xyxy(o["bbox"], height, width, f"COCO annotations '{path}', annotation id {o.get('id')}") for o in objects]
    return CocoImage(
        path=str(images_root / image["file_name"]),
        image_id=int(image["id"]),
        height=height,
        width=width,
        boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        category_ids=np.asarray([o["category_id"] for o in objects], dtype=np.int64),
        segmentations=[o.get("segmentation") for o in objects],
    )


def decode_masks(segmentations: list[Any], height: int, width: int) -> np.ndarray:
    """(N, height, width) uint8 instance masks of COCO segmentations (polygons, uncompressed or compressed RLE) through
    pycocotools."""
    from pycocotools import mask as coco_mask  # the `dense` extra

    masks = np.zeros((len(segmentations), height, width), dtype=np.uint8)
    for i, segmentation in enumerate(segmentations):
        if isinstance(segmentation, list):  # polygons: one RLE each, merged
            rle = coco_mask.merge(coco_mask.frPyObjects(segmentation, height, width))
        elif isinstance(segmentation.get("counts"), list):  # uncompressed RLE
            rle = coco_mask.frPyObjects(segmentation, height, width)
        else:
            rle = segmentation
        masks[i] = coco_mask.decode(rle)
    return masks
