"""Released weights through timm's own loading path, offline: fabricated official files in the Hub and torch caches."""

from __future__ import annotations

import argparse
import csv
import json
import shutil
from pathlib import Path

import pytest
import timm
import torch
from huggingface_hub import constants as hf_constants

import vim.models  # noqa: F401  (registers the models)
from vim.models.weights import (
    NoReleasedWeightsError,
    WeightsUnavailableError,
    create_released_model,
    has_released_weights,
    released_weights,
    resolve_pretrained,
)

from support.paths import REPO

SMALL = dict(depth=2, embed_dim=32, d_state=8)
"""The registered architectures, shrunk: the fabricated files are made for models of this size."""


@pytest.fixture
def caches(tmp_path, monkeypatch) -> dict[str, Path]:
    """Empty Hugging Face and torch hub caches, Hub offline: any download attempt fails instead of reaching the network."""
    hub, torch_home = tmp_path / "hf", tmp_path / "torch"
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("TORCH_HOME", str(torch_home))

    def no_network(url, *args, **kwargs):
        raise OSError(f"no network in tests ({url})")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return {"hub": hub, "urls": torch_home / "hub" / "checkpoints"}


def put_in_hub_cache(hub: Path, repo_id: str, filename: str, checkpoint: dict) -> Path:
    """Lay a file out as huggingface_hub caches a download of ``repo_id``/``filename`` at revision main."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    path = repo / "snapshots" / commit / filename
    path.parent.mkdir(parents=True)
    torch.save(checkpoint, path)
    return path


def training_checkpoint(model: torch.nn.Module) -> dict:
    """As Vim's and VideoMamba's train loops save: weights beside optimizer state and the run's Namespace."""
    weights = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    return {"model": weights, "optimizer": {"state": {}}, "epoch": 3, "args": argparse.Namespace(lr=1e-4, model="x")}


def assert_loaded(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert set(state) == set(weights)
    for key, value in weights.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)


def test_vim_tag_loads_from_the_hub_cache(caches) -> None:
    torch.manual_seed(0)
    info = released_weights("vim_tiny_patch16_224.in1k")
    assert (info.hf_hub_id, info.filename) == ("hustvl/Vim-tiny-midclstok", "vim_t_midclstok_76p1acc.pth")
    checkpoint = training_checkpoint(timm.create_model("vim_tiny_patch16_224", **SMALL))
    path = put_in_hub_cache(caches["hub"], info.hf_hub_id, info.filename, checkpoint)
    model = timm.create_model("vim_tiny_patch16_224.in1k", pretrained=True, **SMALL)
    assert_loaded(model, checkpoint["model"])
    assert resolve_pretrained("vim_tiny_patch16_224") == path  # the default tag, from the cache
    assert_loaded(create_released_model("vim_tiny_patch16_224.in1k", **SMALL), checkpoint["model"])


@pytest.mark.parametrize("source", ["hf-hub", "url"])
def test_videomamba_tag_loads_from_the_hub_or_the_url_cache(caches, source: str) -> None:
    """The URL path reads the file with our safe reader too (timm's own URL loader refuses the Namespace)."""
    torch.manual_seed(0)
    info = released_weights("videomamba_tiny.k400_f16")
    checkpoint = training_checkpoint(timm.create_model("videomamba_tiny", num_frames=16, **SMALL))
    if source == "hf-hub":
        put_in_hub_cache(caches["hub"], info.hf_hub_id, info.filename, checkpoint)
        overlay = {}
    else:
        caches["urls"].mkdir(parents=True)
        torch.save(checkpoint, caches["urls"] / info.filename)
        overlay = dict(hf_hub_id=None)  # as without huggingface_hub installed: timm takes the URL
    model = timm.create_model("videomamba_tiny.k400_f16", pretrained=True, pretrained_cfg_overlay=overlay, **SMALL)
    assert model.patch_embed.num_frames == 16  # the tag's clip length
    assert_loaded(model, checkpoint["model"])


