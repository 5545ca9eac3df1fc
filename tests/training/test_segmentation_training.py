"""Semantic segmentation on the shared training loop: scores, window inference, exact resume, the quickstart with
predict and export."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image

from vim.cli import main, run_lightning
from vim.data.generated.scenes import write_scenes
from vim.data.segmentation import IGNORE_INDEX, SegmentationDataModule
from vim.dense.inference import whole_logits, window_logits, window_starts
from vim.training.checkpoint_io import AtomicCheckpointIO
from vim.training.segmentation import Segmenter, scores_from_confusion, segmentation_loss

from support.paths import REPO
from support.training import CrashAt

TINY_VIM = dict(patch_size=4, stride=4, depth=2)


def test_scores_from_a_confusion_matrix_by_hand():
    confusion = torch.tensor([[3, 1, 0], [0, 2, 0], [0, 0, 0]])  # rows: true class; class 2 never seen nor predicted
    scores = scores_from_confusion(confusion)
    assert scores["IoU"][:2].tolist() == pytest.approx([3 / 4, 2 / 3]) and math.isnan(scores["IoU"][2])
    assert float(scores["mIoU"]) == pytest.approx((3 / 4 + 2 / 3) / 2)  # over the classes that occur, as mmseg
    assert float(scores["mAcc"]) == pytest.approx((3 / 4 + 1) / 2) and float(scores["aAcc"]) == pytest.approx(5 / 6)


def test_the_loss_leaves_ignored_pixels_out_and_is_zero_when_all_are():
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    masks = torch.tensor([[[0, IGNORE_INDEX], [2, IGNORE_INDEX]]])
    expected = (-logits.log_softmax(1)[0, 0, 0, 0] - logits.log_softmax(1)[0, 2, 1, 0]) / 2
    assert segmentation_loss(logits, masks).item() == pytest.approx(expected.item())
    empty = segmentation_loss(logits, torch.full((1, 2, 2), IGNORE_INDEX))
    assert empty.item() == 0 and empty.requires_grad


def test_window_starts_cover_the_side_with_the_last_window_flush():
    assert window_starts(512, 512, 341) == [0]
    assert window_starts(683, 512, 341) == [0, 171]
    assert window_starts(1100, 512, 341) == [0, 341, 588]


def test_windows_of_a_pixelwise_model_give_its_whole_image_logits():
    """A 1x1 conv sees one pixel: the mean of its overlapping windows' logits is its logits on the whole image."""
    model = torch.nn.Conv2d(3, 5, 1)
    images = torch.randn(2, 3, 45, 70)
    with torch.no_grad():
        expected = model(images)
        torch.testing.assert_close(window_logits(model, images, 5, crop=32, stride=20), expected)
        torch.testing.assert_close(window_logits(model, images[..., :20, :20], 5, crop=32, stride=20), expected[..., :20, :20])
        torch.testing.assert_close(whole_logits(model, images), expected)


def scene_data(root, batch_size=8, **kwargs) -> SegmentationDataModule:
    write_scenes(root, size=32, split_sizes={"train": 24, "val": 8})
    return SegmentationDataModule(
        str(root / "images/train"),
        str(root / "masks/train"),
        str(root / "images/val"),
        str(root / "masks/val"),
        class_names=4,
        img_size=32,
        batch_size=batch_size,
        num_workers=0,
        **kwargs,
    )


def segmentation_run(run_dir, data_root, callbacks=(), ckpt_path=None) -> Segmenter:
    """2 epochs of 3 steps: random resize, crop, flip and colour jitter, drop path and EMA, all drawn per step."""
    seed_everything(0)
    settings = dict(decoder_channels=16, model_kwargs=TINY_VIM, eval_mode="whole", drop_path_rate=0.1, ema_decay=0.9)
    module = Segmenter("test_vim", 4, 32, **settings)
    checkpoints = ModelCheckpoint(dirpath=run_dir / "checkpoints", save_last=True, every_n_train_steps=1)
    trainer = Trainer(
        default_root_dir=run_dir,
        accelerator="cpu",
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[checkpoints, *callbacks],
        plugins=[AtomicCheckpointIO()],
    )
    trainer.fit(module, scene_data(data_root), ckpt_path=ckpt_path)
    assert trainer.global_step == 6
    return module


def test_an_interrupted_and_resumed_segmentation_run_matches_an_uninterrupted_one(tmp_path):
    reference = segmentation_run(tmp_path / "full", tmp_path / "scenes")
    with pytest.raises(RuntimeError, match="simulated crash at step 4"):
        segmentation_run(tmp_path / "split", tmp_path / "scenes", [CrashAt(4)])  # in the second epoch
    resumed = segmentation_run(tmp_path / "split", tmp_path / "scenes", ckpt_path=str(tmp_path / "split/checkpoints/last.ckpt"))
    for key, expected in reference.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], expected, rtol=1e-5, atol=1e-6, msg=key)


