"""COCO detection data: boxes converted and labels mapped as computed by hand, aligned augmentation (a flipped box is
the box of the flipped mask), bad annotation files refused by name, unreadable images skipped."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import masks_to_boxes

from vim.data.detection import DetectionDataModule, decode_masks, read_coco
from vim.data.samples import Unreadable

pytestmark = pytest.mark.usefixtures("single_thread")  # small images: see tests/conftest.py

WIDTH, HEIGHT = 40, 30
CATEGORIES = [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}]  # out of order and not contiguous


def annotation(ann_id: int, image_id: int, category_id: int, bbox: list[float], **extra) -> dict:
    x, y, w, h = bbox
    polygon = [x, y, x + w, y, x + w, y + h, x, y + h]
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox, "segmentation": [polygon], **extra}


def write_coco(root: Path, annotations: list[dict], images: int = 2) -> tuple[Path, Path]:
    """``images`` random 40x30 PNGs under root/images and their COCO file root/instances.json."""
    folder = root / "images"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    entries = []
    for n in range(1, images + 1):
        Image.fromarray(rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)).save(folder / f"{n}.png")
        entries.append({"id": n, "file_name": f"{n}.png", "width": WIDTH, "height": HEIGHT})
    path = root / "instances.json"
    path.write_text(json.dumps({"images": entries, "annotations": annotations, "categories": CATEGORIES}))
    return folder, path


def data_module(folder: Path, path: Path, **kwargs) -> DetectionDataModule:
    options = dict(train_images=str(folder), train_annotations=str(path), img_size=HEIGHT, max_size=None, num_workers=0)
    return DetectionDataModule(**{**options, **kwargs})


def test_coco_boxes_and_labels_as_computed_by_hand(tmp_path):
    """[x, y, w, h] -> [x0, y0, x1, y1]; category ids sorted (3 cat, 7 dog) are labels 1, 2; a box reaching at most one
    pixel outside the image is clipped; an image without objects has an empty target."""
    annotations = [
        annotation(1, 1, 7, [10, 5, 20, 10]),
        annotation(2, 1, 3, [-0.5, 0, 10, 10]),  # 0.5 px left of the image: clipped
        annotation(3, 1, 3, [35, 20, 5.8, 10.9]),  # 0.8 px right and 0.9 px below: clipped
        annotation(4, 1, 3, [1, 1, 2, 2], iscrowd=1),  # a crowd: left out
    ]
    data = data_module(*write_coco(tmp_path, annotations), masks=False, hflip=0.0)  # training: no jitter at scale 1
    assert data.classes == ["cat", "dog"] and data.category_ids == [3, 7] and data.num_classes == 2
    data.setup("fit")
    dataset = data.datasets["train"]
    batch = data.collate_fn([dataset[0], dataset[1]])
    first, second = batch.targets
    torch.testing.assert_close(first["boxes"], torch.tensor([[10.0, 5, 30, 15], [0, 0, 9.5, 10], [35, 20, 40, 30]]))
    assert first["labels"].tolist() == [2, 1, 1] and first["labels"].dtype == torch.int64 and first["image_id"] == 1
    assert second["boxes"].shape == (0, 4) and second["labels"].shape == (0,) and second["image_id"] == 2
    assert [tuple(image.shape) for image in batch.images] == [(3, HEIGHT, WIDTH)] * 2 and batch.sizes == [(HEIGHT, WIDTH)] * 2
    pixels = np.asarray(Image.open(tmp_path / "images" / "1.png"), dtype=np.float32) / 255  # eval at the image's own size
    torch.testing.assert_close(batch.images[0], torch.from_numpy(pixels).permute(2, 0, 1))


def test_polygon_masks_decode_to_their_rectangles():
    """A rectangle's polygon covers its pixels: pycocotools' mask of [x0, y0, x1, y1] = [10, 5, 30, 15]."""
    mask = decode_masks([annotation(1, 1, 3, [10, 5, 20, 10])["segmentation"]], HEIGHT, WIDTH)[0]
    expected = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    expected[5:15, 10:30] = 1
    assert np.abs(mask.astype(int) - expected).sum() <= 2 * (20 + 10)  # at most the rectangle's edge pixels differ


@pytest.mark.parametrize("scale_range", [(HEIGHT, HEIGHT), (45, 45)], ids=["flip", "flip-and-resize-1.5x"])
def test_augmentation_moves_boxes_and_masks_together(tmp_path, scale_range):
    """Flipped (and resized): each box equals the box of its transformed mask, and the mask is the flipped original."""
    annotations = [annotation(1, 1, 7, [10, 5, 20, 10]), annotation(2, 1, 3, [2, 12, 8, 16])]
    folder, path = write_coco(tmp_path, annotations, images=1)
    data = data_module(folder, path, masks=True, hflip=1.0, scale_range=scale_range, color_jitter=0.3)
    data.setup("fit")
    item = data.datasets["train"][0]
    boxes, masks = item.target["boxes"], item.target["masks"]
    scale = scale_range[0] / HEIGHT
    assert item.image.shape == (3, round(HEIGHT * scale), round(WIDTH * scale)) and masks.dtype == torch.uint8
    mask_boxes = masks_to_boxes(masks) + torch.tensor([0, 0, 1, 1])  # last pixel index -> right / bottom edge
    torch.testing.assert_close(boxes, mask_boxes, atol=scale, rtol=0)  # up to a pixel of rasterisation
    flipped_box = torch.tensor([WIDTH - 30, 5, WIDTH - 10, 15]) * scale  # by hand: x -> W - x
    torch.testing.assert_close(boxes[0], flipped_box.float())
    if scale == 1:
        original = decode_masks([a["segmentation"] for a in annotations], HEIGHT, WIDTH)
        assert torch.equal(masks, torch.from_numpy(original[:, :, ::-1].copy()))


BAD_ANNOTATIONS = {
    "outside": (annotation(5, 1, 3, [30, 5, 20, 10]), r"annotation id 5: bbox .* lies outside its 40x30 image"),
    "zero-width": (annotation(6, 1, 3, [3, 5, 0, 10]), r"annotation id 6: bbox .* zero or negative width"),
    "negative-height": (annotation(7, 1, 3, [3, 5, 4, -1]), r"annotation id 7: bbox .* zero or negative width or height"),
    "unknown-category": (annotation(8, 1, 5, [3, 5, 4, 4]), r"annotation id 8: category_id 5 is not among"),
    "unknown-image": (annotation(9, 3, 3, [3, 5, 4, 4]), r"annotation id 9: image_id 3 is not among the file's images"),
}


@pytest.mark.parametrize("case", sorted(BAD_ANNOTATIONS))
def test_bad_annotations_are_refused_naming_the_file_and_annotation(tmp_path, case):
    bad, message = BAD_ANNOTATIONS[case]
    folder, path = write_coco(tmp_path, [annotation(1, 1, 3, [1, 1, 5, 5]), bad])
    with pytest.raises(ValueError, match=f"'{path}', {message}"):
        data_module(folder, path).setup("fit")


@pytest.mark.parametrize("content, message", [("", "is empty"), ("{not json", "is not valid JSON"), ("{}", "lacks 'images'")])
def test_empty_or_unparsable_files_are_refused_by_name(tmp_path, content, message):
    folder, path = write_coco(tmp_path, [])
    path.write_text(content)
    with pytest.raises(ValueError, match=f"COCO annotations '{path}' {message}"):
        read_coco(path, folder)
    with pytest.raises(ValueError, match=message):
        data_module(folder, path).classes  # noqa: B018  (reading the classes reads the file)


def test_masks_need_segmentations(tmp_path):
    no_polygon = {**annotation(4, 1, 3, [1, 1, 5, 5]), "segmentation": []}
    folder, path = write_coco(tmp_path, [no_polygon])
    with pytest.raises(ValueError, match=f"'{path}', annotation id 4: no segmentation"):
        data_module(folder, path, masks=True).setup("fit")
    data_module(folder, path, masks=False).setup("fit")  # boxes alone need none


def test_unreadable_or_resized_images_are_skipped_not_raised(tmp_path):
    folder, path = write_coco(tmp_path, [annotation(1, 1, 3, [1, 1, 5, 5])], images=3)
    (folder / "1.png").write_bytes(b"not an image")
    Image.new("RGB", (20, 20)).save(folder / "2.png")  # the file says 40x30: its boxes would not fit
    data = data_module(folder, path, masks=False)
    data.setup("fit")
    batch = data.collate_fn([data.datasets["train"][i] for i in range(3)])
    assert batch.paths == [str(folder / "3.png")] and all(isinstance(s, Unreadable) for s in batch.skipped)
    assert [s.path for s in batch.skipped] == [str(folder / "1.png"), str(folder / "2.png")]
    assert "20x20, its annotations say 40x30" in batch.skipped[1].reason
