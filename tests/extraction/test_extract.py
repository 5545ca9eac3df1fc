"""``vimkit extract``: features of each modality against the model run directly, manifest, resume, bad input."""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import timm
import torch
from lightning.pytorch.utilities import rank_zero_only
from PIL import Image
from safetensors.torch import save_file
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform, resolve_data_config

import vim.files
import vim.models  # registers the models in timm
from vim.cli import main as cli_main
from vim.data.generated import write_video
from vim.data.points import prepare_points
from vim.extraction import LOCK, extract, read_features
from vim.models.weights import NoReleasedWeightsError, WeightsUnavailableError

RNG = np.random.default_rng(0)


def saved_model(tmp_path: Path, name: str, **kwargs) -> tuple[torch.nn.Module, str]:
    """A seeded model with a classifier, saved as .safetensors, and the same weights without the classifier."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=7, **kwargs).eval()
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    model.reset_classifier(0)
    return model, str(path)


def point_folder(root: Path) -> list[Path]:
    good = []
    for i in range(5):
        path = root / ("a" if i < 3 else "b") / f"{i}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, RNG.normal(size=(40 + 10 * i, 3)).astype(np.float32))
        good.append(path)
    np.save(root / "a" / "nan.npy", np.full((50, 3), np.nan))
    np.save(root / "b" / "few.npy", RNG.normal(size=(5, 3)))
    return good


def test_points_features_manifest_and_resume(tmp_path):
    model, weights = saved_model(tmp_path, "test_pointmamba")
    good = point_folder(tmp_path / "clouds")
    out = tmp_path / "features"
    options = dict(checkpoint=weights, tokens=True, layers=[0], shard_size=3, batch_size=2, num_points=32, progress=False)
    manifest = extract("test_pointmamba", tmp_path / "clouds", out, **options)

    batch = torch.stack([torch.from_numpy(prepare_points(np.load(p), 32)) for p in good])
    with torch.no_grad():
        final, (layer0,) = model.forward_intermediates(batch, indices=[0])
        pooled = model.forward_head(final, pre_logits=True)
    features, names = read_features(out)
    assert names == [str(p) for p in good]  # sorted walk order, failures left out
    np.testing.assert_allclose(features, pooled.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(read_features(out, "tokens")[0], final.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(read_features(out, "layer0")[0], layer0.numpy(), rtol=1e-4, atol=1e-5)

    # 7 inputs in walk order (a/0 a/1 a/2 a/nan | b/3 b/4 b/few) in shards of 3: the last holds only a failure
    assert manifest["num_rows"] == 5 and [(s["rows"], len(s["files"])) for s in manifest["shards"]] == [(3, 3), (2, 3), (0, 0)]
    assert manifest == json.loads((out / "manifest.json").read_text())
    assert {e["input"]: (e["shard"], e["row"]) for e in manifest["entries"]}[str(good[4])] == ("shard-00001", 1)
    reasons = {Path(f["input"]).name: f["reason"] for f in manifest["failed"]}
    assert set(reasons) == {"nan.npy", "few.npy"}
    assert "NaN or infinite" in reasons["nan.npy"] and "5 points, fewer than the 16" in reasons["few.npy"]

    # a crash after shard 0: its files stay as they are, the rest is redone
    first = out / "shard-00000.pooled.npy"
    stamp = first.stat().st_mtime_ns
    for name in ("shard-00001.json", "shard-00002.json", "shard-00001.pooled.npy"):
        (out / name).unlink()
    (out / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    again = extract("test_pointmamba", tmp_path / "clouds", out, **options)
    assert again == manifest and first.stat().st_mtime_ns == stamp
    np.testing.assert_array_equal(read_features(out)[0], features)
    with pytest.raises(ValueError, match=r"other settings \(keys: .* -> \['pooled'\]"):
        extract("test_pointmamba", tmp_path / "clouds", out, checkpoint=weights, shard_size=3, num_points=32, progress=False)


def test_hdf5_points_through_the_command_line(tmp_path, capsys):
    model, weights = saved_model(tmp_path, "test_pointmamba")
    clouds = RNG.normal(size=(3, 64, 3)).astype(np.float32)
    with h5py.File(tmp_path / "test.h5", "w") as file:
        file["data"], file["label"] = clouds, np.zeros((3, 1))
    out = tmp_path / "h5features"
    args = ["--model", "test_pointmamba", "--checkpoint", weights, "--input", str(tmp_path / "test.h5"), "--out", str(out)]
    cli_main(["extract", *args, "--num-points", "48", "--format", "safetensors", "--num-workers", "0"])
    assert "Features of 3 inputs" in capsys.readouterr().out
    features, names = read_features(out)
    assert names == [f"{tmp_path / 'test.h5'}[{i}]" for i in range(3)]
    expected = model.forward_head(
        model.forward_features(torch.from_numpy(np.stack([prepare_points(c, 48) for c in clouds]))), True
    )
    np.testing.assert_allclose(features, expected.detach().numpy(), rtol=1e-4, atol=1e-5)


def test_unreadable_hdf5_files_are_listed_with_the_reason_and_the_others_extracted(tmp_path):
    clouds = tmp_path / "clouds"
    clouds.mkdir()
    with h5py.File(clouds / "a_good.h5", "w") as file:
        file["data"] = RNG.normal(size=(3, 64, 3)).astype(np.float32)
    whole = (clouds / "a_good.h5").read_bytes()
    (clouds / "b_garbage.h5").write_bytes(b"not HDF5 at all " * 64)
    (clouds / "c_truncated.h5").write_bytes(whole[: len(whole) // 2])  # a copy cut off half-way
    with h5py.File(clouds / "d_flat.h5", "w") as file:
        file["data"] = np.zeros((2, 64), np.float32)  # two rows, but not clouds of points
    options = dict(random_weights=True, num_points=32, progress=False)

    manifest = extract("test_pointmamba", clouds, tmp_path / "out", **options)

    extract("test_pointmamba", clouds / "a_good.h5", tmp_path / "good_alone", **options)
    features, names = read_features(tmp_path / "out")
    expected, expected_names = read_features(tmp_path / "good_alone")
    assert names == expected_names == [f"{clouds / 'a_good.h5'}[{row}]" for row in range(3)]
    np.testing.assert_array_equal(features, expected)
    reasons = {Path(failure["input"]).name: failure["reason"] for failure in manifest["failed"]}
    assert sorted(reasons) == ["b_garbage.h5", "c_truncated.h5", "d_flat.h5[0]", "d_flat.h5[1]"]
    assert reasons["b_garbage.h5"].startswith("unreadable HDF5 file") and "signature not found" in reasons["b_garbage.h5"]
    assert reasons["c_truncated.h5"].startswith("unreadable HDF5 file") and "truncated file" in reasons["c_truncated.h5"]
    assert "'data' must have shape (clouds, points, 3+), got (2, 64)" in reasons["d_flat.h5[0]"]


def test_images_against_the_model(tmp_path):
    model, weights = saved_model(tmp_path, "test_vim")
    folder = tmp_path / "images"
    folder.mkdir()
    pixels = RNG.integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    for i, image in enumerate(pixels):
        Image.fromarray(image).save(folder / f"{i}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    manifest = extract("test_vim", folder, tmp_path / "out", checkpoint=weights, format="safetensors", progress=False)
    mean, std = torch.tensor(IMAGENET_DEFAULT_MEAN)[:, None, None], torch.tensor(IMAGENET_DEFAULT_STD)[:, None, None]
    batch = (torch.from_numpy(pixels).permute(0, 3, 1, 2) / 255 - mean) / std  # 32 px images: resize and crop are no-ops
    with torch.no_grad():
        expected = model.forward_head(model.forward_features(batch), pre_logits=True)
    features, names = read_features(tmp_path / "out")
    assert names == [str(folder / f"{i}.png") for i in range(3)]
    np.testing.assert_allclose(features, expected.numpy(), rtol=1e-4, atol=1e-4)
    assert [Path(f["input"]).name for f in manifest["failed"]] == ["broken.png"]


def test_images_need_no_pyav(tmp_path):
    """Without PyAV, image features are still extracted; a video file then names the missing package."""
    _, weights = saved_model(tmp_path, "test_vim")
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(RNG.integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)):
        Image.fromarray(image).save(folder / f"{i}.png")
    (tmp_path / "clip.mp4").write_bytes(b"\0" * 64)
    script = f"""
