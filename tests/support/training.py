"""A tiny labelled image tree, a callback that records each step, and a tiny vimkit config: what the training, run-folder
and command-line tests share."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml
from lightning.pytorch import Callback
from PIL import Image


def write_tree(root: Path, classes: int = 3, per_class: int = 6, size: int = 16) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 80, (size, size, 3)) + 60 * c  # class-dependent brightness
            Image.fromarray(pixels.astype(np.uint8)).save(root / f"class{c}" / f"{i}.png")
    return root


class Recorder(Callback):
    """Learning rate before each step and the model's weights after it."""

    def __init__(self) -> None:
        self.lrs, self.weights = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights.append({k: v.detach().clone() for k, v in pl_module.model.state_dict().items()})


class CrashAt(Callback):
    """Raises before the batch of optimizer step ``step``: a run killed there, its last checkpoint the step before."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError(f"simulated crash at step {self.step}")


def tiny_config(tmp_path: Path, logger: str = "vim.training.run_folder.RunCSVLogger", every_n_train_steps: int = 4) -> str:
    """A 2-block test_vim on 18 images: 4 batches of 4 per epoch, checkpoints every 4 steps, logs in runs/tiny."""
    images = write_tree(tmp_path / "images")
    trainer = dict(accelerator="cpu", devices=1, max_epochs=3, log_every_n_steps=1, enable_progress_bar=False)
    trainer.update(
        enable_model_summary=False,
        logger=[{"class_path": logger, "init_args": {"save_dir": "runs", "name": "tiny"}}],
        callbacks=[
            {
                "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {"save_last": True, "every_n_train_steps": every_n_train_steps},
            }
        ],
    )
    model = dict(model="test_vim", num_classes=3, img_size=16, model_kwargs={"patch_size": 4, "stride": 4, "depth": 2})
    model.update(ema_decay=0.9, warmup_epochs=0.5, lr=1e-2)
    data = dict(train_root=str(images), val_root=str(images), img_size=16, batch_size=4, num_workers=0, min_image_size=4)
    config = {
        "seed_everything": 0,
        "trainer": trainer,
        "model": {"class_path": "vim.training.image_classifier.ImageClassifier", "init_args": model},
        "data": {"class_path": "vim.data.images.ImageDataModule", "init_args": data},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)
