"""The training recipe: schedule, loss, optimizer groups, EMA, atomic checkpoints, exact resume and ddp."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.optim.lr_scheduler import LambdaLR

from vim.data.images import ImageDataModule
from vim.data.sampling import ResumableSampler
from vim.models.loading import create_model
from vim.training.checkpoint_io import AtomicCheckpointIO, atomic_torch_save
from vim.training.classifier import classification_loss
from vim.training.image_classifier import ImageClassifier
from vim.training.schedule import ScheduledLR, WarmupCosine, WarmupPoly

from support.training import CrashAt, Recorder, write_tree

TINY_VIT = dict(patch_size=4, embed_dim=16, depth=1, num_heads=2)


def tiny_classifier(**recipe) -> ImageClassifier:
    options = dict(model_kwargs=TINY_VIT, lr=1e-2, warmup_epochs=0.5, warmup_lr=1e-4, min_lr=1e-4)
    return ImageClassifier("vit_tiny_patch16_224", num_classes=3, img_size=16, **{**options, **recipe})


def tiny_data(root: Path, **kwargs) -> ImageDataModule:
    options = dict(train_root=str(root), img_size=16, batch_size=4, num_workers=0, min_image_size=4)
    return ImageDataModule(**{**options, **kwargs})


def tiny_trainer(tmp_path: Path, callbacks=(), **kwargs) -> Trainer:
    options = dict(
        accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    return Trainer(default_root_dir=tmp_path, callbacks=list(callbacks), plugins=[AtomicCheckpointIO()], **{**options, **kwargs})


def test_warmup_cosine_hand_values():
    schedule = WarmupCosine(lr=1.0, total_steps=110, warmup_steps=10, warmup_lr=0.1, min_lr=0.0)
    assert schedule.learning_rate(0) == pytest.approx(0.1)
    assert schedule.learning_rate(5) == pytest.approx(0.55)
    assert schedule.learning_rate(10) == pytest.approx(1.0)
    assert schedule.learning_rate(60) == pytest.approx(0.5)
    assert schedule.learning_rate(85) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.75)))
    assert schedule.learning_rate(110) == pytest.approx(0.0) and schedule.learning_rate(500) == pytest.approx(0.0)
    assert schedule(60) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="warmup_steps=20 must lie in"):
        WarmupCosine(lr=1.0, total_steps=10, warmup_steps=20)


def test_warmup_poly_hand_values():
    """mmseg's PolyLR of power 1 after a linear warmup: lr falls in a straight line from 1.0 at step 10 to min_lr."""
    schedule = WarmupPoly(lr=1.0, total_steps=110, warmup_steps=10, warmup_lr=0.1, min_lr=0.2)
    assert schedule.learning_rate(5) == pytest.approx(0.55)
    assert schedule.learning_rate(10) == pytest.approx(1.0)
    assert schedule.learning_rate(35) == pytest.approx(0.8)  # a quarter of the way: 1.0 - 0.25 * (1.0 - 0.2)
    assert schedule.learning_rate(110) == pytest.approx(0.2) and schedule.learning_rate(500) == pytest.approx(0.2)