import sys
sys.modules["av"] = None  # as if PyAV were not installed: importing it raises ImportError
from vim.extraction import extract
from vim.data.video import open_frames
print(extract("test_vim", {str(folder)!r}, {str(tmp_path / "out")!r}, checkpoint={weights!r}, progress=False)["num_rows"])
try:
    open_frames({str(tmp_path / "clip.mp4")!r})
except ImportError as error:
    print(error)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    rows, message = result.stdout.strip().splitlines()[-2:]
    assert rows == "2" and "needs PyAV" in message


def test_video_against_the_model(tmp_path):
    from vim.data.video import VideoClipDataModule, VideoClips

    model, weights = saved_model(tmp_path, "test_videomamba")
    paths = []
    for i in range(2):
        paths.append(tmp_path / "clips" / f"{i}.mp4")
        paths[-1].parent.mkdir(exist_ok=True)
        write_video(paths[-1], RNG.integers(0, 256, size=(6, 32, 32, 3), dtype=np.uint8))
    listing = tmp_path / "clips.txt"
    listing.write_text("# path label\nclips/1.mp4 3\nclips/0.mp4 5\n")
    extract("test_videomamba", listing, tmp_path / "out", checkpoint=weights, progress=False)
    transform = VideoClipDataModule(num_frames=4, img_size=32, crop_pct=1.0, num_workers=0).eval_transform()
    clips = VideoClips([(str(paths[1]), 0), (str(paths[0]), 0)], 4, transform)
    with torch.no_grad():
        expected = model.forward_head(model.forward_features(torch.stack([clips[0].clip, clips[1].clip])), pre_logits=True)
    features, names = read_features(tmp_path / "out")
    assert names == [str(tmp_path / "clips/1.mp4"), str(tmp_path / "clips/0.mp4")]  # list order, relative to the list
    np.testing.assert_allclose(features, expected.numpy(), rtol=1e-4, atol=1e-4)


