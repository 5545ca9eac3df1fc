"""The modality table (:mod:`vim.data.modalities`) agrees with the input contract each family declares."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import vim.models  # noqa: F401  (registers the models in timm)
from vim.data.generated import write_video
from vim.data.modalities import MODALITIES, evaluation_preprocessing, modality_of

RNG = np.random.default_rng(0)


def write_image(folder: Path) -> Path:
    path = folder / "photo.png"
    Image.fromarray(RNG.integers(0, 256, size=(40, 56, 3), dtype=np.uint8)).save(path)  # not the model's size
    return path


def write_clip(folder: Path) -> Path:
    path = folder / "clip.mp4"
    write_video(path, RNG.integers(0, 256, size=(7, 40, 56, 3), dtype=np.uint8))  # not the model's length or size
    return path


def write_cloud(folder: Path) -> Path:
    path = folder / "cloud.npy"
    np.save(path, RNG.normal(size=(300, 3)).astype(np.float32))  # more points than the model takes
    return path


# (model, its creation arguments, a sample file, the input shape expected, worked out from the arguments and the
# registered defaults: images (3, H, W), clips (3, T, H, W), clouds (num_points of the cfg, 3))
CASES = [
    ("test_vim", {"img_size": 48}, write_image, (3, 48, 48)),
    ("test_videomamba", {"img_size": 48, "num_frames": 3}, write_clip, (3, 3, 48, 48)),
    ("test_pointmamba", {}, write_cloud, (128, 3)),
    ("test_pointmamba_scan", {}, write_cloud, (128, 3)),
]


@pytest.mark.parametrize("name, kwargs, write_sample, expected", CASES, ids=[case[0] for case in CASES])
def test_a_modalitys_dataset_gives_the_input_its_family_declares(tmp_path, name, kwargs, write_sample, expected):
    model = timm.create_model(name, num_classes=0, **kwargs).eval()
    spec = MODALITIES[model.modality]
    sample = write_sample(tmp_path)
    assert modality_of(str(sample)) == spec.name == model.modality  # the file is read by the family's modality

    dataset = spec.dataset(model, [str(sample)], evaluation_preprocessing(model))
    item = dataset[0][0]
    assert tuple(item.shape) == expected == model.nominal_input_shape()
    with torch.no_grad():
        assert model.forward_features(item.unsqueeze(0)).shape[0] == 1  # the layout input_axes checks on entry
