"""Segmentation data: masks read and checked, images paired with masks, augmentation that keeps them aligned, ADE20K."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms.v2.functional import pil_to_tensor

from vim.data.samples import Unreadable
from vim.data.segmentation import (
    IGNORE_INDEX,
    ADE20KDataModule,
    SegmentationDataModule,
    SegmentationFiles,
    read_mask,
    segmentation_eval_transform,
    segmentation_train_transform,
)

COLOURS = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200]], dtype=np.uint8)
"""The colour of each class in the images these tests write: the class of a pixel can be read back from it."""


def write_pair(images: Path, masks: Path, name: str, size=(24, 20), seed: int = 0) -> None:
    """An image whose pixel colours are their classes' (COLOURS) and its mask; ``size`` is (W, H)."""
    rng = np.random.default_rng(seed)
    width, height = size
    classes = np.repeat(np.repeat(rng.integers(0, 3, (height // 8 + 1, width // 8 + 1)), 8, 0), 8, 1)[:height, :width]
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    Image.fromarray(COLOURS[classes]).save(images / f"{name}.png")
    Image.fromarray(classes.astype(np.uint8)).save(masks / f"{name}.png")


def test_read_mask_reduces_zero_label_as_mmseg(tmp_path):
    values = np.array([[0, 1, 2], [150, 255, 3]], dtype=np.uint8)
    Image.fromarray(values).save(tmp_path / "m.png")
    reduced = read_mask(str(tmp_path / "m.png"), (3, 2), 150, reduce_zero_label=True)
    assert reduced.tolist() == [[IGNORE_INDEX, 0, 1], [149, IGNORE_INDEX, 2]]  # 0 and 255 ignored, k -> k - 1
    assert read_mask(str(tmp_path / "m.png"), (3, 2), 151, reduce_zero_label=False).tolist() == values.tolist()


@pytest.mark.parametrize(
    "mask, size, match",
    [
        (np.zeros((2, 3, 3), np.uint8), (3, 2), r"mask '.*m\.png' is a RGB image; a mask holds one class index per pixel"),
        (np.zeros((2, 3), np.uint8), (4, 2), r"mask '.*m\.png' is 3x2 but its image is 4x2"),
        (np.array([[0, 7, 9]], np.uint8), (3, 1), r"mask '.*m\.png' has values 7, 9 that are neither class indices 0..4"),
    ],
    ids=["rgb", "wrong-size", "out-of-range"],
)
def test_bad_masks_are_refused_naming_the_file(tmp_path, mask, size, match):
    Image.fromarray(mask).save(tmp_path / "m.png")
    with pytest.raises(ValueError, match=match):
        read_mask(str(tmp_path / "m.png"), size, 5, reduce_zero_label=False)


def test_a_bad_pair_is_skipped_with_its_reason(tmp_path):
    write_pair(tmp_path / "images", tmp_path / "masks", "good")
    write_pair(tmp_path / "images", tmp_path / "masks", "small", size=(8, 8))
    Image.fromarray(np.zeros((9, 9), np.uint8)).save(tmp_path / "masks" / "small.png")  # not the image's size
    data = SegmentationDataModule(str(tmp_path / "images"), str(tmp_path / "masks"), class_names=3, img_size=16, num_workers=0)
    data.setup("fit")
    items = [data.datasets["train"][i] for i in range(2)]
    skipped = [item for item in items if isinstance(item, Unreadable)]
    assert [Path(item.path).name for item in skipped] == ["small.png"] and "is 9x9 but its image is 8x8" in skipped[0].reason


def test_an_image_without_a_mask_is_an_error_naming_it(tmp_path):
    write_pair(tmp_path / "images", tmp_path / "masks", "a")
    write_pair(tmp_path / "images", tmp_path / "masks", "b")
    (tmp_path / "masks" / "b.png").unlink()
    data = SegmentationDataModule(str(tmp_path / "images"), str(tmp_path / "masks"), class_names=3, num_workers=0)
    with pytest.raises(ValueError, match=r"data.train_masks: 1 of the 2 images .* have no mask .*b\.png"):
        data.setup("fit")


def test_images_and_masks_folders_go_together():
    with pytest.raises(ValueError, match=r"data\.val_images and data\.val_masks go together"):
        SegmentationDataModule(val_images="images")


@pytest.mark.parametrize("seed", range(4))
def test_training_augmentation_keeps_image_and_mask_aligned(tmp_path, seed):
    """Resize, crop and flip move the mask with the image: the labelled pixels' colours still name their classes
    (checked away from class borders, where bilinear resizing blends colours and nearest-neighbour masks step)."""
    write_pair(tmp_path / "images", tmp_path / "masks", "a", size=(64, 48), seed=seed)
    transform = segmentation_train_transform(32, scale=(0.75, 1.5), color_jitter=0.0, mean=(0, 0, 0), std=(1, 1, 1))
    image = tv_tensors.Image(pil_to_tensor(Image.open(tmp_path / "images/a.png")))
    mask = tv_tensors.Mask(torch.from_numpy(np.array(Image.open(tmp_path / "masks/a.png"))))
    torch.manual_seed(seed)
    out_image, out_mask = transform(image, mask)
    assert out_image.shape == (3, 32, 32) and out_mask.shape == (32, 32) and out_mask.dtype == torch.int64
    colours = torch.from_numpy(COLOURS).float() / 255
    nearest_class = ((out_image.permute(1, 2, 0)[..., None, :] - colours).abs().sum(-1)).argmin(-1)
    padded = torch.nn.functional.pad(out_mask[None, None].float(), (1, 1, 1, 1), mode="replicate")[0, 0]
    neighbours = torch.stack([padded[1 + dy : 33 + dy, 1 + dx : 33 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1)])
    interior = (out_mask != IGNORE_INDEX) & (neighbours == out_mask).all(dim=0)  # labelled, away from class borders
    assert interior.sum() > 200
    agreement = (nearest_class[interior] == out_mask[interior]).float().mean()
    assert agreement > 0.98, (
        f"only {agreement:.1%} of the pixels' colours name their mask's class"
    )  # the image flipped alone: 46%
    assert set(out_mask.unique().tolist()) <= {0, 1, 2, IGNORE_INDEX}


def test_evaluation_resizes_the_image_and_keeps_the_mask_at_its_size(tmp_path):
    write_pair(tmp_path / "images", tmp_path / "masks", "a", size=(40, 20))
    image = tv_tensors.Image(pil_to_tensor(Image.open(tmp_path / "images/a.png")))
    mask = tv_tensors.Mask(torch.from_numpy(np.array(Image.open(tmp_path / "masks/a.png"))))
    out_image, out_mask = segmentation_eval_transform(10)(image, mask)
    assert out_image.shape == (3, 10, 20) and out_mask.shape == (20, 40)  # shorter side 10; the mask untouched


def test_batches_pad_images_with_zeros_and_masks_with_the_ignore_index(tmp_path):
    write_pair(tmp_path / "images", tmp_path / "masks", "a", size=(20, 20))
    write_pair(tmp_path / "images", tmp_path / "masks", "b", size=(30, 20))
    data = SegmentationDataModule(
        val_images=str(tmp_path / "images"), val_masks=str(tmp_path / "masks"), class_names=3, img_size=10, num_workers=0
    )
    data.setup("validate")
    batch = next(iter(data.val_dataloader()))
    assert batch.images.shape == (2, 3, 10, 15) and batch.masks.shape == (2, 20, 30)
    assert batch.image_sizes == [(10, 10), (10, 15)] and batch.sizes == [(20, 20), (20, 30)]
    assert (batch.images[0, :, :, 10:] == 0).all() and (batch.masks[0, :, 20:] == IGNORE_INDEX).all()


def test_ade20k_layout_and_class_names(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    for split in ("training", "validation"):
        image_folder, mask_folder = root / "images" / split, root / "annotations" / split
        image_folder.mkdir(parents=True)
        mask_folder.mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image_folder / "ADE_1.jpg")
        Image.fromarray(np.full((8, 8), 150, np.uint8)).save(mask_folder / "ADE_1.png")
    rows = ["Idx\tRatio\tTrain\tVal\tName"] + [f"{i}\t0.1\t1\t1\tname{i}, other{i}" for i in range(1, 151)]
    (root / "objectInfo150.txt").write_text("\n".join(rows))
    data = ADE20KDataModule(str(root), img_size=8, num_workers=0)
    assert data.classes[:2] == ["name1", "name2"] and len(data.classes) == 150
    data.setup("validate")
    sample = data.datasets["val"][0]
    assert (sample.mask == 149).all()  # ADE's class 150 is the model's 149 (reduce_zero_label)


def test_segmentation_files_read_unlabelled_images_for_predict(tmp_path):
    write_pair(tmp_path / "images", tmp_path / "masks", "a", size=(12, 8))
    files = SegmentationFiles([(str(tmp_path / "images/a.png"), None)], segmentation_eval_transform(4), 3)
    item = files[0]
    assert item.image.shape == (3, 4, 6) and item.mask.numel() == 0 and item.size == (8, 12)