def test_bad_inputs(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"input folder '.*empty' holds no image, video or point files"):
        extract("test_pointmamba", tmp_path / "empty", tmp_path / "o", progress=False)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    np.save(mixed / "cloud.npy", np.zeros((40, 3)))
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(mixed / "photo.png")
    with pytest.raises(ValueError, match=r"inputs mix modalities: images \(e.g. '.*photo.png'\), points \(e.g. '.*cloud.npy'\)"):
        extract("test_pointmamba", mixed, tmp_path / "o", progress=False)
    with pytest.raises(ValueError, match=r"model 'test_vim' takes images but the inputs are points \(e.g. '.*cloud.npy'\)"):
        extract("test_vim", [str(mixed / "cloud.npy")], tmp_path / "o", random_weights=True, progress=False)
    with pytest.raises(ValueError, match=r"modality='video' was asked for"):
        extract("test_videomamba", [str(mixed / "photo.png")], tmp_path / "o", modality="video", progress=False)
    with pytest.raises(ValueError, match=r"checkpoint: checkpoint '.*test_vim.safetensors' does not fit PointMamba: missing"):
        _, weights = saved_model(tmp_path, "test_vim")
        extract("test_pointmamba", [str(mixed / "cloud.npy")], tmp_path / "o", checkpoint=weights, progress=False)


def image_folder(root: Path, count: int = 3) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(RNG.integers(0, 256, size=(count, 32, 32, 3), dtype=np.uint8)):
        Image.fromarray(image).save(root / f"{i}.png")
    return root