def test_videomamba_image_tag_inflates_its_own_layout(caches) -> None:
    """videomamba_*.in1k holds VideoMamba's image model: class token in front, summed directions (nothing halved)."""
    torch.manual_seed(0)
    info = released_weights("videomamba_tiny.in1k")
    assert info.filename == "videomamba_t16_in1k_res224.pth" and info.num_classes == 1000
    video = timm.create_model("videomamba_tiny", num_classes=1000, **SMALL)
    image = {k: v for k, v in video.state_dict().items() if k != "temporal_pos_embedding"}
    image["patch_embed.proj.weight"] = torch.randn(32, 3, 16, 16)
    image["pos_embed"] = torch.randn(1, 197, 32)
    put_in_hub_cache(caches["hub"], info.hf_hub_id, info.filename, image)  # a bare state dict, as upstream's
    model = timm.create_model("videomamba_tiny.in1k", pretrained=True, **SMALL)
    torch.testing.assert_close(model.pos_embed, image["pos_embed"])
    torch.testing.assert_close(model.patch_embed.proj.weight[:, :, 0], image["patch_embed.proj.weight"])
    key = "layers.1.mixer.out_proj.weight"
    torch.testing.assert_close(model.state_dict()[key], image[key])


def test_missing_file_error_names_the_file_and_where_to_put_it(caches) -> None:
    with pytest.raises(WeightsUnavailableError, match=r"'videomamba_t16_k400_f8_res224\.pth'.*OpenGVLab/VideoMamba") as hub:
        resolve_pretrained("videomamba_tiny.k400_f8")
    assert str(caches["hub"]) in str(hub.value) and "hf download OpenGVLab/VideoMamba" in str(hub.value)


def test_names_without_released_weights() -> None:
    assert has_released_weights("videomamba_small.ssv2_f8") and not has_released_weights("test_vim")
    assert not has_released_weights("no_such_model")
    with pytest.raises(NoReleasedWeightsError, match="'test_videomamba' has no released weights"):
        resolve_pretrained("test_videomamba")
    with pytest.raises(NoReleasedWeightsError, match=r"no tag 'k400_f12'; its tags: in1k, k400_f8"):
        released_weights("videomamba_tiny.k400_f12")


@pytest.mark.parametrize(
    ("config", "hub_file", "classes"),
    [
        ("finetune_images", ("hustvl/Vim-small-midclstok", "vim_s_midclstok_80p5acc.pth"), 5),
        ("finetune_video", ("OpenGVLab/VideoMamba", "videomamba_s16_k400_f8_res224.pth"), 10),
        ("finetune_points", None, 8),
    ],
)
def test_finetune_configs_start_from_the_released_weights(caches, config, hub_file, classes):
    """Each fine-tuning config builds its model from the tag's released file (here a fabricated one in the cache,
    shrunk through model_kwargs), with a new head for the data's classes (their number set by the data's folders)."""
    from vim.cli import run_lightning

    from reference.pointmamba import official_shapes, official_state_dict, released_file

    torch.manual_seed(0)
    small = dict(SMALL, head_hidden_size=32) if config == "finetune_points" else SMALL
    name = {"finetune_images": "vim_small_patch16_224", "finetune_video": "videomamba_small"}.get(config)
    if hub_file is not None:
        checkpoint = training_checkpoint(timm.create_model(name, **small))
        put_in_hub_cache(caches["hub"], *hub_file, checkpoint)
        trunk = checkpoint["model"]["layers.1.mixer.A_b_log"]
    else:
        base_model = official_state_dict(official_shapes(None, d=32, depth=2, d_state=8), torch.Generator().manual_seed(0))
        caches["urls"].mkdir(parents=True)
        torch.save(released_file(base_model), caches["urls"] / "pointmamba_pretrain.pth")
        trunk = base_model["MAE_encoder.blocks.layers.1.mixer.A_log"]
    classes_root = caches["hub"].parent / "data"  # the data's class folders: the head's size comes from them
    for c in range(classes):
        (classes_root / f"class{c}").mkdir(parents=True)
    data_root = "train_path" if config == "finetune_points" else "train_root"
    cli = run_lightning(
        [
            "--config",
            str(REPO / "configs" / f"{config}.yaml"),
            f"--model.init_args.model_kwargs={json.dumps(small)}",
            f"--data.init_args.{data_root}={classes_root}",
        ],
        run=False,
    )
    model = cli.model.model
    torch.testing.assert_close(model.layers[1].mixer.state_dict()["A_b_log" if hub_file else "A_log"], trunk)
    assert model.num_classes == cli.model.num_classes == classes
    classifier = model.get_classifier() if hub_file else model.get_classifier()[-1]  # PointMambaScan: the MLP head
    assert classifier.out_features == classes
    assert cli.model.hparams.layer_decay == {"finetune_images": 0.92, "finetune_video": None, "finetune_points": None}[config]


