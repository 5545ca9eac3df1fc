"""VideoClassifier: multi-view averaging, and the video quickstart end to end through the ``vimkit`` command."""

from __future__ import annotations

import pytest
import timm
import torch

from vim.cli import run_lightning
from vim.data.generated import write_moving_digits
from vim.deploy import export_safetensors
from vim.training.video import VideoClassifier, average_view_logits

from support.paths import REPO

SMALL = "{patch_size: 8, tubelet_size: 2, embed_dim: 16, depth: 1, d_state: 4}"


def test_views_are_averaged_in_probability():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 2 * 4 * 4, 5))
    clips = torch.randn(2, 3, 3, 2, 4, 4)  # (B, V, 3, T, H, W)
    expected = torch.stack([model(clips[b]).softmax(-1).mean(0) for b in range(2)])
    torch.testing.assert_close(average_view_logits(model, clips).softmax(-1), expected)
    torch.testing.assert_close(average_view_logits(model, clips[:, 0]), model(clips[:, 0]))  # one view: plain logits


def test_clip_length_must_match_the_data(tmp_path):
    with pytest.raises(ValueError, match="num_frames must be at least 1"):
        VideoClassifier("test_videomamba", num_classes=4, num_frames=0)


def test_video_quickstart_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = write_moving_digits(tmp_path / "digits", num_train=16, num_val=8, num_frames=8)
    common = [
        "--config",
        str(REPO / "configs" / "video_quickstart.yaml"),
        f"--data.root={root}",
        "--data.num_workers=0",
        "--data.batch_size=8",
        "--data.test_num_clips=2",
        "--data.test_num_crops=2",
        f"--model.model_kwargs={SMALL}",
        "--trainer.enable_progress_bar=false",
    ]
    run_lightning(["fit", *common, "--trainer.max_epochs=2"])
    last = tmp_path / "runs" / "video_quickstart" / "latest" / "checkpoints" / "last.ckpt"
    assert last.is_file()
    cli = run_lightning(["test", *common, f"--ckpt_path={last}"])
    metrics = cli.trainer.callback_metrics
    assert {"test/acc1", "test_ema/acc1"} <= set(metrics) and 0.0 <= float(metrics["test/acc1"]) <= 1.0

    weights = export_safetensors(last, tmp_path / "quick.safetensors")
    model = timm.create_model(
        "videomamba_tiny",
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(weights), num_classes=4),
        num_classes=4,
        num_frames=8,
        img_size=32,
        patch_size=8,
        tubelet_size=2,
        embed_dim=16,
        depth=1,
        d_state=4,
    ).eval()
    trained = VideoClassifier.load_from_checkpoint(last, map_location="cpu").eval()
    clips = torch.randn(2, 3, 8, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(clips), trained.eval_model(clips))