def test_a_tagged_name_loads_its_released_weights_through_timm(tmp_path, monkeypatch):
    """vim_tiny_patch16_224.in1k's weights are hustvl/Vim-tiny-midclstok/vim_t_midclstok_76p1acc.pth on the Hugging Face
    Hub. Offline and not cached: an error naming the file and where to put it. With a file in the cache (made here):
    the features are those of the model the file holds."""
    import huggingface_hub.constants

    hub = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    folder = image_folder(tmp_path / "images")
    options = dict(model_kwargs={"img_size": 32}, progress=False)
    missing = r"file 'vim_t_midclstok_76p1acc.pth' .* not in the Hugging Face cache"
    with pytest.raises(WeightsUnavailableError, match=missing) as error:
        extract("vim_tiny_patch16_224.in1k", folder, tmp_path / "none", **options)
    assert f"cache {hub} " in str(error.value) and "vimkit extract --checkpoint PATH" in str(error.value)

    torch.manual_seed(0)
    released = timm.create_model("vim_tiny_patch16_224", img_size=32).eval()
    snapshot = hub / "models--hustvl--Vim-tiny-midclstok" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (hub / "models--hustvl--Vim-tiny-midclstok" / "refs").mkdir()
    (hub / "models--hustvl--Vim-tiny-midclstok" / "refs" / "main").write_text("0" * 40)
    torch.save({"model": released.state_dict()}, snapshot / "vim_t_midclstok_76p1acc.pth")  # the released layout
    manifest = extract("vim_tiny_patch16_224.in1k", folder, tmp_path / "out", **options)
    assert manifest["settings"]["weights"] == {
        "released": {"tag": "vim_tiny_patch16_224.in1k", "source": "hf-hub:hustvl/Vim-tiny-midclstok/vim_t_midclstok_76p1acc.pth"}
    }
    transform = create_transform(32, crop_pct=0.875, interpolation="bicubic")  # Vim's evaluation transform at 32 px
    batch = torch.stack([transform(Image.open(folder / f"{i}.png").convert("RGB")) for i in range(3)])
    with torch.no_grad():
        expected = released.forward_head(released.forward_features(batch), pre_logits=True)
    np.testing.assert_allclose(read_features(tmp_path / "out")[0], expected.numpy(), rtol=1e-4, atol=1e-4)


def test_without_released_weights_random_ones_need_the_flag_and_are_seeded(tmp_path):
    folder = image_folder(tmp_path / "images")
    with pytest.raises(NoReleasedWeightsError, match=r"model 'test_vim' has no released weights.*--checkpoint.*--random-weights"):
        extract("test_vim", folder, tmp_path / "none", progress=False)
    assert not (tmp_path / "none").exists()
    with pytest.raises(ValueError, match=r"random_weights \(--random-weights\) and a checkpoint exclude each other"):
        extract("test_vim", folder, tmp_path / "none", checkpoint=saved_model(tmp_path, "test_vim")[1], random_weights=True)
    features = {}
    for run, seed in (("a", 3), ("b", 3), ("c", 4)):
        manifest = extract("test_vim", folder, tmp_path / run, random_weights=True, seed=seed, progress=False)
        assert manifest["settings"]["weights"] == {"random": {"seed": seed}}
        features[run] = read_features(tmp_path / run)[0]
    np.testing.assert_array_equal(features["a"], features["b"])
    assert not np.allclose(features["a"], features["c"])


def test_a_rerun_resumes_its_own_output_and_a_refusal_names_what_differs(tmp_path, monkeypatch):
    """Settings as given (a tuple img_size) and as stored (a JSON list) are the same settings; so are a relative and an
    absolute --input for the same files."""
    _, weights = saved_model(tmp_path, "test_vim", img_size=32)
    folder = image_folder(tmp_path / "images")
    monkeypatch.chdir(tmp_path)
    options = dict(checkpoint=weights, model_kwargs={"img_size": (32, 32)}, progress=False)
    manifest = extract("test_vim", "images", tmp_path / "out", **options)
    shard = tmp_path / "out" / "shard-00000.pooled.npy"
    stamp = shard.stat().st_mtime_ns
    assert extract("test_vim", str(folder), tmp_path / "out", **options) == manifest  # absolute now: the same run
    assert shard.stat().st_mtime_ns == stamp and manifest["entries"][0]["input"] == str(folder / "0.png")
    (folder / "3.png").write_bytes((folder / "0.png").read_bytes())
    with pytest.raises(ValueError, match=rf"holds features of other inputs \(1 new, e.g. '{folder / '3.png'}'\)"):
        extract("test_vim", "images", tmp_path / "out", **options)


def test_extract_loader_workers_default_to_the_free_cores(tmp_path, monkeypatch):
    """On a 2-core machine: one loader worker (torch warns above 2), not 4."""
    from vim.data.workers import default_num_workers

    _, weights = saved_model(tmp_path, "test_vim")
    folder = image_folder(tmp_path / "images")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert default_num_workers() == 1 and default_num_workers(processes=2) == 0  # two processes run models on the 2 cores
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli_main(
            ["extract", "--model", "test_vim", "--checkpoint", weights, "--input", str(folder), "--out", str(tmp_path / "o")]
        )
    assert not [w for w in caught if "worker processes" in str(w.message)], [str(w.message) for w in caught]
    assert read_features(tmp_path / "o")[0].shape == (3, 32)


