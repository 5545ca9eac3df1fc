"""VMamba and MambaVision through every ``vimkit`` workflow: fit (each with its upstream optimizer), predict from the
run's checkpoint, export for timm and extract from the same checkpoint; and the recipes of their configs."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml

from vim.cli import main, run_lightning
from vim.data.images import ImageDataModule
from vim.extraction import extract, read_features

from support.paths import REPO
from support.training import tiny_config


def hierarchical_config(tmp_path: Path, name: str, optimizer: str) -> str:
    """The tiny run (18 images of 3 classes, batch 4) on ``name`` at 32 pixels with ``optimizer``."""
    config = yaml.safe_load(Path(tiny_config(tmp_path)).read_text())
    config["model"]["init_args"].update(model=name, model_kwargs={}, img_size=32, optimizer=optimizer, lr=1e-3)
    config["data"]["init_args"].update(img_size=32)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.mark.parametrize(("name", "optimizer"), [("test_vmamba", "adamw"), ("test_mambavision", "lamb")])
def test_fit_predict_export_and_extract(tmp_path, monkeypatch, name, optimizer):
    monkeypatch.chdir(tmp_path)
    config = hierarchical_config(tmp_path, name, optimizer)
    fit = run_lightning(["fit", "--config", config, "--trainer.max_steps=3", "--trainer.limit_val_batches=1"])
    assert type(fit.trainer.optimizers[0]).__name__ == {"adamw": "AdamW", "lamb": "Lamb"}[optimizer]
    assert fit.trainer.global_step == 3
    last = tmp_path / "runs/tiny/latest/checkpoints/last.ckpt"
    assert last.is_file()

    images = tmp_path / "images" / "class1"
    predictions = tmp_path / "predictions.csv"
    main(["predict", "--config", config, f"--ckpt_path={last}", f"--data.init_args.predict_root={images}",
          f"--predict_writer.output={predictions}", "--trainer.enable_progress_bar=false"])  # fmt: skip
    with predictions.open(newline="") as file:
        rows = {row["path"]: row for row in csv.DictReader(file)}
    assert len(rows) == 6

    weights = tmp_path / f"{name}.safetensors"
    main(["export", "--ckpt", str(last), "--out", str(weights)])
    overlay = dict(file=str(weights), num_classes=3)
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, img_size=32).eval()
    data = ImageDataModule(predict_root=str(images), img_size=32, crop_pct=0.875, num_workers=0, batch_size=6)
    data.setup("predict")
    batch = next(iter(data.predict_dataloader()))
    with torch.no_grad():
        probs = model(batch.images).softmax(-1)
    for path, prob in zip(batch.paths, probs.max(-1).values.tolist()):
        assert float(rows[path]["prob1"]) == pytest.approx(prob, abs=2e-4)

    features = tmp_path / "features"
    extract(None, images, features, checkpoint=str(last), layers=[3], progress=False)
    with torch.no_grad():
        (last_stage,) = model.forward_intermediates(batch.images, indices=[3], intermediates_only=True, output_fmt="NLC")
    stored, inputs = read_features(features, "layer3")
    by_input = dict(zip([Path(p).name for p in inputs], stored))
    for path, expected in zip(batch.paths, last_stage.numpy()):
        np.testing.assert_allclose(by_input[Path(path).name], expected, rtol=1e-4, atol=1e-5)


RECIPES = {  # config: (model, optimizer, lr, warmup_epochs, min_lr, drop path, epochs, EMA, crop_pct)
    "vmamba_tiny_in1k": ("vmamba_tiny_s1l8", "adamw", 1e-3, 20, 1e-5, 0.2, 300, 0.9999, 0.875),
    "mambavision_tiny_in1k": ("mambavision_tiny", "lamb", 5e-3, 20, 5e-6, 0.2, 310, 0.9998, 1.0),
}


@pytest.mark.parametrize("config", sorted(RECIPES))
def test_from_scratch_configs_follow_upstream(config, capsys):
    """The recipes of upstream's configs (VMamba's config.py + vmambav2v_tiny_224.yaml, lr scaled to its global batch
    1024; MambaVision's mambavision_tiny_1k.yaml): optimizer, schedule, regularisation, clipping, AMP."""
    with pytest.raises(SystemExit):
        run_lightning(["fit", "--config", str(REPO / "configs" / f"{config}.yaml"), "--print_config"])
    parsed = yaml.safe_load(capsys.readouterr().out)
    model, trainer, data = parsed["model"]["init_args"], parsed["trainer"], parsed["data"]["init_args"]
    name, optimizer, lr, warmup, min_lr, drop_path, epochs, ema, crop_pct = RECIPES[config]
    assert (model["model"], model["optimizer"], model["lr"], model["warmup_epochs"], model["min_lr"]) == (
        name, optimizer, lr, warmup, min_lr,
    )  # fmt: skip
    assert (model["drop_path_rate"], trainer["max_epochs"], model["ema_decay"], data["crop_pct"]) == (
        drop_path, epochs, ema, crop_pct,
    )  # fmt: skip
    assert (model["weight_decay"], model["warmup_lr"], model["label_smoothing"]) == (0.05, 1e-6, 0.1)
    assert (model["mixup_alpha"], model["cutmix_alpha"], data["color_jitter"], data["re_prob"]) == (0.8, 1.0, 0.4, 0.25)
    assert (trainer["gradient_clip_val"], trainer["precision"], data["auto_augment"]) == (5.0, "16-mixed", "rand-m9-mstd0.5-inc1")
    assert data["batch_size"] == 128 and data["batch_size"] * trainer["devices"] * trainer["num_nodes"] == 1024


def test_an_unknown_optimizer_is_named(tmp_path):
    config = hierarchical_config(tmp_path, "test_mambavision", "lamb")
    with pytest.raises(ValueError, match=r"optimizer 'lambda' is not one of timm's: .*lamb"):
        run_lightning(["--config", config, "--model.init_args.optimizer=lambda"], run=False)
