"""What a ``vimkit fit`` leaves behind: its final state, a folder per run, ``latest``, and resuming into the same folder."""

from __future__ import annotations

import csv
import math
import re
import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

from vim.cli import run_lightning
from vim.training.run_folder import point_latest, resolve_checkpoint

from support.training import Recorder, tiny_config


def printed(pattern: str, out: str) -> str:
    match = re.search(pattern, out)
    assert match is not None, f"{pattern!r} not in:\n{out}"
    return match.group(1)


def test_fit_ends_with_its_final_state_and_reports_the_accuracy_export_uses(tmp_path, monkeypatch, capsys):
    """6 steps, checkpoints every 4, validation at the end of epoch 0 (step 4): last.ckpt holds step 6, and the printed
    accuracy is that of step 6's EMA weights, which validating last.ckpt reproduces."""
    monkeypatch.chdir(tmp_path)
    config = tiny_config(tmp_path, logger="lightning.pytorch.loggers.CSVLogger")
    fit = run_lightning(["fit", "--config", config, "--trainer.max_steps=6"])
    out = capsys.readouterr().out
    last = tmp_path / "runs/tiny/version_0/checkpoints/last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert state["global_step"] == 6 and state["ImageDataModule"] == {"train_batches_seen": 6}
    final = fit.model.state_dict()
    assert state["state_dict"].keys() == final.keys() and any(key.startswith("ema.") for key in final)
    for key, value in final.items():
        torch.testing.assert_close(state["state_dict"][key], value, rtol=0, atol=0, msg=key)
    optimizer = fit.trainer.optimizers[0].state_dict()["state"]
    for index, moments in optimizer.items():
        torch.testing.assert_close(state["optimizer_states"][0]["state"][index]["exp_avg"], moments["exp_avg"], rtol=0, atol=0)

    reported = printed(
        r"Final validation accuracy of the EMA weights \(what vimkit export and vimkit predict use\): top-1 ([\d.]+)%", out
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        validate = run_lightning(["validate", "--config", config, "--ckpt_path=runs/tiny/latest/checkpoints/last.ckpt"])
    assert f"{100 * float(validate.trainer.callback_metrics['val_ema/acc1']):.1f}" == reported
    assert (tmp_path / "runs/tiny/version_0/validate_0/metrics.csv").is_file()  # inside the run it evaluated
    assert not [str(w.message) for w in caught if "dirpath" in str(w.message)]


def metric_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


def test_each_fit_has_its_own_folder_and_a_resumed_run_continues_in_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = tiny_config(tmp_path, every_n_train_steps=2)
    runs = tmp_path / "runs/tiny"

    run_lightning(["fit", "--config", config, "--trainer.max_steps=3"])
    run_lightning(["fit", "--config", config, "--trainer.max_steps=2"])
    out = capsys.readouterr().out
    assert sorted(p.name for p in runs.iterdir()) == ["latest", "version_0", "version_1"]
    assert (runs / "latest").resolve() == (runs / "version_1").resolve()
    assert printed(r"Run folder: (\S+)", out.split("Finished")[-1]) == "runs/tiny/version_1"
    checkpoint = printed(r"Final checkpoint: (\S+)", out.split("Finished")[-1])
    assert checkpoint == "runs/tiny/version_1/checkpoints/last.ckpt"
    for version, steps in (("version_0", 3), ("version_1", 2)):
        assert sorted(p.name for p in (runs / version).iterdir()) == ["checkpoints", "config.yaml", "hparams.yaml", "metrics.csv"]
        assert torch.load(runs / version / "checkpoints/last.ckpt", weights_only=True)["global_step"] == steps
    assert not list(runs.glob("**/*-v1.ckpt"))

    # --ckpt_path last on the finished latest run: nothing trained, nothing written, no new folder
    finished = {p: p.read_bytes() for p in (runs / "version_1").rglob("*") if p.is_file() and p.name != "config.yaml"}
    run_lightning(["fit", "--config", config, "--trainer.max_steps=2", "--ckpt_path=last"])
    assert "Nothing left to do: " in capsys.readouterr().out
    assert {p: p.read_bytes() for p in finished} == finished
    assert sorted(p.name for p in runs.iterdir()) == ["latest", "version_0", "version_1"]

    # killed at step 5 (last checkpoint: step 4), resumed with --ckpt_path last: the same folder, one history
    with pytest.raises(RuntimeError, match="simulated crash at step 5"):
        run_lightning(
            [
                "fit",
                "--config",
                config,
                "--trainer.max_steps=7",
                "--ckpt_path=last",
                "--trainer.callbacks+=test_training.CrashAt",
                "--trainer.callbacks.step=5",
            ]
        )
    assert torch.load(runs / "version_1/checkpoints/last.ckpt", weights_only=True)["global_step"] == 4
    before = metric_rows(runs / "version_1/metrics.csv")
    assert max(int(row["step"]) for row in before if row["train/loss"]) == 4  # the batch of step 5: after the checkpoint
    run_lightning(["fit", "--config", config, "--trainer.max_steps=7", "--ckpt_path=last"])
    assert sorted(p.name for p in runs.iterdir()) == ["latest", "version_0", "version_1"]
    assert torch.load(runs / "version_1/checkpoints/last.ckpt", weights_only=True)["global_step"] == 7
    rows = metric_rows(runs / "version_1/metrics.csv")
    kept = [row for row in before if int(row["step"]) < 4]  # a training row at step s is the batch of step s + 1
    assert rows[: len(kept)] == kept
    train_steps = [int(row["step"]) for row in rows if row["train/loss"]]
    assert train_steps == list(range(7)), train_steps  # runs of 2, then 2 + 1 (killed) + 2 steps: one row per batch


def test_a_finished_run_extended_to_more_epochs_follows_the_cosine_of_the_new_length(tmp_path, monkeypatch):
    """2 epochs of 4 steps, then ``--ckpt_path last --trainer.max_epochs 4`` (what "Nothing left to do" invites): the
    added steps 8..15 take the rates of a cosine planned over 16 steps, not those of the finished 8-step plan (whose
    rate after step 8 is min_lr)."""
    monkeypatch.chdir(tmp_path)
    config = tiny_config(tmp_path)
    settings = ["--config", config, "--model.min_lr=0", "--trainer.callbacks+=test_training.Recorder"]
    first = run_lightning(["fit", *settings, "--trainer.max_epochs=2"])
    extended = run_lightning(["fit", *settings, "--trainer.max_epochs=4", "--ckpt_path=last"])
    assert extended.trainer.global_step == 16

    def rate(step: int, total_steps: int, lr=1e-2, warmup_steps=2, warmup_lr=1e-6, min_lr=0.0) -> float:
        """The recipe's rate at ``step``: linear warmup, then a half cosine from lr to min_lr at total_steps."""
        if step < warmup_steps:
            return warmup_lr + (lr - warmup_lr) * step / warmup_steps
        return min_lr + (lr - min_lr) * (1 + math.cos(math.pi * (step - warmup_steps) / (total_steps - warmup_steps))) / 2

    def rates(cli) -> list[float]:
        (recorder,) = [callback for callback in cli.trainer.callbacks if isinstance(callback, Recorder)]
        return recorder.lrs

    assert rates(first) == pytest.approx([rate(step, 8) for step in range(8)], rel=1e-9, abs=1e-15)
    assert rates(extended) == pytest.approx([rate(step, 16) for step in range(8, 16)], rel=1e-9, abs=1e-15)


class LatestLink(Callback):
    """Records where ``runs/tiny/latest`` points (None: no link) before each training batch, by step."""

    def __init__(self) -> None:
        self.seen: dict[int, str | None] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        link = Path("runs/tiny/latest")
        self.seen[trainer.global_step] = str(link.readlink()) if link.is_symlink() else None


def test_a_fit_stopped_before_its_first_checkpoint_leaves_latest_on_the_run_to_resume(tmp_path, monkeypatch, capsys):
    """latest appears with the first run's first checkpoint (step 2). A crash at step 1 and a --ckpt_path that does not
    exist both set up a run folder and end without a checkpoint; latest stays on version_0, and --ckpt_path last
    continues it in its folder."""
    monkeypatch.chdir(tmp_path)
    config = tiny_config(tmp_path, every_n_train_steps=2)
    runs = tmp_path / "runs/tiny"
    first = run_lightning(["fit", "--config", config, "--trainer.max_steps=4", "--trainer.callbacks+=test_run_folder.LatestLink"])
    seen = next(callback for callback in first.trainer.callbacks if isinstance(callback, LatestLink)).seen
    assert (seen[0], seen[1], seen[3]) == (None, None, "version_0")  # step 2's checkpoint: seen at step 2 or 3
    crash = ["--trainer.callbacks+=test_training.CrashAt", "--trainer.callbacks.step=1"]
    with pytest.raises(RuntimeError, match="simulated crash at step 1"):
        run_lightning(["fit", "--config", config, "--trainer.max_steps=4", *crash])
    with pytest.raises(FileNotFoundError, match=r"missing\.ckpt"):
        run_lightning(["fit", "--config", config, "--trainer.max_steps=4", "--ckpt_path=runs/tiny/missing.ckpt"])
    assert sorted(p.name for p in runs.iterdir()) == ["latest", "version_0", "version_1", "version_2"]
    assert not (runs / "version_1/checkpoints").exists() and not (runs / "version_2/checkpoints").exists()
    assert (runs / "latest").resolve() == (runs / "version_0").resolve()
    capsys.readouterr()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_lightning(["fit", "--config", config, "--trainer.max_steps=6", "--ckpt_path=last"])
    assert not [str(w.message) for w in caught if "starting a new run" in str(w.message)]
    assert printed(r"Run folder: (\S+)", capsys.readouterr().out) == "runs/tiny/version_0"
    assert sorted(p.name for p in runs.iterdir()) == ["latest", "version_0", "version_1", "version_2"]
    assert torch.load(runs / "version_0/checkpoints/last.ckpt", weights_only=True)["global_step"] == 6
    train_steps = [int(row["step"]) for row in metric_rows(runs / "version_0/metrics.csv") if row["train/loss"]]
    assert train_steps == list(range(6)), train_steps  # 4 steps, then the 2 resumed from its checkpoint
    assert (runs / "latest").resolve() == (runs / "version_0").resolve()


def test_ckpt_path_last_is_the_newest_run_with_a_last_checkpoint_whatever_the_link_says(tmp_path):
    """A process killed between its first checkpoint and moving the link leaves latest one run behind; a folder without
    a checkpoint (version_3) or not named version_N is no candidate; the next fit's setup repairs the link."""
    runs = tmp_path / "runs/tiny"
    for folder in ("version_0", "version_2", "version_10", "version_x"):
        (runs / folder / "checkpoints").mkdir(parents=True)
        (runs / folder / "checkpoints/last.ckpt").write_bytes(b"")
    (runs / "version_3").mkdir()
    (runs / "latest").symlink_to("version_0", target_is_directory=True)
    assert resolve_checkpoint(runs, "last") == runs / "version_10/checkpoints/last.ckpt"
    point_latest(runs)
    assert (runs / "latest").readlink() == Path("version_10")
    assert resolve_checkpoint(tmp_path / "runs/empty", "last") is None