def hold_the_lock(out: Path) -> subprocess.Popen:
    """Another process that holds ``out``'s extraction lock, as a running extraction does, until its stdin closes."""
    script = (  # vim/files.py alone, without the package's torch imports, so that it starts at once
        "import importlib.util, sys; from pathlib import Path\n"
        "spec = importlib.util.spec_from_file_location('files', sys.argv[1]); files = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(files)\n"
        "with files.folder_lock(Path(sys.argv[2]), sys.argv[3]):\n    print('locked', flush=True); sys.stdin.read()"
    )
    command = [sys.executable, "-c", script, vim.files.__file__, str(out), LOCK]
    holder = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
    return holder


def test_a_second_run_into_a_folder_in_use_is_refused_naming_the_process_that_holds_it(tmp_path, monkeypatch):
    folder, out = image_folder(tmp_path / "images", count=1), tmp_path / "out"
    out.mkdir()
    options = dict(random_weights=True, progress=False)
    holder = hold_the_lock(out)
    try:
        other = rf"'{re.escape(str(out))}' is in use by pid {holder.pid} on {re.escape(socket.gethostname())} \(-c "
        with pytest.raises(vim.files.FolderInUseError, match=other):
            extract("test_vim", folder, out, **options)
        assert [path.name for path in out.iterdir()] == [LOCK]  # the refused run wrote nothing
        with monkeypatch.context() as patch:
            patch.setattr(rank_zero_only, "rank", 1)  # a process that DDP's launcher started (LOCAL_RANK=1) takes no lock
            assert extract("test_vim", folder, out, **options)["num_rows"] == 1
    finally:
        holder.communicate("")  # its stdin closed, the holder ends
    manifest = json.loads((out / "manifest.json").read_text())
    assert extract("test_vim", folder, out, **options) == manifest  # the lock went with its holder


# ---------------------------------------------------------------------------------------------- several processes
IMAGES_SETTINGS = ["--model", "test_vim", "--random-weights", "--shard-size", "3", "--batch-size", "2"]


def extract_with_two_processes(folder: Path, out: Path) -> subprocess.CompletedProcess:
    """``vimkit extract --devices 2`` on CPU, as a user runs it: Lightning launches the second process (DDP over gloo)."""
    command = [sys.executable, "-m", "vim.cli", "extract", *IMAGES_SETTINGS, "--input", str(folder), "--out", str(out)]
    result = subprocess.run(
        [*command, "--devices", "2", "--device", "cpu", "--num-workers", "0"], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    return result


def interrupt(out: Path, unfinished: list[int]) -> dict[str, int]:
    """Leave ``out`` as a run stopped before ``unfinished`` shards wrote their json (the last file of a shard), with
    the manifest as it is while a run goes on; the modification times of the other shards' files."""
    for shard in unfinished:
        (out / f"shard-{shard:05d}.json").unlink()
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({key: manifest[key] for key in ("settings", "inputs")} | {"complete": False}))
    return {f.name: f.stat().st_mtime_ns for f in out.glob("shard-*") if int(f.name[6:11]) not in unfinished}


def assert_same_extraction(out: Path, reference: Path) -> None:
    """The same manifest, and row for row the same features."""
    assert json.loads((out / "manifest.json").read_text()) == json.loads((reference / "manifest.json").read_text())
    features, names = read_features(out)
    expected, expected_names = read_features(reference)
    assert names == expected_names
    np.testing.assert_array_equal(features, expected)


def ten_images(root: Path) -> Path:
    """9 images and a corrupt one, last in walk order: shards of 3 are [0 1 2] [3 4 5] [6 7 8] [broken]."""
    folder = image_folder(root, count=9)
    (folder / "broken.png").write_bytes(b"not a png")
    return folder