def test_url_file_missing_offline_names_the_torch_hub_path(caches) -> None:
    info = released_weights("pointmamba_scan_small_g128.scanobjectnn_hardest")
    assert info.source == "url" and info.filename == "pointmamba_finetune_scan_hardest.pth"
    with pytest.raises(WeightsUnavailableError, match=r"finetune_scan_hardest.pth") as error:
        resolve_pretrained(info.name)
    assert str(caches["urls"] / "pointmamba_finetune_scan_hardest.pth") in str(error.value)
    assert "no network in tests" in str(error.value)  # the download's own reason


def finetune_images_args(images: Path) -> list[str]:
    """configs/finetune_images.yaml shrunk to a tiny model, 32 px images and one CPU process; lr ~0, so that a short
    run keeps the initial weights (to within 1e-6)."""
    return [
        "--config",
        str(REPO / "configs" / "finetune_images.yaml"),
        f"--model.init_args.model_kwargs={json.dumps(SMALL)}",
        "--model.init_args.lr=1e-12",
        "--model.init_args.warmup_lr=1e-12",
        f"--data.init_args.train_root={images}",
        f"--data.init_args.val_root={images}",
        "--data.init_args.img_size=32",
        "--data.init_args.batch_size=4",
        "--data.init_args.num_workers=0",
        "--trainer.accelerator=cpu",
        "--trainer.precision=32-true",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]


def test_a_checkpoint_restores_without_the_released_file(caches, tmp_path, monkeypatch):
    """Fine-tune from released weights, then lose the released file (offline, not cached): resuming, validating,
    loading and extracting from the run's checkpoint do not read it again. --ckpt_path last with no run yet starts
    from it, as a new run does."""
    import vim
    from vim.cli import run_lightning
    from vim.training.image_classifier import ImageClassifier

    from support.training import write_tree

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    released = training_checkpoint(timm.create_model("vim_small_patch16_224", **SMALL))["model"]
    put_in_hub_cache(caches["hub"], "hustvl/Vim-small-midclstok", "vim_s_midclstok_80p5acc.pth", {"model": released})
    images = write_tree(tmp_path / "images", classes=2, per_class=4, size=32)
    args = finetune_images_args(images)

    first = run_lightning(["fit", *args, "--ckpt_path=last", "--trainer.max_steps=1"])  # no run to resume yet
    key = "layers.1.mixer.A_b_log"
    torch.testing.assert_close(first.model.model.state_dict()[key], released[key], rtol=0, atol=1e-6)

    shutil.rmtree(caches["hub"])  # the released file is gone and cannot be downloaded
    resumed = run_lightning(["fit", *args, "--ckpt_path=last", "--trainer.max_steps=2"])
    assert resumed.trainer.global_step == 2
    last = tmp_path / "runs/finetune_images/latest/checkpoints/last.ckpt"
    run_lightning(["validate", *args, f"--ckpt_path={last}"])
    restored = ImageClassifier.load_from_checkpoint(last, map_location="cpu")
    saved = torch.load(last, map_location="cpu", weights_only=True)["state_dict"]
    torch.testing.assert_close(restored.model.state_dict()[key], saved[f"model.{key}"], rtol=0, atol=0)
    manifest = vim.extract(None, images, tmp_path / "features", checkpoint=str(last), progress=False)
    assert manifest["num_rows"] == 8


