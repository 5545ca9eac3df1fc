"""ImageFolder data: layout checks, bad files, color modes, small images, sampling and the digits tree."""

from __future__ import annotations

import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vim.data.generated import write_digits_tree
from vim.data.images import ImageDataModule, ImageFiles, read_rgb
from vim.data.samples import Unreadable
from vim.data.sampling import ResumableSampler, SampleKey, mix_seed


def write_tree(root: Path, counts: dict[str, int], size: int = 12) -> Path:
    """root/<class>/<i>.png with random RGB images; returns root."""
    rng = np.random.default_rng(0)
    for name, count in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def data_module(train: Path | None, val: Path | None, **kwargs) -> ImageDataModule:
    options = dict(img_size=16, batch_size=4, num_workers=0, auto_augment=None, min_image_size=4)
    return ImageDataModule(train_root=str(train) if train else None, val_root=str(val) if val else None, **{**options, **kwargs})


def test_missing_and_empty_roots_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"train_root: data root .*nowhere.* does not exist"):
        data_module(tmp_path / "nowhere", None).setup("fit")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"train_root: .*empty.* has no class folders"):
        data_module(tmp_path / "empty", None).setup("fit")
    (tmp_path / "no_images" / "cat").mkdir(parents=True)
    (tmp_path / "no_images" / "cat" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="train_root: no image files"):
        data_module(tmp_path / "no_images", None).setup("fit")


def test_batch_size_and_workers_are_checked_by_name(tmp_path):
    with pytest.raises(ValueError, match=r"data.batch_size must be at least 1 .*got 0"):
        data_module(tmp_path, None, batch_size=0)
    with pytest.raises(ValueError, match=r"data.num_workers must be 0 .* or more, got -1"):
        data_module(tmp_path, None, num_workers=-1)


def test_train_and_val_class_folders_must_match(tmp_path):
    train = write_tree(tmp_path / "train", {"cat": 1, "dog": 1, "emu": 1})
    val = write_tree(tmp_path / "val", {"cat": 1, "dog": 1, "fox": 1})
    with pytest.raises(ValueError, match=r"only in train_root \['emu'\], only in val_root \['fox'\]"):
        data_module(train, val).setup("fit")