@pytest.mark.slow
def test_two_processes_write_the_shards_of_one_and_one_process_resumes_them(tmp_path):
    folder = ten_images(tmp_path / "images")
    options = dict(random_weights=True, shard_size=3, batch_size=2, progress=False)
    manifest = extract("test_vim", folder, tmp_path / "one", **options)
    assert [s["rows"] for s in manifest["shards"]] == [3, 3, 3, 0] and len(manifest["failed"]) == 1

    result = extract_with_two_processes(folder, tmp_path / "two")
    assert "vimkit extract (rank 0 of 2)" in result.stderr and "| 6/6 " in result.stderr  # rank 0: shards 0 and 2
    assert result.stdout.count("Features of 9 inputs") == 1, result.stdout  # printed by rank 0 alone
    assert_same_extraction(tmp_path / "two", tmp_path / "one")

    # rank 1 (shards 1 and 3) stopped before finishing; one process does what it left, and nothing else
    kept = interrupt(tmp_path / "two", unfinished=[1, 3])
    assert extract("test_vim", folder, tmp_path / "two", **options) == manifest
    assert kept == {name: (tmp_path / "two" / name).stat().st_mtime_ns for name in kept}
    assert_same_extraction(tmp_path / "two", tmp_path / "one")


@pytest.mark.slow
def test_two_processes_resume_a_run_of_one(tmp_path):
    """One unfinished shard for two processes: rank 0 does it, rank 1 has nothing to do and still takes part."""
    folder = ten_images(tmp_path / "images")
    options = dict(random_weights=True, shard_size=3, batch_size=2, progress=False)
    extract("test_vim", folder, tmp_path / "one", **options)
    extract("test_vim", folder, tmp_path / "resumed", **options)
    kept = interrupt(tmp_path / "resumed", unfinished=[2])
    np.save(tmp_path / "resumed" / "shard-00002.pooled.npy", np.zeros((3, 32), np.float32))  # written before the stop
    extract_with_two_processes(folder, tmp_path / "resumed")
    assert kept == {name: (tmp_path / "resumed" / name).stat().st_mtime_ns for name in kept}
    assert_same_extraction(tmp_path / "resumed", tmp_path / "one")


def test_bad_device_settings_are_named_before_anything_is_written(tmp_path):
    folder = image_folder(tmp_path / "images", count=1)
    for settings, message in (
        ({"devices": 0}, r"devices=0 and num_nodes=1 must be at least 1"),
        ({"strategy": "fsdp"}, r"strategy must be one of \('auto', 'ddp', .*\) \(every process runs the whole model\)"),
        ({"device": "cuda:1", "devices": 2}, r"device='cuda:1' names one device; with devices=2 give its type \('cuda'\)"),
        ({"device": "gpu0"}, r"device='gpu0' is not a torch device"),
    ):
        with pytest.raises(ValueError, match=message):
            extract("test_vim", folder, tmp_path / "out", random_weights=True, progress=False, **settings)
    with pytest.raises(SystemExit, match=r"^vimkit extract: error: devices=1 and num_nodes=0 must be at least 1$"):
        cli_main(["extract", *IMAGES_SETTINGS, "--input", str(folder), "--out", str(tmp_path / "out"), "--num_nodes", "0"])
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- weights and lists
def test_a_rewritten_checkpoint_is_other_weights_and_the_same_bytes_resume(tmp_path, monkeypatch):
    """``last.ckpt`` is rewritten in place by more training: the rerun is refused, naming the checkpoint, not answered
    with the old weights' features; the same bytes again, spelled as another path, resume."""
    _, weights = saved_model(tmp_path, "test_vim")
    original = Path(weights).read_bytes()
    folder = image_folder(tmp_path / "images")
    manifest = extract("test_vim", folder, tmp_path / "out", checkpoint=weights, progress=False)
    assert manifest["settings"]["weights"] == {
        "checkpoint": {"path": weights, "sha256": hashlib.sha256(original).hexdigest(), "size": len(original)}
    }
    trained_on = {k: v + 0.01 for k, v in timm.create_model("test_vim", num_classes=7).state_dict().items()}
    save_file(trained_on, weights)  # the same path, other weights
    with pytest.raises(ValueError, match=rf"other settings \(weights\.checkpoint\.sha256: .*; the checkpoint '{weights}'"):
        extract("test_vim", folder, tmp_path / "out", checkpoint=weights, progress=False)

    Path(weights).write_bytes(original)
    stamp = (tmp_path / "out" / "shard-00000.pooled.npy").stat().st_mtime_ns
    monkeypatch.chdir(tmp_path)
    assert extract("test_vim", folder, tmp_path / "out", checkpoint=Path(weights).name, progress=False) == manifest
    assert (tmp_path / "out" / "shard-00000.pooled.npy").stat().st_mtime_ns == stamp