def test_predict_without_a_checkpoint_uses_the_released_weights_and_classes(caches, tmp_path, monkeypatch):
    """vimkit predict on a tagged name and a folder of images: the released weights, head and ImageNet class names."""
    from PIL import Image
    from timm.data import ImageNetInfo, create_transform

    from vim.cli import run_lightning

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    weights = training_checkpoint(timm.create_model("vim_small_patch16_224", img_size=32, **SMALL))["model"]  # no resizing
    put_in_hub_cache(caches["hub"], "hustvl/Vim-small-midclstok", "vim_s_midclstok_80p5acc.pth", {"model": weights})
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, pixels in enumerate(
        torch.randint(0, 256, (3, 40, 40, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    ):
        Image.fromarray(pixels.numpy()).save(photos / f"{i}.png")
    predictions = tmp_path / "predictions.csv"
    run_lightning(
        [
            "predict",
            "--model=ImageClassifier",
            "--model.model=vim_small_patch16_224.in1k",
            f"--model.model_kwargs={json.dumps(SMALL)}",
            "--data=ImageDataModule",
            f"--data.predict_root={photos}",
            "--data.img_size=32",
            "--data.num_workers=0",
            "--trainer.accelerator=cpu",
            "--trainer.logger=false",
            f"--predict_writer.output={predictions}",
        ]
    )
    with predictions.open(newline="") as file:
        rows = {Path(row["path"]).name: row for row in csv.DictReader(file)}

    model = timm.create_model("vim_small_patch16_224", img_size=32, **SMALL).eval()
    model.load_state_dict(weights)
    transform = create_transform(32, crop_pct=0.875, interpolation="bicubic")  # Vim's evaluation transform at 32 px
    names = ImageNetInfo("imagenet-1k").label_descriptions()
    for i in range(3):
        with torch.no_grad():
            probs = model(transform(Image.open(photos / f"{i}.png").convert("RGB"))[None]).softmax(-1)[0]
        assert rows[f"{i}.png"]["class1"] == names[int(probs.argmax())]
        assert float(rows[f"{i}.png"]["prob1"]) == pytest.approx(float(probs.max()), abs=2e-4)


def test_vmamba_tag_loads_its_github_release_file_from_the_torch_hub_cache(caches) -> None:
    """VMamba's releases are GitHub files under upstream's key names (``{"model": ...}`` beside the run's state): timm's
    URL path finds the cached file and our safe reader and filter load it; offline without it, the error names it."""
    from vim.models.vmamba import to_official_state_dict

    torch.manual_seed(0)
    small = dict(dims=(16, 32, 64, 128), depths=(1, 1, 1, 1))
    info = released_weights("vmamba_tiny_s1l8.in1k")
    assert info.source == "url" and info.filename == "vssm1_tiny_0230s_ckpt_epoch_264.pth"
    with pytest.raises(WeightsUnavailableError, match=r"vssm1_tiny_0230s_ckpt_epoch_264\.pth"):
        resolve_pretrained(info.name)
    ours = training_checkpoint(timm.create_model("vmamba_tiny_s1l8", **small))["model"]
    caches["urls"].mkdir(parents=True, exist_ok=True)
    released = {**training_checkpoint(torch.nn.Identity()), "model": to_official_state_dict(ours)}
    torch.save(released, caches["urls"] / info.filename)
    assert_loaded(timm.create_model("vmamba_tiny_s1l8.in1k", pretrained=True, **small), ours)
    assert_loaded(create_released_model("vmamba_tiny_s1l8.in1k", **small), ours)


def test_mambavision_tag_loads_its_hub_file_in_upstreams_layout(caches) -> None:
    """MambaVision's releases are ``.pth.tar`` files on the Hub (``nvidia/MambaVision-T-1K``) with upstream's key names
    under ``"state_dict"``: timm's Hub path finds the cached file and our safe reader and filter load it."""
    from vim.models.mambavision import to_official_state_dict

    torch.manual_seed(0)
    small = dict(dim=16, in_dim=8)
    info = released_weights("mambavision_tiny.in1k")
    assert (info.hf_hub_id, info.filename) == ("nvidia/MambaVision-T-1K", "mambavision_tiny_1k.pth.tar")
    ours = training_checkpoint(timm.create_model("mambavision_tiny", **small))["model"]
    checkpoint = {"state_dict": to_official_state_dict(ours), "epoch": 309, "args": argparse.Namespace(lr=5e-3)}
    put_in_hub_cache(caches["hub"], info.hf_hub_id, info.filename, checkpoint)
    assert_loaded(timm.create_model("mambavision_tiny.in1k", pretrained=True, **small), ours)
    assert_loaded(create_released_model("mambavision_tiny.in1k", **small), ours)


@pytest.mark.parametrize(
    ("config", "name", "release"),
    [
        ("finetune_vmamba", "vmamba_tiny_s1l8", ("url", "vssm1_tiny_0230s_ckpt_epoch_264.pth")),
        ("finetune_mambavision", "mambavision_tiny", ("hf-hub", "nvidia/MambaVision-T-1K", "mambavision_tiny_1k.pth.tar")),
    ],
)
def test_hierarchical_finetune_configs_start_from_the_released_weights(caches, config, name, release):
    """The VMamba and MambaVision fine-tuning configs build their model from the tag's released file in upstream's
    layout (fabricated here, shrunk through model_kwargs) with a new head for the data's classes."""
    from vim.cli import run_lightning
    from vim.models import mambavision, vmamba

    torch.manual_seed(0)
    small = dict(dims=(16, 32, 64, 128), depths=(1, 1, 1, 1)) if config == "finetune_vmamba" else dict(dim=16, in_dim=8)
    family = vmamba if config == "finetune_vmamba" else mambavision
    ours = training_checkpoint(timm.create_model(name, **small))["model"]
    if release[0] == "url":
        caches["urls"].mkdir(parents=True)
        torch.save({"model": family.to_official_state_dict(ours)}, caches["urls"] / release[1])
    else:
        put_in_hub_cache(caches["hub"], release[1], release[2], {"state_dict": family.to_official_state_dict(ours)})
    classes_root = caches["hub"].parent / "data"
    for c in range(4):
        (classes_root / f"class{c}").mkdir(parents=True)
    cli = run_lightning(
        [
            "--config",
            str(REPO / "configs" / f"{config}.yaml"),
            f"--model.init_args.model_kwargs={json.dumps(small)}",
            f"--data.init_args.train_root={classes_root}",
        ],
        run=False,
    )
    model = cli.model.model
    state = model.state_dict()
    for key in ("stages.2.blocks.0.mixer.out_proj.weight", "stages.3.downsample.conv.weight", "norm_f.weight"):
        torch.testing.assert_close(state[key], ours[key], rtol=0, atol=0, msg=key)
    assert model.get_classifier().out_features == cli.model.num_classes == 4
    assert cli.model.hparams.layer_decay == 0.9


def test_timm_create_model_offline_names_the_missing_file(caches) -> None:
    """``timm.create_model(tag, pretrained=True)`` with the file neither cached nor downloadable: our error naming the
    file, the cache and the flag that takes a local file, from the family's builder (not the Hub client's own), at
    once."""
    import time

    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError, match=r"'vim_s_midclstok_80p5acc\.pth'.*--model\.pretrained_file PATH"):
        timm.create_model("vim_small_patch16_224.in1k", pretrained=True, **SMALL)
    assert time.monotonic() - start < 10, "no retries"
