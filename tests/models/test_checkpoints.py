"""Loading official Vim checkpoints (.pth training checkpoints, .safetensors) through timm."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors import safe_open

import vim.models  # noqa: F401  (registers the models)
from vim.models import load_official_checkpoint

from support.paths import REPO

TOOLS = REPO / "tools"


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class NotAllowed:
    """A pickled object torch.load(weights_only=True) must refuse."""


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    """Random test_vim weights; the key names are the official ones (the golden test checks them)."""
    torch.manual_seed(0)
    return {k: v.clone() for k, v in timm.create_model("test_vim").state_dict().items()}


def _save_training_checkpoint(path: Path, model_weights: dict, **extra) -> Path:
    """What the official train loop saves: weights next to optimizer state and the run's Namespace."""
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))])
    checkpoint = {
        "model": model_weights,
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": {"last_epoch": 3},
        "epoch": 3,
        "args": argparse.Namespace(model="vim_tiny_patch16_224", lr=5e-4, data_path="/data", input_size=224, distributed=True),
        **extra,
    }
    torch.save(checkpoint, path)
    return path


def _create(file: Path, **kwargs) -> torch.nn.Module:
    return timm.create_model("test_vim", pretrained=True, pretrained_cfg_overlay=dict(file=str(file)), **kwargs)


def _assert_state_equal(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert set(state) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)


def test_training_pth_with_optimizer_and_namespace(tmp_path, weights) -> None:
    path = _save_training_checkpoint(tmp_path / "vim.pth", weights)
    _assert_state_equal(_create(path), weights)
    assert set(load_official_checkpoint(path)) == set(weights)


def test_model_is_preferred_to_its_ema_copy_and_ddp_prefix_stripped(tmp_path, weights) -> None:
    # Vim's and VideoMamba's training scripts save "model_ema" beside "model" but evaluate and publish "model"
    ema = {k: v + 1 for k, v in weights.items()}
    path = _save_training_checkpoint(tmp_path / "vim.pth", {f"module.{k}": v for k, v in weights.items()}, model_ema=ema)
    _assert_state_equal(_create(path), weights)
    ema_loaded = load_official_checkpoint(path, use_ema=True)
    assert set(ema_loaded) == set(ema)
    torch.testing.assert_close(ema_loaded["pos_embed"], ema["pos_embed"])


def test_safetensors_conversion_and_loading(tmp_path, weights, capsys) -> None:
    convert = _load_tool("convert_checkpoint")
    source = _save_training_checkpoint(tmp_path / "vim.pth", weights)
    target = tmp_path / "out" / "vim.safetensors"
    assert convert.main([str(source), str(target), "--model", "test_vim"]) == 0
    with safe_open(str(target), framework="pt") as f:
        assert f.metadata()["source"] == "vim.pth" and set(f.keys()) == set(weights)
    _assert_state_equal(_create(target), weights)
    assert set(load_official_checkpoint(target)) == set(weights)

    ema = {k: v + 1 for k, v in weights.items()}
    with_ema = _save_training_checkpoint(tmp_path / "with_ema.pth", weights, model_ema=ema)
    for flags, expected in (([], weights), (["--ema"], ema)):
        assert convert.main([str(with_ema), str(target), *flags]) == 0
        torch.testing.assert_close(load_official_checkpoint(target)["pos_embed"], expected["pos_embed"])

    assert convert.main([str(source), str(tmp_path / "bad.safetensors"), "--model", "vim_tiny_patch16_224"]) == 1
    assert "has shape" in capsys.readouterr().err
    assert convert.main([str(tmp_path / "missing.pth"), str(target)]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_wrong_shape_names_the_key_and_both_shapes(tmp_path, weights) -> None:
    broken = dict(weights, **{"layers.1.mixer.x_proj_b.weight": torch.zeros(7, 64)})
    path = _save_training_checkpoint(tmp_path / "vim.pth", broken)
    with pytest.raises(ValueError, match=r"'layers\.1\.mixer\.x_proj_b\.weight' has shape \(7, 64\).*expects \(18, 64\)"):
        _create(path)


def test_pos_embed_is_resampled_for_another_image_size(tmp_path, weights) -> None:
    path = _save_training_checkpoint(tmp_path / "vim.pth", weights)
    model = _create(path, img_size=48)  # 7 x 7 grid in the checkpoint, 11 x 11 in the model
    pos_embed = model.pos_embed.detach()
    assert pos_embed.shape == (1, 11 * 11 + 1, 32)
    source = weights["pos_embed"]
    torch.testing.assert_close(pos_embed[:, 60], source[:, 24])  # the class slot moves to the new middle
    grid = torch.cat([source[:, :24], source[:, 25:]], dim=1).reshape(1, 7, 7, 32).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(11, 11), mode="bicubic", antialias=True).permute(0, 2, 3, 1).reshape(1, 121, 32)
    torch.testing.assert_close(torch.cat([pos_embed[:, :60], pos_embed[:, 61:]], dim=1), grid)
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(1, 3, 48, 48))).all()


