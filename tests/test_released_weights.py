"""Released weights through timm's own loading path, offline: fabricated official files in the Hub and torch caches."""

from __future__ import annotations

import argparse
import json
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


REPO = Path(__file__).resolve().parents[1]


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
    shrunk through model_kwargs), with a new head for the data's classes."""
    from pointmamba_reference import official_shapes, official_state_dict, released_file

    from vim.cli import run_lightning

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
    kwargs = json.dumps({"pretrained": True, **small})
    cli = run_lightning(
        ["--config", str(REPO / "configs" / f"{config}.yaml"), f"--model.init_args.model_kwargs={kwargs}"], run=False
    )
    model = cli.model.model
    torch.testing.assert_close(model.layers[1].mixer.state_dict()["A_b_log" if hub_file else "A_log"], trunk)
    assert model.num_classes == cli.model.num_classes == classes
    classifier = model.get_classifier() if hub_file else model.get_classifier()[-1]  # PointMambaScan: the MLP head
    assert classifier.out_features == classes
    assert cli.model.layer_decay == {"finetune_images": 0.92, "finetune_video": 0.75, "finetune_points": None}[config]


def test_url_file_missing_offline_names_the_torch_hub_path(caches) -> None:
    info = released_weights("pointmamba_scan_small_g128.scanobjectnn_hardest")
    assert info.source == "url" and info.filename == "pointmamba_finetune_scan_hardest.pth"
    with pytest.raises(WeightsUnavailableError, match="finetune_scan_hardest.pth") as error:
        resolve_pretrained(info.name)
    assert str(caches["urls"] / "pointmamba_finetune_scan_hardest.pth") in str(error.value)
    assert "no network in tests" in str(error.value)  # the download's own reason