@pytest.mark.parametrize("saved_by", [ScheduledLR, LambdaLR], ids=["ScheduledLR", "LambdaLR-before-the-fix"])
def test_a_loaded_schedule_keeps_the_saved_step_and_the_current_plan(saved_by):
    """8 steps of an 8-step plan (ending at min_lr 0) loaded into a 16-step plan: the rate is the 16-step cosine's at
    step 8 (warmup 2: progress 6/14), also from a checkpoint whose plain LambdaLR saved its plan; the same plan loaded
    continues exactly."""

    def stepped(scheduler_type, plan: WarmupCosine, steps: int) -> tuple[torch.optim.Optimizer, LambdaLR]:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
        scheduler = scheduler_type(optimizer, plan)
        next_rates(optimizer, scheduler, steps)
        return optimizer, scheduler

    def plan(total_steps: int) -> WarmupCosine:
        return WarmupCosine(lr=2.0, total_steps=total_steps, warmup_steps=2, warmup_lr=0.1, min_lr=0.0)

    saved_optimizer, saved = stepped(saved_by, plan(8), 8)
    assert saved_optimizer.param_groups[0]["lr"] == 0.0
    for total_steps, expected in ((16, 2.0 * (1 + math.cos(math.pi * 6 / 14)) / 2), (8, 0.0)):
        optimizer, resumed = stepped(ScheduledLR, plan(total_steps), 0)
        optimizer.load_state_dict(saved_optimizer.state_dict())
        resumed.load_state_dict(saved.state_dict())
        assert resumed.last_epoch == 8 and resumed.lr_lambdas[0].total_steps == total_steps
        assert optimizer.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12, abs=1e-15)
        assert resumed.get_last_lr() == [optimizer.param_groups[0]["lr"]] and "lr_lambdas" not in resumed.state_dict()
    assert next_rates(optimizer, resumed) == next_rates(saved_optimizer, saved)  # the last one loaded: the same plan


def next_rates(optimizer: torch.optim.Optimizer, scheduler: LambdaLR, steps: int = 3) -> list[float]:
    rates = []
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
        rates.append(optimizer.param_groups[0]["lr"])
    return rates


def test_loss_smooths_class_indices_and_takes_soft_targets():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    log_probs = logits.log_softmax(-1)
    targets = torch.tensor([0, 2])
    smoothed = torch.full((2, 3), 0.1 / 3) + 0.9 * F.one_hot(targets, 3)
    expected = -(smoothed * log_probs).sum(-1).mean()
    assert classification_loss(logits, targets, 0.1) == pytest.approx(expected.item())
    soft = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.5, 0.5]])
    assert classification_loss(logits, soft, 0.1) == pytest.approx((-(soft * log_probs).sum(-1).mean()).item())


def test_unknown_model_lists_close_names():
    with pytest.raises(
        ValueError, match=r"model 'vit_tiny_patch16_22' is not a registered timm model; close names: .*vit_tiny_patch16_224"
    ):
        create_model("vit_tiny_patch16_22")
    with pytest.raises(ValueError, match=r"img_size=\(8, 8\) is smaller than one patch \(patch_size=\(16, 16\)\)"):
        ImageClassifier("vit_tiny_patch16_224", num_classes=3, img_size=8, model_kwargs=dict(depth=1))


def test_the_class_count_comes_from_the_data_or_the_released_head():
    with pytest.raises(ValueError, match=r"model.num_classes is not set \(model.pretrained is off\).*labelled split"):
        ImageClassifier("test_vim", img_size=16)
    with pytest.raises(ValueError, match=r"model.pretrained and model.pretrained_file both choose the initial weights"):
        ImageClassifier("test_vim", num_classes=3, pretrained=True, pretrained_file="weights.pth")


