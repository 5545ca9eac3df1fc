"""Generated scenes of coloured shapes on a textured canvas, the data of the segmentation and detection quickstarts.

Each image (``size`` x ``size`` RGB) holds one to three shapes of :data:`SCENE_CLASSES` (circle, square, triangle) of
random sizes, turns and places, never overlapping, on a background of smooth colour noise. Each class has a colour
family (:data:`CLASS_HUES`: reds, greens, blues) within which a shape's hue, saturation and brightness vary, so that
a small model learns the classes in minutes from shape and colour together, as real classes differ in both. The set
is written once under ``$VIM_CACHE/scenes`` (default ``~/.cache/vim/scenes``) in both layouts that real data comes in:

- ``images/{train,val}/<n>.png`` and ``masks/{train,val}/<n>.png``: a mask's pixel is its class index, 0 for the
  background and 1.. for :data:`SCENE_CLASSES` (the plain images + masks layout of
  :class:`~vim.data.segmentation.SegmentationDataModule`);
- ``annotations/instances_{train,val}.json``: COCO instances (a box, a polygon and an area per shape; category ids
  1.. for :data:`SCENE_CLASSES`) of the same images (the layout of :class:`~vim.data.detection.DetectionDataModule`).

Every mask and box is drawn from the polygon of its shape, so the annotations agree with the pixels exactly.
"""

from __future__ import annotations

import colorsys
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from vim.data.generated.cache import cache_dir, write_once
from vim.data.segmentation import SegmentationDataModule

SCENE_CLASSES = ["circle", "square", "triangle"]
"""The shapes, in label order (mask value and COCO category id ``1 + index``; mask value 0 is the background)."""
CLASS_HUES = [0.0, 0.33, 0.62]
"""The centre of each class's hue (0..1: red, green, blue); a shape's hue is within 0.06 of it."""
SPLIT_SIZES = {"train": 480, "val": 96}
"""Images per split of the quickstarts' scenes."""


def shape_polygon(rng: np.random.Generator, kind: str, centre: np.ndarray, radius: float) -> np.ndarray:
    """The (V, 2) x, y vertices of a ``kind`` shape of circumradius ``radius`` around ``centre``, turned at random
    (a circle is a 32-gon)."""
    corners = {"circle": 32, "square": 4, "triangle": 3}[kind]
    angles = rng.uniform(0, 2 * np.pi) + np.arange(corners) * 2 * np.pi / corners
    return centre + radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def class_colour(rng: np.random.Generator, label: int) -> tuple[int, int, int]:
    """An RGB colour of class ``label``'s family: its hue within 0.06 of :data:`CLASS_HUES`, saturation and value
    between 0.5 and 1."""
    hue = (CLASS_HUES[label] + rng.uniform(-0.06, 0.06)) % 1.0
    saturation, value = rng.uniform(0.5, 1.0, size=2)
    red, green, blue = colorsys.hsv_to_rgb(hue, saturation, value)
    return round(255 * red), round(255 * green), round(255 * blue)


