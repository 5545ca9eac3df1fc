"""The ``vimkit`` command: configs, dispatch, the shortened quickstart with predict and export, and the plot tool."""

from __future__ import annotations

import csv
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import timm
import torch
import yaml
from PIL import Image

from vim.cli import main, run_lightning
from vim.data.images import ImageDataModule
from vim.training.checkpoint_io import AtomicCheckpointIO

from support.paths import REPO
from support.training import tiny_config

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))

# name: (model, epochs, global batch, batch per device, lr, weight decay, drop path, pretrained file needed), as
# hustvl/Vim's vim/scripts/{pt,ft}-vim-{t,s}.sh run main.py (lr scaled by global batch / 512); Vim-B has no script
PUBLISHED = {
    "vim_tiny_in1k": ("vim_tiny_patch16_224", 300, 1024, 128, 1e-3, 0.1, 0.0, False),
    "vim_small_in1k": ("vim_small_patch16_224", 300, 512, 64, 1e-3, 0.05, 0.05, False),
    "vim_base_in1k": ("vim_base_patch16_224", 300, 1024, 128, 1e-3, 0.05, 0.1, False),
    "vim_tiny_stride8_ft": ("vim_tiny_patch16_stride8_224", 30, 1024, 128, 1e-5, 1e-8, 0.0, True),
    "vim_small_stride8_ft": ("vim_small_patch16_stride8_224", 30, 1024, 128, 1e-5, 1e-8, 0.0, True),
}