def test_optimizer_groups_schedule_and_ema(tmp_path):
    seed_everything(0)
    module = tiny_classifier(ema_decay=0.6, weight_decay=0.05, mixup_alpha=0.8, cutmix_alpha=1.0, drop_path_rate=0.1)
    initial = {k: v.detach().clone() for k, v in module.model.state_dict().items()}
    recorder = Recorder()
    trainer = tiny_trainer(tmp_path, [recorder], enable_checkpointing=False)
    trainer.fit(module, tiny_data(write_tree(tmp_path / "train")))

    names = {id(p): n for n, p in module.model.named_parameters()}
    decay_of = {names[id(p)]: group["weight_decay"] for group in trainer.optimizers[0].param_groups for p in group["params"]}
    no_decay = {n for n, p in module.model.named_parameters() if p.ndim <= 1} | {"pos_embed", "cls_token"}
    assert decay_of == {n: (0.0 if n in no_decay else 0.05) for n, _ in module.model.named_parameters()}

    steps = 8  # 2 epochs of 18 images in batches of 4 (last partial batch dropped)
    schedule = WarmupCosine(1e-2, total_steps=steps, warmup_steps=2, warmup_lr=1e-4, min_lr=1e-4)
    assert recorder.lrs == pytest.approx([schedule.learning_rate(s) for s in range(steps)])

    ema = initial
    for weights in recorder.weights:
        ema = {k: 0.6 * ema[k] + 0.4 * weights[k] for k in ema}
    for key, value in module.ema.module.state_dict().items():
        torch.testing.assert_close(value, ema[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("limits", "total", "warmup", "batches_per_step"),
    [
        (dict(max_steps=3, max_epochs=10), 3, 2, 1),
        (dict(max_steps=3, max_epochs=-1), 3, 2, 1),
        (dict(max_epochs=2, accumulate_grad_batches=2), 4, 1, 2),
    ],
    ids=["max_steps-inside-the-first-epoch", "max_steps-only", "accumulate-2"],
)
def test_schedule_lengths_are_the_steps_the_trainer_takes(tmp_path, limits, total, warmup, batches_per_step):
    """4 batches per epoch: max_steps=3 ends the cosine at step 3 (warmup 0.5 epoch = 2 steps), with or without a bound
    on epochs (without one, Lightning does not load the data to estimate the steps); accumulating 2 batches gives 2
    steps per epoch, 4 in all (warmup 1 step), each step's rate seen by both of its batches."""
    seed_everything(0)
    recorder = Recorder()
    trainer = tiny_trainer(tmp_path, [recorder], enable_checkpointing=False, **limits)
    trainer.fit(tiny_classifier(), tiny_data(write_tree(tmp_path / "train")))
    schedule = WarmupCosine(1e-2, total_steps=total, warmup_steps=warmup, warmup_lr=1e-4, min_lr=1e-4)
    expected = [schedule.learning_rate(step) for step in range(total) for _ in range(batches_per_step)]
    assert recorder.lrs == pytest.approx(expected)


def test_layer_decay_scales_each_layers_learning_rate(tmp_path):
    """Vim with 4 blocks and layer_decay 0.5: stem at lr * 0.5^5, block i (and norm_f with the last) at lr * 0.5^(4 - i),
    the head at lr; one schedule scales them all."""
    seed_everything(0)
    module = ImageClassifier("test_vim", num_classes=3, img_size=16, lr=1e-2, warmup_epochs=0.5, min_lr=1e-4, layer_decay=0.5)
    trainer = tiny_trainer(tmp_path, enable_checkpointing=False, max_epochs=1)
    trainer.fit(module, tiny_data(write_tree(tmp_path / "train")))

    def expected_scale(name: str) -> float:
        if name.startswith(("cls_token", "pos_embed", "patch_embed")):
            return 0.5**5
        if name.startswith("layers."):
            return 0.5 ** (4 - int(name.split(".")[1]))
        if name.startswith("norm_f"):  # grouped with the last block, as timm groups ViT's final norm
            return 0.5
        assert name.startswith("head"), name
        return 1.0

    names = {id(p): n for n, p in module.model.named_parameters()}
    groups = trainer.optimizers[0].param_groups
    for group in groups:
        for p in group["params"]:
            assert group["initial_lr"] == pytest.approx(1e-2 * expected_scale(names[id(p)])), names[id(p)]
    factors = [group["lr"] / group["initial_lr"] for group in groups]
    assert factors == pytest.approx([factors[0]] * len(groups)) and factors[0] < 1, "one schedule for every layer"
    assert sorted({round(group["initial_lr"] / 1e-2, 6) for group in groups}) == sorted(round(0.5**k, 6) for k in range(6))
    with pytest.raises(ValueError, match="layer_decay must lie in"):
        ImageClassifier("test_vim", num_classes=3, layer_decay=1.5)


def test_missing_or_empty_weights_files_are_named(tmp_path):
    """A zero-byte .pth (or .ckpt) as weights: a message naming the setting and the file, not torch.load's EOFError."""
    from vim.deploy import export_safetensors
    from vim.extraction import extract

    empty = tmp_path / "weights.pth"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=rf"model.pretrained_file: '{empty}' is empty \(0 bytes\)"):
        tiny_classifier(pretrained_file=str(empty))
    with pytest.raises(ValueError, match=rf"model.pretrained_file: '{tmp_path / 'nowhere.pth'}' does not exist"):
        tiny_classifier(pretrained_file=str(tmp_path / "nowhere.pth"))
    image = write_tree(tmp_path / "images", classes=1, per_class=1)
    for suffix in (".pth", ".ckpt"):
        (tmp_path / f"empty{suffix}").write_bytes(b"")
        with pytest.raises(ValueError, match=rf"checkpoint: '{tmp_path / f'empty{suffix}'}' is empty \(0 bytes\)"):
            extract("test_vim", image, tmp_path / "features", checkpoint=str(tmp_path / f"empty{suffix}"), progress=False)
    with pytest.raises(ValueError, match=r"--ckpt: '.*empty.ckpt' is empty \(0 bytes\)"):
        export_safetensors(tmp_path / "empty.ckpt", tmp_path / "out.safetensors")