def test_an_unreadable_pair_is_skipped_and_counted_during_fit(tmp_path):
    data = scene_data(tmp_path / "scenes")
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(tmp_path / "scenes/masks/train/0003.png")  # not its image's size
    module = Segmenter("test_vim", 4, img_size=32, decoder_channels=16, model_kwargs=TINY_VIM, eval_mode="whole")
    trainer = Trainer(
        default_root_dir=tmp_path, accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    with pytest.warns(UserWarning, match=r"skipped unreadable image or mask '.*0003\.png' \(ValueError: mask .* is 5x5"):
        trainer.fit(module, data)
    assert data.num_skipped == 1 and trainer.global_step == 3


def test_segmentation_quickstart_shortened_then_predict(tmp_path, monkeypatch, capsys):
    """The quickstart config (its model, generated data and CLI), shortened; then masks and overlays of a folder."""
    monkeypatch.setenv("VIM_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    config = str(REPO / "configs/segmentation_quickstart.yaml")
    fit = run_lightning(["fit", "--config", config, "--trainer.max_epochs=2", "--trainer.enable_progress_bar=false"])
    mean_iou = float(fit.trainer.callback_metrics["val/mIoU"])
    assert mean_iou > 0.2, f"mIoU {mean_iou:.3f} after two epochs (the background alone gives about 0.2)"
    assert "Final validation mIoU" in capsys.readouterr().out
    last = tmp_path / "runs/segmentation_quickstart/latest/checkpoints/last.ckpt"
    assert last.is_file()

    inputs = tmp_path / "to_segment"
    (inputs / "sub").mkdir(parents=True)
    scenes = tmp_path / "cache/scenes/images/val"
    Image.open(scenes / "0000.png").resize((80, 48)).save(inputs / "wide.png")  # another size than the training data
    (inputs / "sub" / "b.png").write_bytes((scenes / "0001.png").read_bytes())
    (inputs / "broken.png").write_bytes(b"not an image")
    output = tmp_path / "masks"
    main(
        [
            "predict",
            "--config",
            config,
            f"--ckpt_path={last}",
            f"--data.init_args.predict_root={inputs}",
            f"--predict_writer.output={output}",
            "--trainer.enable_progress_bar=false",
        ]
    )
    printed = capsys.readouterr().out
    assert f"Masks (and colour overlays) of 2 images: {output}; 1 unreadable files" in printed
    wide = Image.open(output / "wide.png")
    assert wide.mode == "P" and wide.size == (80, 48) and set(np.unique(np.asarray(wide))) <= {0, 1, 2, 3}
    assert Image.open(output / "sub" / "b.png").size == (64, 64) and (output / "wide_overlay.jpg").is_file()
    with (output / "unreadable.csv").open() as file:
        assert [row["path"] for row in csv.DictReader(file)] == [str(inputs / "broken.png")]


def test_a_segmentation_checkpoint_exports_to_onnx_with_parity(tmp_path):
    """``vimkit export`` of a segmentation run's checkpoint: the whole UperNet (EMA weights) as ONNX, whose logits
    onnxruntime computes as PyTorch does, for a batch size other than the traced one."""
    ort = pytest.importorskip("onnxruntime")
    module = segmentation_run(tmp_path / "run", tmp_path / "scenes")
    onnx_file = tmp_path / "segmenter.onnx"
    main(["export", "--ckpt", str(tmp_path / "run/checkpoints/last.ckpt"), "--out", str(onnx_file)])
    session = ort.InferenceSession(str(onnx_file))
    assert [i.name for i in session.get_inputs()] == ["images"] and [o.name for o in session.get_outputs()] == ["logits"]
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = module.eval_model.eval()(images)
    (logits,) = session.run(None, {"images": images.numpy()})
    assert logits.shape == (3, 4, 32, 32)
    np.testing.assert_allclose(logits, expected.numpy(), rtol=1e-4, atol=1e-4)


def test_layer_decay_reaches_the_trunk_inside_upernet():
    """Vim's UperNet recipe decays the lr by layer (0.92 over 24 blocks): timm's layer groups of the trunk, read
    through UperNet's names; the pyramid, decoder and head train at the full rate, the embeddings lowest."""
    from timm.optim import param_groups_layer_decay

    module = Segmenter("test_vim", 4, 32, decoder_channels=16, model_kwargs=TINY_VIM)
    scale_of = {}
    for group in param_groups_layer_decay(module.model, weight_decay=0.05, layer_decay=0.5):
        names = [name for name, p in module.model.named_parameters() if any(p is q for q in group["params"])]
        scale_of.update(dict.fromkeys(names, group["lr_scale"]))
    trunk = "encoder.dense.body.trunk."
    assert scale_of[trunk + "patch_embed.proj.weight"] == pytest.approx(0.125)  # stem, then 2 blocks, then the top
    assert scale_of[trunk + "layers.0.norm.weight"] == pytest.approx(0.25)
    assert scale_of[trunk + "layers.1.norm.weight"] == pytest.approx(0.5)
    assert scale_of["decoder.fusion_block.0.weight"] == scale_of["segmentation_head.0.weight"] == 1.0
    assert trunk + "pos_embed" in module.model.no_weight_decay()


def test_predict_without_a_checkpoint_is_refused_for_a_segmenter(tmp_path, monkeypatch):
    """Released weights are a backbone's: a segmenter predicts from its training's checkpoint only."""
    monkeypatch.chdir(tmp_path)
    config = str(REPO / "configs/segmentation_quickstart.yaml")
    with pytest.raises(SystemExit, match=r"vimkit predict: error: vimkit predict with a Segmenter needs --ckpt_path"):
        main(["predict", "--config", config, f"--data.init_args.predict_root={tmp_path}"])
