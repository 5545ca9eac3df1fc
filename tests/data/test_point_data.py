"""Point-cloud data: file readers, checks, sampling and augmentation, HDF5 and folder datamodules, the quickstart."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from vim.cli import run_lightning
from vim.data.generated import SHAPE_CLASSES, make_shape
from vim.data.points import (
    PointAugment,
    PointCloudDataModule,
    check_point_array,
    collate_clouds,
    prepare_points,
    read_off,
    read_point_file,
    resample_points,
)
from vim.data.sampling import SampleKey
from vim.training.points import PointCloudClassifier

from support.paths import REPO

RNG = np.random.default_rng(0)


def write_ply(path: Path, points: np.ndarray, binary: bool) -> None:
    header = ["ply", f"format {'binary_little_endian' if binary else 'ascii'} 1.0", f"element vertex {len(points)}",
              "property float x", "property float y", "property float z", "property uchar intensity",
              "element face 0", "property list uchar int vertex_indices", "end_header"]  # fmt: skip
    with path.open("wb") as file:
        file.write(("\n".join(header) + "\n").encode())
        for x, y, z in points:
            file.write(struct.pack("<fffB", x, y, z, 7) if binary else f"{x} {y} {z} 7\n".encode())


def test_readers_agree_with_the_written_points(tmp_path):
    points = RNG.normal(size=(40, 3)).astype(np.float32)
    np.save(tmp_path / "a.npy", points)
    write_ply(tmp_path / "ascii.ply", points, binary=False)
    write_ply(tmp_path / "binary.ply", points, binary=True)
    for name in ("a.npy", "ascii.ply", "binary.ply"):
        np.testing.assert_allclose(read_point_file(tmp_path / name), points, rtol=1e-6)
    # a unit cube mesh, header glued to the counts as in ModelNet40's files, one quad face per side
    corners = [(x, y, z) for x in (0, 1) for y in (0, 1) for z in (0, 1)]
    quads = [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)]
    lines = ["OFF8 6 0"] + [" ".join(map(str, c)) for c in corners] + [f"4 {' '.join(map(str, q))}" for q in quads]
    (tmp_path / "cube.off").write_text("\n".join(lines) + "\n")
    vertices, faces = read_off(tmp_path / "cube.off")
    assert vertices.shape == (8, 3) and faces.shape == (12, 3)  # quads fanned into triangles
    surface = read_point_file(tmp_path / "cube.off")
    assert len(surface) == 8192
    on_a_face = np.isclose(surface, 0, atol=1e-6) | np.isclose(surface, 1, atol=1e-6)
    assert on_a_face.any(axis=1).all() and (surface >= -1e-6).all() and (surface <= 1 + 1e-6).all()
    counts = [(np.isclose(surface[:, axis], side, atol=1e-6)).sum() for axis in range(3) for side in (0, 1)]
    assert min(counts) > 8192 / 6 * 0.8  # area-weighted: every face gets about a sixth


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((10, 2)), r"cloud\.npy: expected an \(N, 3\) array .* got shape \(10, 2\)"),
        (np.array([[0, 0, 0], [np.nan, 0, 0], [1, np.inf, 0]]), r"cloud\.npy: 2 of 3 points have NaN or infinite"),
        (np.zeros((5, 3)), r"cloud\.npy: 5 points, fewer than the 32"),
    ],
)
def test_bad_arrays_name_the_file(array, message):
    with pytest.raises(ValueError, match=message):
        check_point_array(array, "cloud.npy", min_points=32)


def test_check_keeps_xyz_of_points_with_normals():
    array = RNG.normal(size=(50, 6))
    np.testing.assert_array_equal(check_point_array(array, "x", 32), array[:, :3].astype(np.float32))


def test_resampling_normalisation_and_augmentation():
    points = RNG.normal(size=(300, 3)).astype(np.float32) * 4 + 10
    evaluation = prepare_points(points, 100)
    np.testing.assert_array_equal(evaluation, prepare_points(points, 100))  # deterministic
    assert np.allclose(evaluation.mean(axis=0), 0, atol=1e-5) and np.isclose(np.linalg.norm(evaluation, axis=1).max(), 1)
    chosen = {tuple(p) for p in resample_points(points, 100)}
    assert len(chosen) == 100 and chosen <= {tuple(p) for p in points}
    train = resample_points(points, 100, np.random.default_rng(1))
    assert len({tuple(p) for p in train}) == 100 and not np.array_equal(train, resample_points(points, 100))
    assert (
        len(resample_points(points[:30], 100)) == 100 and len(resample_points(points[:30], 100, np.random.default_rng(0))) == 100
    )

    unit = evaluation
    turned = PointAugment(scale=None, translate=0.0, rotate=True, up_axis="y")(unit, np.random.default_rng(2))
    np.testing.assert_allclose(turned[:, 1], unit[:, 1], atol=1e-6)  # the up axis is untouched
    np.testing.assert_allclose(np.linalg.norm(turned[:, [0, 2]], axis=1), np.linalg.norm(unit[:, [0, 2]], axis=1), atol=1e-5)
    moved = PointAugment(scale=(0.5, 2.0), translate=0.3)(unit, np.random.default_rng(3))
    factor = np.linalg.lstsq(np.c_[unit, np.ones(100)], moved, rcond=None)[0]  # moved = unit @ diag(s) + t
    assert np.allclose(factor[:3], np.diag(np.diag(factor[:3])), atol=1e-5)
    assert ((np.diag(factor[:3]) >= 0.5) & (np.diag(factor[:3]) <= 2.0)).all() and (np.abs(factor[3]) <= 0.3).all()


def write_h5(path: Path, clouds: np.ndarray, labels: np.ndarray) -> None:
    with h5py.File(path, "w") as file:
        file["data"] = clouds
        file["label"] = labels.reshape(-1, 1)


def test_hdf5_datamodule(tmp_path):
    for i in range(2):
        write_h5(tmp_path / f"ply_data_train{i}.h5", RNG.normal(size=(6, 64, 3)).astype(np.float32), np.arange(6) % 3)
    (tmp_path / "shape_names.txt").write_text("airplane\nbathtub\nbed\n")
    data = PointCloudDataModule(
        train_path=str(tmp_path / "ply_data_train*.h5"), val_path=str(tmp_path / "ply_data_train0.h5"), num_points=32,
        min_points=8, batch_size=4, num_workers=0,
    )  # fmt: skip
    assert data.classes == ["airplane", "bathtub", "bed"]
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch.points.shape == (4, 32, 3) and batch.targets.dtype == torch.long
    assert all(p.startswith(str(tmp_path / "ply_data_train")) and p.endswith("]") for p in batch.paths)
    train = data.datasets["train"]
    assert len(train) == 12
    key = SampleKey(7, seed=123)
    torch.testing.assert_close(train[key].points, train[key].points)  # seeded augmentation
    assert not torch.equal(train[key].points, train[SampleKey(7, seed=124)].points)
    val = next(iter(data.val_dataloader()))
    expected = prepare_points(h5py.File(tmp_path / "ply_data_train0.h5")["data"][0], 32)
    np.testing.assert_allclose(val.points[0].numpy(), expected)
    assert val.paths[0] == f"{tmp_path / 'ply_data_train0.h5'}[0]" and val.targets.tolist() == [0, 1, 2, 0]
    with pytest.raises(ValueError, match=r"labels span 0..2 but there are 2 classes"):
        PointCloudDataModule(train_path=str(tmp_path / "ply_data_train0.h5"), class_names=["a", "b"], min_points=8).setup("fit")


def test_folder_datamodule_skips_bad_files_with_warnings(tmp_path):
    for name in ("chair", "lamp"):
        (tmp_path / name).mkdir()
        for i in range(3):
            np.save(tmp_path / name / f"{i}.npy", RNG.normal(size=(50, 3)))
    bad = {
        "nan.npy": np.full((50, 3), np.nan),
        "flat.npy": np.zeros((50, 2)),
        "few.npy": np.zeros((4, 3)),
    }
    for name, array in bad.items():
        np.save(tmp_path / "chair" / name, array)
    (tmp_path / "lamp" / "broken.ply").write_bytes(b"ply\nformat ascii 1.0\nelement vertex 3\n")  # header never ends
    (tmp_path / "lamp" / "notes.txt").write_text("ignored: not a point file")
    data = PointCloudDataModule(train_path=str(tmp_path), num_points=16, min_points=8, batch_size=20, num_workers=0)
    assert data.classes == ["chair", "lamp"]
    data.setup("fit")
    dataset = data.datasets["train"]
    batch = collate_clouds([dataset[i] for i in range(len(dataset))])
    with pytest.warns(UserWarning) as caught:
        batch = data.on_before_batch_transfer(batch, 0)
    assert batch.points.shape == (6, 16, 3) and sorted(batch.targets.tolist()) == [0, 0, 0, 1, 1, 1]
    messages = "\n".join(str(w.message) for w in caught)
    expected = {
        "nan.npy": "NaN or infinite",
        "flat.npy": r"shape \(50, 2\)",
        "few.npy": "4 points, fewer than the 8",
        "broken.ply": "no 'end_header'",
    }
    for name, reason in expected.items():
        (message,) = [str(w.message) for w in caught if f"{name}' (" in str(w.message)]
        assert message.startswith("skipped point cloud '") and re.search(reason, message), message
    assert "4 skipped so far" in messages


def write_class_folders(root: Path, clouds_per_class: dict[str, int]) -> None:
    for name, count in clouds_per_class.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            np.save(root / name / f"{i}.npy", RNG.normal(size=(40, 3)))


def test_val_class_folders_are_labelled_by_name_against_the_training_classes(tmp_path):
    """Val lacks "cone" (the first training class): its cubes are still 1 and spheres 2, not 0 and 1; a val class the
    training data lacks is refused, naming it and the known classes."""
    write_class_folders(tmp_path / "train", {"cone": 2, "cube": 2, "sphere": 2})
    write_class_folders(tmp_path / "val", {"cube": 2, "sphere": 3})
    data = PointCloudDataModule(
        train_path=str(tmp_path / "train"), val_path=str(tmp_path / "val"), min_points=8, num_points=16, num_workers=0
    )
    data.setup("fit")
    training_index = {name: i for i, name in enumerate(["cone", "cube", "sphere"])}
    for split, count in (("train", 6), ("val", 5)):
        dataset = data.datasets[split]
        batch = collate_clouds([dataset[i] for i in range(len(dataset))])
        assert len(batch.paths) == count
        assert batch.targets.tolist() == [training_index[Path(path).parent.name] for path in batch.paths]
    assert sorted(data.labels("val").tolist()) == [1, 1, 2, 2, 2]

    write_class_folders(tmp_path / "test", {"cube": 1, "pyramid": 1})
    data = PointCloudDataModule(train_path=str(tmp_path / "train"), test_path=str(tmp_path / "test"), min_points=8)
    message = r"test_path: class folders \['pyramid'\] of '.*test' are not among the 3 classes \['cone', 'cube', 'sphere'\]"
    with pytest.raises(ValueError, match=message):
        data.setup("test")


def test_empty_or_missing_folders(tmp_path):
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(ValueError, match=r"train_path: no point files \(.npy, .ply, .off\) in the class folders"):
        PointCloudDataModule(train_path=str(tmp_path), min_points=8).setup("fit")
    with pytest.raises(ValueError, match="no file or folder matches"):
        PointCloudDataModule(train_path=str(tmp_path / "missing*.h5"), min_points=8).setup("fit")
    with pytest.raises(ValueError, match="predict_path: no point files"):
        PointCloudDataModule(predict_path=str(tmp_path), min_points=8).setup("predict")


def test_generated_shapes_are_distinct_solids():
    rng = np.random.default_rng(0)
    for name in SHAPE_CLASSES:
        points = make_shape(name, rng, count=500, noise=0.0)
        assert points.shape == (500, 3) and np.isfinite(points).all()
    upright = [make_shape("cone", np.random.default_rng(i), 2000, noise=0.0) for i in range(3)]
    for cone in upright:  # rotation is about y only: the apex stays on top, the base at the bottom
        assert (cone[:, 1] < cone[:, 1].min() + 0.05).mean() > 0.1 and (cone[:, 1] > cone[:, 1].max() - 0.05).mean() < 0.02


@pytest.mark.slow
def test_points_quickstart_shortened(tmp_path, monkeypatch, capsys):
    """The point quickstart config (real model, generated data, CLI), shortened: well above chance (1/6)."""
    monkeypatch.setenv("VIM_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    config = str(REPO / "configs/points_quickstart.yaml")
    overrides = [
        "--trainer.max_epochs=3",
        "--trainer.enable_progress_bar=false",
        "--data.train_per_class=60",
        "--data.batch_size=4",
    ]
    fit = run_lightning(["fit", "--config", config, *overrides])
    accuracy = float(fit.trainer.callback_metrics["val/acc1"])
    assert accuracy > 0.5, f"val accuracy {accuracy:.3f} after the shortened point quickstart (chance is 0.167)"
    assert (
        "Final validation accuracy of the trained weights (what vimkit export and vimkit predict use): top-1"
        in capsys.readouterr().out
    )
    assert (tmp_path / "runs/points_quickstart/latest/checkpoints/last.ckpt").is_file()


@pytest.mark.parametrize(
    ("config", "classes", "groups", "points", "augment"),
    [
        ("pointmamba_modelnet40", 40, 64, 1024, PointAugment(scale=(0.6666667, 1.5), translate=0.2, rotate=False)),
        ("pointmamba_scanobjectnn", 15, 128, 2048, PointAugment(scale=None, translate=0.0, rotate=True)),
    ],
)
def test_recipe_configs_build(config, classes, groups, points, augment):
    cli = run_lightning(["--config", str(REPO / f"configs/{config}.yaml")], run=False)
    model, data = cli.model.model, cli.datamodule
    assert (model.num_groups, model.group_size, len(model.layers), model.embed_dim) == (groups, 32, 12, 384)
    assert (data.num_points, data.augment) == (points, augment)
    assert cli.model.num_classes == model.num_classes == classes


def test_classifier_refuses_image_mixing():
    with pytest.raises(ValueError, match=r"mixup_alpha=0.8: Mixup / CutMix work on images and clips, not point clouds"):
        PointCloudClassifier("test_pointmamba", num_classes=3, mixup_alpha=0.8)
    assert PointCloudClassifier("test_pointmamba", num_classes=3, num_groups=8).model.num_groups == 8