def test_atomic_save_keeps_the_previous_file_when_saving_fails(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"step": 1}, path)

    def crash_half_way(obj, file):
        file.write(b"partial checkpoint bytes")
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", crash_half_way)
    with pytest.raises(RuntimeError, match="disk full"):
        AtomicCheckpointIO().save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temporary file left behind


def resume_run(tmp_path: Path, train_root: Path, callbacks=(), ckpt_path=None) -> ImageClassifier:
    seed_everything(0)
    module = tiny_classifier(ema_decay=0.9, mixup_alpha=0.8, cutmix_alpha=1.0, drop_path_rate=0.1)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True, every_n_train_steps=1)
    trainer = tiny_trainer(tmp_path, [checkpoints, *callbacks])
    trainer.fit(module, tiny_data(train_root, val_root=str(train_root)), ckpt_path=ckpt_path)
    assert trainer.global_step == 8
    return module


def assert_same_weights(reference: ImageClassifier, resumed: ImageClassifier, exact: bool = False) -> None:
    tolerance = dict(rtol=0, atol=0) if exact else dict(rtol=1e-5, atol=1e-6)
    for name, module in (("model", "model"), ("EMA", "ema")):
        expected, actual = getattr(reference, module).state_dict(), getattr(resumed, module).state_dict()
        for key in expected:
            torch.testing.assert_close(actual[key], expected[key], **tolerance, msg=f"{name} {key}")