def test_corrupt_files_are_skipped_with_a_warning_and_count(tmp_path):
    train = write_tree(tmp_path / "train", {"a": 3, "b": 3})
    (train / "a" / "garbage.png").write_bytes(b"definitely not a png")
    good = (train / "b" / "0.png").read_bytes()
    (train / "b" / "truncated.png").write_bytes(good[: len(good) // 2])
    dm = data_module(train, train)
    dm.setup("fit")
    seen = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for batch in dm.val_dataloader():
            seen += dm.on_before_batch_transfer(batch, 0).paths
    messages = [str(w.message) for w in caught if "skipped unreadable image" in str(w.message)]
    assert len(seen) == 6 and not any("garbage" in p or "truncated" in p for p in seen)
    assert len(messages) == 2 and dm.num_skipped == 2
    assert "garbage.png" in messages[0] + messages[1] and "2 skipped so far" in messages[-1]


def test_grayscale_palette_and_rgba_images_become_rgb(tmp_path):
    gray = tmp_path / "gray.png"
    Image.fromarray(np.full((5, 5), 77, dtype=np.uint8), mode="L").save(gray)
    rgba = tmp_path / "rgba.png"
    Image.fromarray(np.tile(np.array([10, 20, 30, 128], dtype=np.uint8), (5, 5, 1)), mode="RGBA").save(rgba)
    palette = tmp_path / "palette.gif"
    Image.fromarray(np.full((5, 5, 3), (200, 0, 0), dtype=np.uint8)).convert("P", palette=Image.Palette.ADAPTIVE).save(palette)
    assert np.asarray(read_rgb(str(gray))).tolist() == [[[77, 77, 77]] * 5] * 5
    assert np.asarray(read_rgb(str(rgba))).tolist() == [[[10, 20, 30]] * 5] * 5
    assert np.asarray(read_rgb(str(palette)))[0, 0].tolist() == [200, 0, 0]


GRADIENT_8 = np.stack([np.roll(np.arange(256, dtype=np.uint8), 37 * row) for row in range(3)])[:, ::3]
"""(3, 86) 8-bit values spanning 0..255, the picture every high-depth file below also holds."""


def save_16_bit_png(path: Path, values: np.ndarray, color_type: int) -> None:
    """A 16-bit PNG written by hand (PIL writes 16 bits only for grayscale): ``values`` (H, W, C) uint16, colour type
    0 gray, 2 RGB, 4 gray + alpha, 6 RGBA."""
    height, width = values.shape[:2]
    rows = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(height))  # filter byte 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def high_depth_files(folder: Path) -> dict[str, Path]:
    """The gradient in each high-depth form, by the PIL mode it opens in (16-bit RGB PNG: 'RGB;16')."""
    v16 = GRADIENT_8.astype(np.uint16) * 257  # 0 -> 0, 255 -> 65535: the same picture in 16 bits
    files = {
        name: folder / f"{name.replace(';', '_')}{suffix}"
        for name, suffix in [
            ("I;16", ".png"),
            ("I;16B", ".tif"),
            ("I", ".pgm"),
            ("I 32-bit", ".tif"),
            ("F", ".tif"),
            ("RGB;16", ".png"),
        ]
    }
    Image.fromarray(v16).save(files["I;16"])
    Image.frombytes("I;16B", v16.shape[::-1], v16.astype(">u2").tobytes()).save(files["I;16B"])
    files["I"].write_bytes(b"P5\n%d %d\n65535\n" % v16.shape[::-1] + v16.astype(">u2").tobytes())  # PIL reads mode I
    Image.fromarray(GRADIENT_8.astype(np.int32) * 100_000).save(files["I 32-bit"])  # beyond 16 bits: by its maximum
    Image.fromarray(GRADIENT_8.astype(np.float32) / 255).save(files["F"])
    save_16_bit_png(files["RGB;16"], np.repeat(v16[..., None], 3, axis=2), color_type=2)
    return files


def test_16_bit_32_bit_and_float_images_read_as_the_same_8_bit_picture(tmp_path):
    """Scaled by their range, not clipped at 255 (a 16-bit gradient came out as 0 and 255 only)."""
    Image.fromarray(GRADIENT_8).save(tmp_path / "8_bit.png")
    reference = np.asarray(read_rgb(str(tmp_path / "8_bit.png"))).astype(int)  # (3, 86, 3), read the ordinary way
    assert reference[..., 0].tolist() == GRADIENT_8.tolist()
    for name, path in high_depth_files(tmp_path).items():
        if name != "RGB;16":
            with Image.open(path) as image:
                assert image.mode == name.split()[0], path  # each file exercises the mode it is named after
        read = np.asarray(read_rgb(str(path))).astype(int)
        assert read.shape == reference.shape and np.abs(read - reference).max() <= 1, name


def test_float_images_with_nan_or_out_of_range_values_are_refused_by_name(tmp_path):
    """NaN, infinity or values outside [0, 1] give a ValueError naming the file; the dataset skips it as unreadable."""
    for name, bad in [("nan", np.nan), ("inf", np.inf), ("range", 255.0)]:
        values = GRADIENT_8.astype(np.float32) / 255
        values[1, 2] = bad
        path = tmp_path / f"{name}.tif"
        Image.fromarray(values).save(path)
        expected = r"values in \[0, 255\]; float images are read as \[0, 1\]" if name == "range" else "NaN or infinite"
        with pytest.raises(ValueError, match=rf"'{path}'.*{expected}"):
            read_rgb(str(path))
        skipped = ImageFiles([(str(path), 0)], transform=lambda image: image)[0]
        assert isinstance(skipped, Unreadable) and str(path) in skipped.path and "ValueError" in skipped.reason
    negative = tmp_path / "negative.tif"
    Image.fromarray(GRADIENT_8.astype(np.int32) - 1).save(negative)
    with pytest.raises(ValueError, match=rf"'{negative}' \(mode I\) has negative values \(down to -1\)"):
        read_rgb(str(negative))


def test_image_smaller_than_a_patch_is_upsampled_with_a_warning(tmp_path):
    train = write_tree(tmp_path / "train", {"a": 2, "b": 2}, size=12)
    Image.fromarray(np.zeros((2, 3, 3), dtype=np.uint8)).save(train / "a" / "tiny.png")
    dm = data_module(train, train, min_image_size=8)
    dm.setup("fit")
    with pytest.warns(
        UserWarning, match=r"tiny.png' is smaller than min_image_size=8 px \(one patch\); it is upsampled to img_size=16"
    ):
        batches = [dm.on_before_batch_transfer(batch, 0) for batch in dm.val_dataloader()]
    assert all(b.images.shape[1:] == (3, 16, 16) for b in batches)
    assert sum(len(b.paths) for b in batches) == 5


def test_sampler_is_seeded_per_epoch_split_across_ranks_and_resumable():
    data = list(range(20))
    ranks = [ResumableSampler(data, num_replicas=2, rank=r, seed=3) for r in range(2)]
    first = [[key.index for key in sampler] for sampler in ranks]
    assert sorted(first[0] + first[1]) == data  # disjoint, covering
    again = ResumableSampler(data, num_replicas=2, rank=0, seed=3)
    assert [k.index for k in again] == first[0]
    again.set_epoch(1)
    epoch1 = list(again)
    assert [k.index for k in epoch1] != first[0]
    assert [k.seed for k in epoch1] == [mix_seed(3, 1, k.index) for k in epoch1]
    again.skip_once(4)
    assert list(again) == epoch1[4:]
    assert list(again) == epoch1  # the skip applies once


def test_augmentation_depends_only_on_the_sample_key(tmp_path):
    train = write_tree(tmp_path / "train", {"a": 2, "b": 2})
    dm = data_module(train, None, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.5)
    dm.setup("fit")
    dataset = dm.datasets["train"]
    torch.manual_seed(0)
    first = dataset[SampleKey(1, 1234)].image
    torch.manual_seed(99)
    _ = dataset[SampleKey(2, 5)]
    assert torch.equal(dataset[SampleKey(1, 1234)].image, first)
    assert not torch.equal(dataset[SampleKey(1, 4321)].image, first)


def test_digits_tree_matches_scikit_learn(tmp_path):
    from sklearn.datasets import load_digits

    root = write_digits_tree(tmp_path / "digits", image_size=8)
    files = sorted(root.glob("*/*/*.png"))
    assert len(files) == 1797
    assert sorted(p.name for p in (root / "train").iterdir()) == [str(d) for d in range(10)]
    assert len(list((root / "val").glob("*/*.png"))) == 360
    digits = load_digits()
    sample = root / "val" / "0"
    path = sorted(sample.iterdir())[0]
    index = int(path.stem)
    assert digits.target[index] == 0
    expected = np.round(digits.images[index] * 255 / 16).astype(np.uint8)
    assert np.array_equal(np.asarray(Image.open(path)), expected)
    stamp = path.stat().st_mtime_ns
    write_digits_tree(tmp_path / "digits", image_size=8)
    assert path.stat().st_mtime_ns == stamp  # written once


def test_skip_warnings_name_the_file_and_come_from_vims_data_code(tmp_path):
    """Raised where vim handles the batch (not at the Lightning hook that calls it), as DataWarning."""
    import vim.data.labelled
    from vim.data.samples import DataWarning

    train = write_tree(tmp_path / "train", {"a": 2, "b": 2})
    (train / "a" / "broken.png").write_bytes(b"not a png")
    dm = data_module(train, train)
    dm.setup("validate")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for batch in dm.val_dataloader():
            dm.on_before_batch_transfer(batch, 0)
    (warning,) = caught
    assert warning.category is DataWarning and f"'{train / 'a' / 'broken.png'}'" in str(warning.message)
    assert Path(warning.filename) == Path(vim.data.labelled.__file__)


def test_an_empty_class_folder_is_reported(tmp_path):
    """In the training data an error naming the folder; in validation data a warning naming it (the class exists,
    it is just not evaluated)."""
    from vim.data.samples import DataWarning

    train = write_tree(tmp_path / "train", {"a": 2, "b": 2})
    (train / "c").mkdir()
    (train / "c" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match=rf"train_root: class folders without image files .*\['{train / 'c'}'\]"):
        data_module(train, None).setup("fit")
    val = write_tree(tmp_path / "val", {"a": 1, "b": 1})
    (val / "c").mkdir()
    (train / "c" / "0.png").write_bytes((train / "a" / "0.png").read_bytes())
    with pytest.warns(DataWarning, match=rf"val_root: class folders without image files .*\['{val / 'c'}'\]"):
        data_module(train, val).setup("fit")