def test_new_head_and_input_channels_are_adapted_by_timm(tmp_path, weights) -> None:
    path = _save_training_checkpoint(tmp_path / "vim.pth", weights)
    model = _create(path, num_classes=10, in_chans=1)
    assert model.head.out_features == 10
    torch.testing.assert_close(model.layers[2].mixer.A_b_log, weights["layers.2.mixer.A_b_log"])
    torch.testing.assert_close(model.patch_embed.proj.weight, weights["patch_embed.proj.weight"].sum(dim=1, keepdim=True))


def test_unsafe_pickles_are_refused_with_a_hint(tmp_path, weights) -> None:
    path = _save_training_checkpoint(tmp_path / "vim.pth", weights, extra=NotAllowed())
    with pytest.raises(ValueError, match="add_safe_globals"):
        load_official_checkpoint(path)


def save_with_foreign_types(path: Path, checkpoint: dict, module_name: str, class_name: str, payload: dict) -> Path:
    """``torch.save`` a checkpoint holding an instance of ``module_name.class_name`` (built here, then removed from
    ``sys.modules``: a type of a package that is not installed, as mmengine is not) with ``payload`` as its attributes."""
    import sys
    import types

    parents = module_name.split(".")
    names = [".".join(parents[: i + 1]) for i in range(len(parents))]
    added = [name for name in names if name not in sys.modules]
    for name in added:
        sys.modules[name] = types.ModuleType(name)
    foreign = type(class_name, (), {"__module__": module_name})
    setattr(sys.modules[module_name], class_name, foreign)
    instance = foreign()
    instance.__dict__.update(payload)
    try:
        torch.save({**checkpoint, "message_hub": {"log_scalars": {"loss": instance}}}, path)
    finally:
        for name in added:
            del sys.modules[name]
    return path


def test_mmengine_bookkeeping_beside_the_weights_is_read_as_inert_objects(tmp_path) -> None:
    """mmengine's checkpoint hook pickles its message hub (HistoryBuffer objects holding numpy arrays) beside the
    weights: the weights load, and nothing of those types is called. Any other foreign object is still refused."""
    import numpy as np

    weights = {"backbone.patch_embed.weight": torch.randn(4, 3)}
    history = {"_log_history": np.arange(3.0), "_count_history": np.ones(3, dtype=np.int64), "max_length": 10}
    path = save_with_foreign_types(
        tmp_path / "mask_rcnn.pth", {"meta": {"epoch": 12}, "state_dict": weights},
        "mmengine.logging.history_buffer", "HistoryBuffer", history,
    )  # fmt: skip
    loaded = load_official_checkpoint(path)
    assert loaded.keys() == weights.keys() and torch.equal(
        loaded["backbone.patch_embed.weight"], weights["backbone.patch_embed.weight"]
    )
    other = save_with_foreign_types(tmp_path / "other.pth", {"state_dict": weights}, "somepackage.logging", "Buffer", {})
    with pytest.raises(ValueError, match=r"somepackage\.logging\.Buffer"):
        load_official_checkpoint(other)


def test_bookkeeping_types_run_no_code_of_a_payload(tmp_path) -> None:
    """A file whose bookkeeping hides a payload that runs code (here: touching a file) is refused, the code not run."""
    from support.pickles import TouchOnUnpickle

    marker = tmp_path / "ran"
    torch.save({"state_dict": {"w": torch.ones(1)}, "message_hub": TouchOnUnpickle(marker)}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="is refused"):
        load_official_checkpoint(tmp_path / "evil.pth")
    assert not marker.exists()