def background(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size, 3) uint8 smooth colour noise: a coarse random grid upsampled bilinearly, as a texture."""
    coarse = rng.integers(40, 216, size=(4, 4, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BILINEAR))


def render_scene(rng: np.random.Generator, size: int = 64) -> tuple[Image.Image, Image.Image, list[dict[str, Any]]]:
    """One scene: the RGB image, its class-index mask (mode ``L``) and its shapes as ``{"label", "polygon"}`` (label an
    index of :data:`SCENE_CLASSES`, polygon a (V, 2) array)."""
    image = Image.fromarray(background(rng, size))
    mask = Image.new("L", (size, size), 0)
    shapes: list[dict[str, Any]] = []
    placed: list[tuple[np.ndarray, float]] = []
    for _ in range(int(rng.integers(1, 4))):
        radius = float(rng.uniform(0.14, 0.3) * size)
        centre = rng.uniform(radius, size - radius, size=2)
        if any(np.linalg.norm(centre - other) < radius + other_radius + 1 for other, other_radius in placed):
            continue  # would overlap a shape already placed: this scene has one shape fewer
        label = int(rng.integers(len(SCENE_CLASSES)))
        polygon = shape_polygon(rng, SCENE_CLASSES[label], centre, radius)
        colour = class_colour(rng, label)
        points = [tuple(p) for p in polygon.tolist()]
        ImageDraw.Draw(image).polygon(points, fill=colour)
        ImageDraw.Draw(mask).polygon(points, fill=label + 1)
        placed.append((centre, radius))
        shapes.append({"label": label, "polygon": polygon})
    return image, mask, shapes


def coco_annotation(shape: dict[str, Any], image_id: int, annotation_id: int) -> dict[str, Any]:
    """The COCO instance of a shape: ``bbox`` [x, y, w, h] of its polygon, the polygon as ``segmentation``, its area."""
    polygon = shape["polygon"]
    x0, y0 = polygon.min(axis=0)
    x1, y1 = polygon.max(axis=0)
    x, y = polygon[:, 0], polygon[:, 1]
    area = 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))  # the shoelace formula
    return {
        "id": annotation_id,
        "image_id": image_id,
        "category_id": shape["label"] + 1,
        "bbox": [round(float(v), 2) for v in (x0, y0, x1 - x0, y1 - y0)],
        "segmentation": [[round(float(v), 2) for v in polygon.reshape(-1)]],
        "area": round(area, 2),
        "iscrowd": 0,
    }


def scenes_root(root: str | os.PathLike | None = None) -> Path:
    """Where the scenes are written: ``root``, else ``$VIM_CACHE/scenes``."""
    return Path(root) if root is not None else cache_dir() / "scenes"


def write_scenes(root: str | os.PathLike, size: int = 64, split_sizes: dict[str, int] = SPLIT_SIZES, seed: int = 0) -> Path:
    """Write the scenes under ``root`` (see the module docstring) once; an interrupted write is redone
    (:func:`~vim.data.generated.cache.write_once`). Returns ``root``."""

    def write(root: Path) -> None:
        rng = np.random.default_rng(seed)
        categories = [{"id": i + 1, "name": name} for i, name in enumerate(SCENE_CLASSES)]
        for split, count in split_sizes.items():
            for folder in ("images", "masks"):
                (root / folder / split).mkdir(parents=True, exist_ok=True)
            images: list[dict[str, Any]] = []
            annotations: list[dict[str, Any]] = []
            for n in tqdm(range(count), desc=f"writing scenes/{split}", leave=False):
                image, mask, shapes = render_scene(rng, size)
                name = f"{n:04d}.png"
                image.save(root / "images" / split / name)
                mask.save(root / "masks" / split / name)
                images.append({"id": n + 1, "file_name": name, "width": size, "height": size})
                annotations += [coco_annotation(s, n + 1, len(annotations) + 1 + i) for i, s in enumerate(shapes)]
            (root / "annotations").mkdir(exist_ok=True)
            coco = {"images": images, "annotations": annotations, "categories": categories}
            (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))

    return write_once(root, write)


class SceneSegmentationDataModule(SegmentationDataModule):
    """:class:`~vim.data.segmentation.SegmentationDataModule` on the scenes' images and masks, written under ``root``
    (default ``$VIM_CACHE/scenes``) if missing; classes: the background, then :data:`SCENE_CLASSES`.

    Args:
        root: where the scenes live; None for the cache directory.
        predict_root: folder of images to segment with ``predict``.
        **kwargs: any :class:`~vim.data.segmentation.SegmentationDataModule` setting but the folders and classes.
    """

    def __init__(self, root: str | None = None, predict_root: str | None = None, **kwargs: Any) -> None:
        folder = scenes_root(root)
        super().__init__(
            train_images=str(folder / "images" / "train"),
            train_masks=str(folder / "masks" / "train"),
            val_images=str(folder / "images" / "val"),
            val_masks=str(folder / "masks" / "val"),
            predict_root=predict_root,
            class_names=["background", *SCENE_CLASSES],
            **kwargs,
        )
        self.root = folder

    def prepare_data(self) -> None:
        write_scenes(self.root)