def fit_point_checkpoint(tmp_path: Path, num_points: int, normalize: bool = True) -> Path:
    """A one-step ``PointCloudClassifier`` run of test_pointmamba on clouds of ``num_points`` points, saved by Lightning."""
    from lightning.pytorch import Trainer

    from vim.data.points import PointCloudDataModule
    from vim.training.points import PointCloudClassifier

    for label in ("a", "b"):
        (tmp_path / "train" / label).mkdir(parents=True)
        for i in range(2):
            np.save(tmp_path / "train" / label / f"{i}.npy", RNG.normal(size=(80, 3)).astype(np.float32))
    data = PointCloudDataModule(
        str(tmp_path / "train"), num_points=num_points, min_points=16, batch_size=4, num_workers=0, normalize=normalize
    )
    trainer = Trainer(
        accelerator="cpu", max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(PointCloudClassifier("test_pointmamba", num_classes=2, warmup_epochs=0), data)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    return tmp_path / "last.ckpt"


def test_a_lightning_checkpoint_brings_its_data_settings(tmp_path):
    """A run trained on 48 points per cloud (test_pointmamba's own default is 128) is extracted at 48 points, as its
    evaluation data were, and --num-points still wins."""
    ckpt = fit_point_checkpoint(tmp_path / "run", num_points=48)
    clouds = tmp_path / "clouds"
    clouds.mkdir()
    for i in range(3):
        np.save(clouds / f"{i}.npy", RNG.normal(size=(160, 3)).astype(np.float32))
    manifest = extract(None, clouds, tmp_path / "default", checkpoint=str(ckpt), progress=False)
    explicit = extract(None, clouds, tmp_path / "explicit", checkpoint=str(ckpt), num_points=48, progress=False)
    expected = {"num_points": 48, "normalize": True}
    assert manifest["settings"]["preprocessing"] == explicit["settings"]["preprocessing"] == expected
    np.testing.assert_array_equal(read_features(tmp_path / "default")[0], read_features(tmp_path / "explicit")[0])
    other = extract(None, clouds, tmp_path / "other", checkpoint=str(ckpt), num_points=64, progress=False)
    assert other["settings"]["preprocessing"] == {"num_points": 64, "normalize": True}


def test_a_run_that_kept_the_clouds_scale_is_extracted_without_normalising(tmp_path):
    """data.normalize false (ScanObjectNN's recipe): extraction prepares the clouds the same way, so a cloud and the
    same cloud moved and scaled give different features, while with normalisation they give the same."""
    ckpt = fit_point_checkpoint(tmp_path / "run", num_points=48, normalize=False)
    clouds = tmp_path / "clouds"
    clouds.mkdir()
    cloud = RNG.normal(size=(48, 3)).astype(np.float32)  # 48 points: resampling keeps them all
    np.save(clouds / "0.npy", cloud)
    np.save(clouds / "1.npy", cloud * 3 + 1)
    kept = extract(None, clouds, tmp_path / "kept", checkpoint=str(ckpt), progress=False)
    assert kept["settings"]["preprocessing"] == {"num_points": 48, "normalize": False}
    features = read_features(tmp_path / "kept")[0]
    assert not np.allclose(features[0], features[1], atol=1e-4)
    normalised = fit_point_checkpoint(tmp_path / "run_n", num_points=48)
    extract(None, clouds, tmp_path / "normalised", checkpoint=str(normalised), progress=False)
    same = read_features(tmp_path / "normalised")[0]
    np.testing.assert_allclose(same[0], same[1], rtol=1e-4, atol=1e-4)


def test_image_preprocessing_follows_the_checkpoints_data_module(tmp_path):
    """The normalisation and crop the run's data module evaluated with, not the model's pretrained cfg's."""
    torch.manual_seed(0)
    model = timm.create_model("test_vim", num_classes=3).eval()
    data = {"img_size": 32, "crop_pct": 1.0, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "interpolation": "bilinear"}
    torch.save(
        {
            "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
            "hyper_parameters": {"model": "test_vim", "num_classes": 3, "img_size": 32},
            "datamodule_hyper_parameters": data,
        },
        tmp_path / "last.ckpt",
    )
    folder = image_folder(tmp_path / "images")
    manifest = extract(None, folder, tmp_path / "out", checkpoint=str(tmp_path / "last.ckpt"), progress=False)
    assert manifest["settings"]["preprocessing"] == {
        "img_size": [32, 32], "interpolation": "bilinear", "crop_pct": 1.0, "mean": [0.5] * 3, "std": [0.25] * 3
    }  # fmt: skip
    pixels = np.stack([np.asarray(Image.open(folder / f"{i}.png")) for i in range(3)])
    batch = (torch.from_numpy(pixels).permute(0, 3, 1, 2) / 255 - 0.5) / 0.25  # 32 px images: resize and crop are no-ops
    model.reset_classifier(0)
    with torch.no_grad():
        expected = model.forward_head(model.forward_features(batch), pre_logits=True)
    np.testing.assert_allclose(read_features(tmp_path / "out")[0], expected.numpy(), rtol=1e-4, atol=1e-4)


def test_list_file_paths_keep_their_spaces(tmp_path):
    """A list line is a path, spaces included; a label follows a comma, a tab, or a space after the extension."""
    from vim.extraction import resolve_inputs

    folder = image_folder(tmp_path / "images", count=4)
    for i, name in enumerate(["holiday photo.png", "beach day.png", "a b c.png", "plain.png"]):
        (folder / f"{i}.png").rename(folder / name)
    listing = tmp_path / "list.txt"
    listing.write_text(
        "# path [label]\nimages/holiday photo.png\nimages/beach day.png,3\nimages/a b c.png\t1\nimages/plain.png 2\n"
    )
    names, modality = resolve_inputs(listing)
    assert modality == "images"
    assert names == [str(folder / n) for n in ("holiday photo.png", "beach day.png", "a b c.png", "plain.png")]
    manifest = extract("test_vim", listing, tmp_path / "out", random_weights=True, progress=False)
    assert manifest["num_rows"] == 4 and not manifest["failed"]


def test_released_scanobjectnn_weights_take_the_scans_as_they_are():
    """Upstream fine-tuned its ScanObjectNN weights on unnormalised scans; every other tag on unit-sphere clouds."""
    from vim.data.modalities import evaluation_preprocessing

    scan = timm.create_model("pointmamba_scan_small_g128.scanobjectnn_hardest", pretrained=False)
    modelnet = timm.create_model("pointmamba_scan_small.modelnet40", pretrained=False)
    assert evaluation_preprocessing(scan)["normalize"] is False
    assert evaluation_preprocessing(modelnet)["normalize"] is True
    assert evaluation_preprocessing(scan, {"normalize": True})["normalize"] is True  # a run's own data module wins


def test_layers_of_a_hierarchical_model_are_its_stages(tmp_path):
    """``layers`` numbers what forward_intermediates numbers: for a model in stages, the stages (each its own width and
    grid), compared with the model's own intermediates computed here."""
    folder = image_folder(tmp_path / "images")
    options = dict(random_weights=True, seed=0, layers=[0, 3], model_kwargs={"img_size": 32}, progress=False)
    extract("test_hier_mamba", folder, tmp_path / "out", **options)
    torch.manual_seed(0)
    model = timm.create_model("test_hier_mamba", img_size=32, num_classes=0).eval()
    config = resolve_data_config({}, model=model)  # its evaluation transform, at the size it was created with
    transform = create_transform(32, **{key: config[key] for key in ("crop_pct", "interpolation", "mean", "std")})
    batch = torch.stack([transform(Image.open(folder / f"{i}.png").convert("RGB")) for i in range(3)])
    with torch.no_grad():
        _, (first, last) = model.forward_intermediates(batch, indices=[0, 3], output_fmt="NLC")
    np.testing.assert_allclose(read_features(tmp_path / "out", "layer0")[0], first.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(read_features(tmp_path / "out", "layer3")[0], last.numpy(), rtol=1e-4, atol=1e-5)
    assert first.shape[1:] == (64, 16) and last.shape[1:] == (1, 128)  # stride 4 of 32 px: 8 x 8; stride 32: 1 x 1
    with pytest.raises(ValueError, match=r"has intermediates 0..3 \(blocks or stages\)"):
        extract("test_hier_mamba", folder, tmp_path / "bad", **{**options, "layers": [4]})