def test_interrupted_and_resumed_run_matches_uninterrupted(tmp_path):
    train_root = write_tree(tmp_path / "train")
    reference = resume_run(tmp_path / "full", train_root)
    with pytest.raises(RuntimeError, match="simulated crash at step 5"):
        resume_run(tmp_path / "split", train_root, [CrashAt(5)])
    assert torch.load(tmp_path / "split" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 5
    resumed = resume_run(tmp_path / "split", train_root, ckpt_path="last")
    assert_same_weights(reference, resumed)


def unreadable_batch(train_root: Path, batch: int, batch_size: int) -> list[str]:
    """Overwrite with garbage every image of the ``batch``-th training batch of epoch 0 (seed 0); returns their paths."""
    data = tiny_data(train_root, batch_size=batch_size)
    data.setup("fit")
    sampler = ResumableSampler(data.datasets["train"], seed=0, drop_last=True)
    keys = list(sampler)[batch * batch_size : (batch + 1) * batch_size]
    paths = [data.datasets["train"].samples[key.index][0] for key in keys]
    for path in paths:
        Path(path).write_bytes(b"not an image")
    return paths


def accumulating_run(run_dir: Path, train_root: Path, callbacks=(), ckpt_path=None) -> ImageClassifier:
    """2 epochs of 10 batches of 2 images, 4 batches accumulated per step: steps after batches 4, 8, 10 of each epoch."""
    seed_everything(0)
    module = tiny_classifier(ema_decay=0.9)
    checkpoints = ModelCheckpoint(dirpath=run_dir / "checkpoints", save_last=True, every_n_train_steps=1)
    trainer = tiny_trainer(run_dir, [checkpoints, *callbacks], accumulate_grad_batches=4)
    trainer.fit(module, tiny_data(train_root, batch_size=2), ckpt_path=ckpt_path)
    assert trainer.global_step == 6
    return module


@pytest.mark.parametrize("with_unreadable_batch", [False, True], ids=["accumulate", "accumulate-with-unreadable-batch"])
def test_resume_under_gradient_accumulation_starts_at_the_next_batch(tmp_path, with_unreadable_batch):
    """Killed after step 4 (batch 14 of 20: the 4th of epoch 1), resumed: bit-exact with the uninterrupted run.

    The resume position counts batches taken, not steps x 4 (= 16, two batches too far: the epoch's last step
    took 2 batches). An all-unreadable batch (the 2nd) is taken like any other and counts too.
    """
    train_root = write_tree(tmp_path / "train", per_class=7)  # 21 images: 10 batches of 2
    if with_unreadable_batch:
        unreadable_batch(train_root, batch=1, batch_size=2)
    reference = accumulating_run(tmp_path / "full", train_root)
    with pytest.raises(RuntimeError, match="simulated crash at step 4"):
        accumulating_run(tmp_path / "split", train_root, [CrashAt(4)])
    assert torch.load(tmp_path / "split" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    resumed = accumulating_run(tmp_path / "split", train_root, ckpt_path="last")
    assert_same_weights(reference, resumed, exact=True)


DDP_SCRIPT = """
import sys
import torch
from lightning.pytorch import Callback
from vim.cli import main

class SaveWeights(Callback):
    def on_train_end(self, trainer, pl_module):
        torch.save(pl_module.model.state_dict(), f"{OUT}/rank{trainer.global_rank}.pt")

main(sys.argv[1:] + ["--trainer.callbacks+=__main__.SaveWeights"])
"""


def test_ddp_two_cpu_processes_end_with_equal_weights(tmp_path):
    train_root = write_tree(tmp_path / "train", per_class=8)
    script = tmp_path / "train_ddp.py"
    script.write_text(f"OUT = {str(tmp_path)!r}\n" + textwrap.dedent(DDP_SCRIPT))
    model = dict(model="vit_tiny_patch16_224", num_classes=3, img_size=16, model_kwargs=TINY_VIT, ema_decay=0.9, mixup_alpha=0.8)
    data = dict(train_root=str(train_root), img_size=16, batch_size=4, num_workers=0, min_image_size=4)
    trainer = dict(strategy="ddp", devices=2, accelerator="cpu", max_steps=3, logger=False, enable_progress_bar=False)
    config = {
        "trainer": {**trainer, "enable_checkpointing": False},
        "model": {"class_path": "vim.training.image_classifier.ImageClassifier", "init_args": model},
        "data": {"class_path": "vim.data.images.ImageDataModule", "init_args": data},
    }
    (tmp_path / "ddp.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(script), "fit", "--config", str(tmp_path / "ddp.yaml")]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-6000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    initial = create_model("vit_tiny_patch16_224", num_classes=3, img_size=16, **TINY_VIT).state_dict()
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        torch.testing.assert_close(rank0[key], rank1[key], rtol=0, atol=0)
    assert any(not torch.equal(rank0[k], initial[k]) for k in rank0 if "weight" in k)  # it trained