def printed_config(config: Path, capsys) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        run_lightning(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_config_parses(config, capsys):
    parsed = printed_config(config, capsys)
    assert set(parsed) >= {"trainer", "model", "data"}
    model = parsed["model"]["init_args"]
    assert timm.is_model(model["model"]), model["model"]
    if config.stem not in PUBLISHED:
        return
    name, epochs, global_batch, batch, lr, weight_decay, drop_path, pretrained = PUBLISHED[config.stem]
    trainer, data = parsed["trainer"], parsed["data"]["init_args"]
    assert (model["model"], trainer["max_epochs"], model["lr"], model["weight_decay"], model["drop_path_rate"]) == (
        name,
        epochs,
        lr,
        weight_decay,
        drop_path,
    )
    assert data["batch_size"] * trainer["devices"] * trainer["num_nodes"] == global_batch and data["batch_size"] == batch
    assert (model["pretrained_file"] is not None) == pretrained
    assert (model["warmup_epochs"], model["label_smoothing"], model["mixup_alpha"], model["cutmix_alpha"]) == (5, 0.1, 0.8, 1.0)
    assert (model["ema_decay"], trainer["precision"]) == (0.99996, "32-true")  # --no_amp
    assert (model["min_lr"], model["warmup_lr"]) == ((1e-5, 1e-5) if pretrained else (1e-5, 1e-6))
    assert (data["auto_augment"], data["color_jitter"], data["re_prob"], data["interpolation"], data["crop_pct"]) == (
        "rand-m9-mstd0.5-inc1",
        0.3,
        0.25,
        "bicubic",
        0.875,
    )


def test_extract_is_forwarded_lazily(monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "vim.extraction", types.SimpleNamespace(main=calls.append))
    main(["extract", "--config", "x.yaml", "--out", "features"])
    assert calls == [["--config", "x.yaml", "--out", "features"]]


def test_config_with_unknown_model_lists_close_names(tmp_path, monkeypatch):
    monkeypatch.setenv("VIM_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match="model 'test_vimm' is not a registered timm model; close names: test_vim"):
        run_lightning(["--config", str(REPO / "configs/quickstart.yaml"), "--model.init_args.model=test_vimm"], run=False)


@pytest.mark.parametrize("config", ["quickstart", "video_quickstart", "points_quickstart", "detection_quickstart"])
def test_zero_batch_size_is_refused_by_name(config, tmp_path, monkeypatch):
    monkeypatch.setenv("VIM_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match=r"data.batch_size must be at least 1"):
        run_lightning(["fit", "--config", str(REPO / f"configs/{config}.yaml"), "--data.batch_size=0"])


def test_cli_trainer_saves_checkpoints_atomically(tmp_path, monkeypatch):
    monkeypatch.setenv("VIM_CACHE", str(tmp_path))
    cli = run_lightning(["--config", str(REPO / "configs/quickstart.yaml")], run=False)
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def test_quickstart_shortened_then_predict_and_export(tmp_path, monkeypatch, capsys):
    """The quickstart config (real model, data path and CLI), shortened; then predict to CSV and export for timm."""
    monkeypatch.setenv("VIM_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    config = str(REPO / "configs/quickstart.yaml")
    fit = run_lightning(["fit", "--config", config, "--trainer.max_epochs=1", "--trainer.enable_progress_bar=false"])
    accuracy = max(float(fit.trainer.callback_metrics[k]) for k in ("val/acc1", "val_ema/acc1"))
    assert accuracy > 0.3, f"val accuracy {accuracy:.3f} after the shortened quickstart (chance is 0.1)"
    assert (
        "Final validation accuracy of the EMA weights (what vimkit export and vimkit predict use): top-1"
        in capsys.readouterr().out
    )
    last = tmp_path / "runs/quickstart/latest/checkpoints/last.ckpt"
    assert last.is_file() and (tmp_path / "runs/quickstart/latest/metrics.csv").is_file()

    images = tmp_path / "to_classify"
    images.mkdir()
    val = sorted((tmp_path / "cache/digits/val").glob("*/*.png"))[::60]
    for path in val:
        (images / f"digit{path.parent.name}_{path.name}").write_bytes(path.read_bytes())
    predictions = tmp_path / "predictions.csv"
    main(
        [
            "predict",
            "--config",
            config,
            f"--ckpt_path={last}",
            f"--data.init_args.predict_root={images}",
            f"--predict_writer.output={predictions}",
            "--trainer.enable_progress_bar=false",
        ]
    )
    with predictions.open(newline="") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == len(val) and list(rows[0])[:3] == ["path", "class1", "prob1"] and "class5" in rows[0]

    weights = tmp_path / "digits_vim.safetensors"
    main(["export", "--ckpt", str(last), "--out", str(weights)])
    model_args = dict(img_size=16, patch_size=4, stride=4, num_classes=10)
    model = timm.create_model(
        "test_vim", pretrained=True, pretrained_cfg_overlay=dict(file=str(weights), num_classes=10), **model_args
    ).eval()
    data = ImageDataModule(predict_root=str(images), img_size=16, crop_pct=1.0, num_workers=0, batch_size=len(val))
    data.setup("predict")
    batch = next(iter(data.predict_dataloader()))
    with torch.no_grad():
        probs = model(batch.images).softmax(-1)
    top = probs.topk(5, dim=-1)
    by_path = {row["path"]: row for row in rows}
    for path, classes, values in zip(batch.paths, top.indices.tolist(), top.values.tolist()):
        row = by_path[path]
        assert [row[f"class{k}"] for k in range(1, 6)] == [str(c) for c in classes]  # class names of the digits
        assert [float(row[f"prob{k}"]) for k in range(1, 6)] == pytest.approx(values, abs=2e-4)
    correct = sum(by_path[p]["class1"] == Path(p).name[5] for p in batch.paths)
    assert correct / len(val) > 0.3


def test_predict_lists_every_input_with_the_reason_for_the_unreadable_ones(tmp_path, monkeypatch, capsys):
    """5 inputs in batches of 2: the first batch entirely unreadable (it used to stop predict, no CSV), a truncated file in
    the second (it used to be missing from the CSV)."""
    monkeypatch.chdir(tmp_path)
    config = tiny_config(tmp_path)
    good = sorted((tmp_path / "images").glob("*/*.png"))
    inputs = tmp_path / "to_classify"
    inputs.mkdir()
    contents = {"a.png": b"not a png", "b.png": b"", "c.png": good[0].read_bytes(), "d.png": good[1].read_bytes()[:40]}
    contents["e.png"] = good[2].read_bytes()
    for name, content in contents.items():
        (inputs / name).write_bytes(content)
    run_lightning(["predict", "--config", config, f"--data.predict_root={inputs}", "--data.batch_size=2"])
    out = capsys.readouterr().out
    assert "Predictions for 2 files and 3 unreadable files (the reason in the 'error' column): " in out
    path = out.split("'error' column): ")[1].split()[0]
    assert path == "runs/tiny/predict_0/predictions.csv"  # the command's own run folder
    with Path(path).open(newline="") as file:
        rows = {Path(row["path"]).name: row for row in csv.DictReader(file)}
    assert sorted(rows) == sorted(contents)
    for name in ("a.png", "b.png", "d.png"):
        assert rows[name]["class1"] == "" and rows[name]["error"], rows[name]
    assert "cannot identify image file" in rows["a.png"]["error"]
    for name in ("c.png", "e.png"):
        assert rows[name]["error"] == "" and rows[name]["class1"] in ("0", "1", "2") and float(rows[name]["prob1"]) > 0


def test_predict_from_a_checkpoint_needs_no_labelled_data(tmp_path, monkeypatch, capsys):
    """Deployment: predict with the checkpoint and a folder of inputs, from elsewhere, the training folders deleted. The
    class count and names come from the checkpoint; the rows equal those of a predict run that had the training data."""
    monkeypatch.chdir(tmp_path)
    config = tiny_config(tmp_path)
    run_lightning(["fit", "--config", config, "--trainer.max_steps=2"])
    checkpoint = tmp_path / "deployed.ckpt"
    checkpoint.write_bytes((tmp_path / "runs/tiny/version_0/checkpoints/last.ckpt").read_bytes())
    inputs = tmp_path / "to_classify"
    inputs.mkdir()
    for path in sorted((tmp_path / "images").glob("*/*.png"))[::4]:
        (inputs / f"{path.parent.name}_{path.name}").write_bytes(path.read_bytes())

    def predict(*settings: str) -> list[dict[str, str]]:
        output = Path.cwd() / "predictions.csv"
        args = ["--config", config, f"--ckpt_path={checkpoint}", f"--data.predict_root={inputs}"]
        run_lightning(["predict", *args, *settings, f"--predict_writer.output={output}"])
        with output.open(newline="") as file:
            return list(csv.DictReader(file))

    with_training_data = predict()
    shutil.rmtree(tmp_path / "images")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    deployed = predict("--data.train_root=null", "--data.val_root=null")
    assert len(deployed) == len(list(inputs.iterdir())) == 5
    assert {row[f"class{k}"] for row in deployed for k in (1, 2, 3)} == {"class0", "class1", "class2"}
    assert deployed == with_training_data


def load_plot_metrics() -> types.ModuleType:
    """tools/plot_metrics.py as a module (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location("plot_metrics", REPO / "tools/plot_metrics.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plot_metrics_writes_a_png(tmp_path):
    metrics = tmp_path / "metrics.csv"
    metrics.write_text("epoch,step,train/loss,val/acc1,val/loss\n0,4,2.3,,\n0,9,,0.4,1.9\n1,14,1.2,,\n1,19,,0.8,0.9\n")
    out = subprocess.run([sys.executable, str(REPO / "tools/plot_metrics.py"), str(metrics)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    png = tmp_path / "metrics.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    (tmp_path / "bad.csv").write_text("epoch,step,lr\n0,1,0.1\n")
    bad = subprocess.run(
        [sys.executable, str(REPO / "tools/plot_metrics.py"), str(tmp_path / "bad.csv")], capture_output=True, text=True
    )
    assert bad.returncode != 0 and "no '*loss' or score (acc1, acc5, mIoU" in bad.stderr


def test_plot_metrics_draws_segmentation_and_detection_scores(tmp_path):
    """mIoU and box mAP columns join the scores panel (in percent); a segmentation run's per-class IoU stays out."""
    plot_metrics = load_plot_metrics()
    metrics = tmp_path / "metrics.csv"
    metrics.write_text("epoch,step,train/loss,val/mIoU,val/IoU/circle,val/map\n0,4,2.3,,,\n0,9,,0.5,0.4,0.25\n")
    figure = plot_metrics.draw(plot_metrics.read_series(metrics))
    (panel,) = [axes for axes in figure.axes if axes.get_title() == "validation scores"]
    assert sorted(line.get_label() for line in panel.lines) == ["val/mIoU", "val/map"]
    assert [line.get_ydata().tolist() for line in sorted(panel.lines, key=lambda line: line.get_label())] == [[50.0], [25.0]]


COMMANDS = ("fit", "validate", "test", "predict", "export", "extract")
CONSOLE_SCRIPT = Path(sys.executable).parent / "vimkit"  # pip puts it beside the environment's python


def assert_lists_every_command(help_text: str) -> None:
    lines = help_text.splitlines()
    assert lines[0].startswith("usage: vimkit "), lines[0]
    for command in COMMANDS:
        (line,) = [line for line in lines if line.split()[:1] == [command]]
        assert len(line.split()) > 3, line  # the command, then a sentence


def test_top_level_help_lists_every_command_with_what_it_does(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # argparse wraps to the terminal: one line per command here
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert_lists_every_command(help_text)
    (export,) = [line for line in help_text.splitlines() if line.split()[:1] == ["export"]]
    assert all(format in export for format in ("ONNX", "torch.export", "AOTInductor", ".safetensors")), export


@pytest.mark.parametrize("launcher", ["console script", "python -m vim"])
def test_the_installed_command_lists_every_command(launcher, tmp_path):
    """``vimkit --help`` (the console script pip installed) and ``python -m vim --help`` print the same list."""
    if launcher == "console script":
        assert CONSOLE_SCRIPT.is_file(), f"{CONSOLE_SCRIPT} is missing: reinstall the package (pip install -e .)"
        command = [str(CONSOLE_SCRIPT)]
    else:
        command = [sys.executable, "-m", "vim"]
    done = subprocess.run([*command, "--help"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert_lists_every_command(done.stdout)


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_names_itself_vimkit_in_its_usage(command, capsys, monkeypatch):
    """Whatever started the process (here pytest), a command's help shows how to type it: ``vimkit <command>``."""
    monkeypatch.setattr(sys, "argv", ["something_else.py", command, "--help"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 0
    usage = capsys.readouterr().out.splitlines()[0].split()
    assert usage[0] == "usage:" and usage[1] == "vimkit" and command in usage[2:4], usage


def run_command(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m vim <args>`` (what ``vimkit <args>`` runs) in a fresh process (nothing imported beforehand), as a
    user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "vim", *args], cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True
    )


def test_help_of_a_class_takes_its_short_name(tmp_path):
    """``--model.help ImageClassifier`` and ``--data.help DigitsDataModule``, as ``--model ImageClassifier`` works."""
    for option, name, expected in (
        ("--model.help", "ImageClassifier", "--model.img_size"),
        ("--data.help", "DigitsDataModule", "--data.root"),
    ):
        done = run_command(["fit", option, name], tmp_path)
        assert done.returncode == 0 and expected in done.stdout, done.stderr[-2000:]


@pytest.mark.slow
def test_the_quickstart_prints_no_warning(tmp_path):
    """The quickstart command, shortened: nothing on stderr is a warning (Lightning's about `args`, torch's LeafSpec
    deprecation, ...); the training output is there."""
    args = ["fit", "--config", str(REPO / "configs/quickstart.yaml"), "--trainer.max_steps=2", "--trainer.limit_val_batches=1"]
    done = run_command(args, tmp_path, env={"VIM_CACHE": str(tmp_path / "cache"), "PYTHONWARNINGS": "default"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Final checkpoint: runs/quickstart/version_0/checkpoints/last.ckpt (step 2" in done.stdout
    warned = [line for line in done.stderr.splitlines() if "Warning" in line or "warn" in line.lower()]
    assert not warned, "\n".join(warned)
    output = done.stdout + done.stderr
    for notice in ("GPU available", "TPU available", "litlogger", "to estimate number of stepping batches", "FLOPs"):
        assert notice not in output, f"{notice!r}: a notice the user did not cause"
    summary = [line for line in output.splitlines() if line.startswith(("0 |", "1 |"))]
    assert len(summary) == 1 and "| model | VisionMamba |" in summary[0], "the summary lists the network, not its EMA copy"
    assert re.search(r"^0\s+Non-trainable params", output, re.MULTILINE)


def tiny_linked_config(tmp_path: Path, data: dict) -> str:
    """The tiny run's config without the model's img_size and num_classes: the data section sets them."""
    config = yaml.safe_load(Path(tiny_config(tmp_path)).read_text())
    for key in ("img_size", "num_classes"):
        del config["model"]["init_args"][key]
    config["data"]["init_args"].update(data)
    path = tmp_path / "linked.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_data_settings_set_the_model(tmp_path):
    """img_size and the class count are set once, in the data section; the model gets them. num_frames alike for clips."""
    config = tiny_linked_config(tmp_path, {"img_size": 24})
    (tmp_path / "images" / "class3").mkdir()  # a fourth class folder (empty: the model is only built here)
    cli = run_lightning(["--config", config], run=False)
    assert cli.model.num_classes == 4 and cli.model.model.num_classes == 4
    assert cli.model.hparams.img_size == 24 and cli.model.model.patch_embed.img_size == (24, 24)
    video = ["--config", str(REPO / "configs/video_quickstart.yaml"), "--data.num_frames=4", "--data.img_size=16"]
    cli = run_lightning([*video, f"--data.root={tmp_path / 'clips'}"], run=False)
    assert cli.model.model.patch_embed.num_frames == 4 and cli.model.model.patch_embed.img_size == (16, 16)
    assert cli.model.num_classes == 4  # left, right, up, down


def test_video_recipes_start_from_videomamba_image_weights(capsys):
    """The Kinetics / SSv2 recipes take VideoMamba's own ImageNet image model by its tag (inflated by VideoMamba's
    filter), not its file through pretrained_file (which reads it as a Vim layout)."""
    from vim.models.weights import released_weights

    for config in sorted((REPO / "configs").glob("videomamba_*.yaml")):
        model = printed_config(config, capsys)["model"]["init_args"]
        architecture = config.stem.split("_")[1]  # videomamba_<size>_<dataset>_f<T>
        assert (model["model"], model["pretrained"], model["pretrained_file"]) == (f"videomamba_{architecture}.in1k", True, None)
        assert released_weights(model["model"]).filename == f"videomamba_{architecture[0]}16_in1k_res224.pth"


def test_plot_metrics_draws_the_learning_rate(tmp_path):
    """The LearningRateMonitor's columns get a panel of their own, against the step."""
    plot_metrics = load_plot_metrics()
    metrics = tmp_path / "metrics.csv"
    metrics.write_text("epoch,step,lr-AdamW,train/loss,val/acc1\n0,0,0.001,2.3,\n0,5,0.002,1.9,\n0,9,,,0.5\n1,10,0.0015,1.5,\n")
    figure = plot_metrics.draw(plot_metrics.read_series(metrics))
    (panel,) = [axes for axes in figure.axes if axes.get_title() == "learning rate"]
    (line,) = panel.lines
    assert line.get_label() == "lr-AdamW"
    assert line.get_xdata().tolist() == [0, 5, 10] and line.get_ydata().tolist() == [0.001, 0.002, 0.0015]


def test_missing_released_weights_end_the_command_with_their_message(tmp_path):
    """Offline with an empty cache: the message that names the file and the cache, not jsonargparse's wrapper."""
    for name in ("a", "b"):
        (tmp_path / "train" / name).mkdir(parents=True)
        Image.new("RGB", (32, 32)).save(tmp_path / "train" / name / "0.png")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "empty_cache"))  # read when the hub imports
    command = [sys.executable, "-m", "vim", "fit", "--config", str(REPO / "configs" / "finetune_images.yaml")]
    command += ["--data.train_root", "train", "--data.val_root", "null", "--trainer.accelerator", "cpu"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    message = done.stderr.strip().splitlines()[-1]
    assert message.startswith("vimkit fit: error: released weights of 'vim_small_patch16_224.in1k'")
    assert "vim_s_midclstok_80p5acc.pth" in message and str(tmp_path / "empty_cache") in message
    assert "Traceback" not in done.stderr and "Does not validate" not in done.stderr


def one_line_error(argv: list[str]) -> str:
    """What ``vimkit`` prints before it exits with status 1: the message of ``sys.exit(message)``, one line."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    message = exit_info.value.code
    assert isinstance(message, str) and "\n" not in message, message  # a string exits with status 1, printed to stderr
    return message


def test_extract_ends_expected_errors_with_one_line(tmp_path, monkeypatch):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "images" / "a.png")
    out = tmp_path / "features"
    command = ["extract", "--model", "test_vim", "--input", str(tmp_path / "images"), "--out", str(out)]
    missing = tmp_path / "missing.safetensors"
    assert one_line_error([*command, "--checkpoint", str(missing)]) == (
        f"vimkit extract: error: checkpoint: '{missing}' does not exist or is not a file"
    )

    from vim.extraction import LOCK, extract

    extract("test_vim", tmp_path / "images", out, random_weights=True, progress=False)
    assert one_line_error([*command, "--random-weights", "--shard-size", "2"]).startswith(
        f"vimkit extract: error: '{out}' holds features extracted with other settings (shard_size: 1024 -> 2)"
    )

    # a folder the user may not write into: the system refuses to create a file in it (chmod does not stop root)
    read_only, system_open = tmp_path / "read_only", os.open

    def refuse_in_read_only(path, flags, *args, **kwargs):
        if Path(path).parent == read_only and flags & os.O_CREAT:
            raise PermissionError(13, "Permission denied", str(path))
        return system_open(path, flags, *args, **kwargs)

    read_only.mkdir()
    monkeypatch.setattr(os, "open", refuse_in_read_only)
    assert one_line_error([*command[:-1], str(read_only), "--random-weights"]) == (
        f"vimkit extract: error: [Errno 13] Permission denied: '{read_only / LOCK}'"
    )


def test_export_ends_expected_errors_with_one_line(tmp_path):
    missing = tmp_path / "missing.ckpt"
    assert one_line_error(["export", "--ckpt", str(missing), "--out", str(tmp_path / "w.safetensors")]) == (
        f"vimkit export: error: --ckpt: '{missing}' does not exist or is not a file"
    )
    program = ["export", "--format", "torch_export", "--out", str(tmp_path / "m.pt2")]
    assert one_line_error([*program, "--model", "test_vim", "--ckpt", str(missing)]) == (
        f"vimkit export: error: checkpoint: '{missing}' does not exist or is not a file"
    )
    assert one_line_error([*program, "--model", "test_pointmamba_scan", "--random-weights"]).startswith(
        "vimkit export: error: cannot export a PointMambaScan: its serialisation takes the space-filling curve's depth"
    )
    checkpoint = tmp_path / "run.ckpt"
    torch.save({"state_dict": {"model.weight": torch.ones(2)}, "hyper_parameters": {"model": "test_vim"}}, checkpoint)
    (tmp_path / "a_file").write_text("")
    unwritable = tmp_path / "a_file" / "w.safetensors"  # its folder cannot be made: a file has that name
    message = one_line_error(["export", "--ckpt", str(checkpoint), "--out", str(unwritable)])
    assert message == f"vimkit export: error: [Errno 17] File exists: '{tmp_path / 'a_file'}'"


def test_a_fit_that_would_take_no_step_is_an_error_naming_the_batch_size(tmp_path, monkeypatch):
    """18 training images at batch 32: no full batch (the partial one is dropped), so the fit stops before it starts,
    in one line naming the setting and the size that works, and writes no run."""
    monkeypatch.chdir(tmp_path)
    message = one_line_error(["fit", "--config", tiny_config(tmp_path), "--data.batch_size=32"])
    assert message == (
        "vimkit fit: error: data.batch_size 32 is larger than the 18 training samples an epoch gives each device: it "
        "would hold no full batch (the last, partial one is dropped) and the fit would take no step; give "
        "--data.batch_size 18 or less, or more training data"
    )
    assert not list((tmp_path / "runs").glob("tiny/*/checkpoints/*.ckpt"))


def test_loader_workers_default_to_the_free_cores(tmp_path):
    from vim.data.workers import default_num_workers

    data = ImageDataModule(train_root=str(tmp_path), img_size=16)
    assert data.num_workers is None and data.loader_workers() == default_num_workers()
    assert ImageDataModule(train_root=str(tmp_path), img_size=16, num_workers=0).loader_workers() == 0


def test_notices_the_user_did_not_cause_are_dropped(caplog):
    """A machine without accelerators or CUDA gets no lines saying so; a GPU machine still hears about its GPU."""
    import logging

    from vim.cli import quiet_uncaused_notices

    quiet_uncaused_notices()
    lightning, torch_extensions = (
        logging.getLogger("lightning.pytorch.utilities.rank_zero"),
        logging.getLogger("torch.utils.cpp_extension"),
    )
    with caplog.at_level(logging.INFO):
        torch_extensions.warning("No CUDA runtime is found, using CUDA_HOME='/usr/local'")
        lightning.info("GPU available: False, used: False")
        lightning.info("💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]")
        lightning.info("GPU available: True (cuda), used: True")
    assert [record.getMessage() for record in caplog.records] == ["GPU available: True (cuda), used: True"]


@pytest.mark.parametrize(
    ("overrides", "run_name"),
    [
        ([], "quickstart"),  # the generated digits: the quickstart's own folder
        (["--data.init_args.root", "{tmp}/digits"], "quickstart"),  # the generated digits, written elsewhere
        (["--data", "ImageDataModule", "--data.train_root", "{tmp}/shop/train", "--data.img_size", "16"], "quickstart_shop"),
    ],
    ids=["generated", "generated-elsewhere", "own-image-folders"],
)
def test_a_quickstart_on_your_own_data_gets_a_run_folder_of_its_own(tmp_path, overrides, run_name):
    """runs/quickstart (and its latest) stay the quickstart's; the same config fit on other data is named after it."""
    from vim.cli import name_quickstart_runs_after_the_data

    for name in ("a", "b"):
        (tmp_path / "shop" / "train" / name).mkdir(parents=True)
    args = ["--config", str(REPO / "configs/quickstart.yaml"), *(a.format(tmp=tmp_path) for a in overrides)]
    config = run_lightning(args, run=False).config  # as vimkit fit parses it
    name_quickstart_runs_after_the_data(config)
    assert [logger.init_args.name for logger in config.trainer.logger] == [run_name, run_name]


def test_the_detection_quickstart_on_your_own_coco_data_is_named_after_its_images():
    from vim.cli import own_data_name

    scenes = {"class_path": "vim.data.generated.SceneDetectionDataModule", "init_args": {"root": "/data/scenes"}}
    coco = {"class_path": "vim.data.detection.DetectionDataModule", "init_args": {"train_images": "/data/shop/train"}}
    assert (own_data_name(scenes), own_data_name(coco)) == (None, "shop")
