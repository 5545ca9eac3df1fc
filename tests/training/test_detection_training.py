"""Detection on the shared recipe: a few steps of Mask R-CNN and Faster R-CNN, COCO mAP through the module's evaluation
against hand values, exact resume after a kill, and ``vimkit fit`` then ``vimkit predict`` (boxes in the original
images' pixels) on the detection quickstart's config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image
from test_training import CrashAt, assert_same_weights
from torch import nn

from vim.cli import main
from vim.data.generated import SceneDetectionDataModule
from vim.data.generated.scenes import write_scenes
from vim.training.checkpoint_io import AtomicCheckpointIO
from vim.training.detection import Detector

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: see tests/conftest.py

REPO = Path(__file__).resolve().parents[2]
TINY_HEADS = dict(anchor_sizes=(8, 16, 32, 64, 128), fpn_channels=16, box_head_width=32, mask_head_width=16)
TINY_RCNN = dict(rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=30, rpn_pre_nms_top_n_test=100)
TINY_RCNN.update(rpn_post_nms_top_n_test=30, box_batch_size_per_image=16, box_detections_per_img=10)


def tiny_detector(head: str, **recipe) -> Detector:
    options = dict(head=head, detector_kwargs=TINY_RCNN, lr=1e-3, warmup_epochs=0.5, warmup_lr=1e-5, **TINY_HEADS)
    return Detector("test_vmamba", num_classes=3, **{**options, **recipe})


def tiny_scenes(root: Path, head: str, **kwargs) -> SceneDetectionDataModule:
    """16 training and 4 validation scenes of 64x64 under ``root`` (4 batches of 4 per epoch)."""
    write_scenes(root, split_sizes={"train": 16, "val": 4})
    options = dict(masks=head == "mask_rcnn", img_size=64, max_size=None, batch_size=4, num_workers=0)
    return SceneDetectionDataModule(root=str(root), **{**options, **kwargs})


def tiny_trainer(run_dir: Path, callbacks=(), **kwargs) -> Trainer:
    options = dict(accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_progress_bar=False)
    options.update(enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=run_dir)
    return Trainer(callbacks=list(callbacks), plugins=[AtomicCheckpointIO()], **{**options, **kwargs})


@pytest.mark.parametrize("head", ["faster_rcnn", "mask_rcnn"])
def test_a_few_training_steps_of_each_head(tmp_path, head):
    """Each of torchvision's losses logged and finite, the weights moved, validation mAP logged (masks too)."""
    seed_everything(0)
    module = tiny_detector(head)
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_train_batches=3, limit_val_batches=1, enable_checkpointing=False)
    trainer.fit(module, tiny_scenes(tmp_path / "scenes", head))
    metrics = trainer.callback_metrics
    losses = {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    losses |= {"loss_mask"} if head == "mask_rcnn" else set()
    assert {f"train/{name}" for name in losses} | {"train/loss"} <= set(metrics)
    assert all(torch.isfinite(metrics[f"train/{name}"]) for name in losses)
    moved = [k for k, v in module.model.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert any(k.startswith("backbone.body") for k in moved) and any(k.startswith("roi_heads") for k in moved)
    assert ("val/mask_map" in metrics) == (head == "mask_rcnn") and 0 <= float(metrics["val/map"]) <= 1


def test_the_backbone_starts_from_a_weights_file(tmp_path):
    """``pretrained_file``: the backbone's trunk gets the file's weights (through timm's pretrained loading); a module
    built for a checkpoint to restore (``initial_weights=False``) does not read it."""
    torch.manual_seed(1)
    trained = timm.create_model("test_vmamba", num_classes=0)
    torch.save(trained.state_dict(), tmp_path / "backbone.pth")
    module = tiny_detector("faster_rcnn", pretrained_file=str(tmp_path / "backbone.pth"))
    trunk = module.model.backbone.body.trunk.state_dict()
    assert trunk and all(torch.equal(value, trained.state_dict()[key]) for key, value in trunk.items())
    random_start = module.build_model(initial_weights=False).backbone.body.trunk.state_dict()
    assert not all(torch.equal(value, trunk[key]) for key, value in random_start.items())


def test_mask_rcnn_needs_masks_from_the_data(tmp_path):
    with pytest.raises(ValueError, match=r"mask_rcnn trains instance masks: set data\.masks true"):
        tiny_trainer(tmp_path, max_steps=1).fit(tiny_detector("mask_rcnn"), tiny_scenes(tmp_path / "scenes", "faster_rcnn"))


class Fixed(nn.Module):
    """A 'detector' that answers every batch with the same detections."""

    def __init__(self, detections: list[dict[str, torch.Tensor]]) -> None:
        super().__init__()
        self.detections = detections

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        return self.detections


def box_mask(box: list[float], side: int = 32) -> torch.Tensor:
    mask = torch.zeros(side, side, dtype=torch.uint8)
    x0, y0, x1, y1 = (round(v) for v in box)
    mask[y0:y1, x0:x1] = 1
    return mask


@pytest.mark.parametrize(
    "predicted, expected",
    [
        ([2, 3, 12, 13], {"map": 1.0, "map_50": 1.0, "map_75": 1.0, "mask_map": 1.0}),  # the object itself
        # IoU 100 / 130 = 0.77: a match at the thresholds 0.50, 0.55, ..., 0.75 (6 of 10) and no further
        ([2, 3, 12, 16], {"map": 0.6, "map_50": 1.0, "map_75": 1.0, "mask_map": 0.6}),
    ],
    ids=["perfect", "iou-0.77"],
)
def test_map_of_the_modules_evaluation_against_hand_values(predicted, expected, monkeypatch):
    """One object of label 2 at [2, 3, 12, 13] in a 32x32 image, predicted with score 0.9 (mask: the box's pixels)."""
    module = tiny_detector("mask_rcnn")
    target = {"boxes": torch.tensor([[2.0, 3, 12, 13]]), "labels": torch.tensor([2]), "masks": box_mask([2, 3, 12, 13])[None]}
    detection = dict(boxes=torch.tensor([predicted], dtype=torch.float32), scores=torch.tensor([0.9]), labels=torch.tensor([2]))
    module.model = Fixed([{**detection, "masks": box_mask(predicted)[None, None].float()}])
    logged: dict[str, torch.Tensor] = {}
    monkeypatch.setattr(module, "log_dict", lambda values, **kwargs: logged.update(values))
    module.evaluate(([torch.zeros(3, 32, 32)], [target]), module.val_metrics, None)
    module.on_validation_epoch_end()
    assert {k: round(float(v), 6) for k, v in logged.items()} == {f"val/{k}": v for k, v in expected.items()}
    line = module.final_metric_line(logged)
    assert line is not None and line.startswith(f"Final validation box mAP {100 * expected['map']:.1f}% (mask mAP")


def resumable_run(run_dir: Path, scenes: Path, callbacks=(), ckpt_path=None) -> Detector:
    """2 epochs of 4 steps of Faster R-CNN with EMA, scale jitter, flips and colour jitter; checkpoints every step."""
    seed_everything(0)
    module = tiny_detector("faster_rcnn", ema_decay=0.9)
    checkpoints = ModelCheckpoint(dirpath=run_dir / "checkpoints", save_last=True, every_n_train_steps=1)
    trainer = tiny_trainer(run_dir, [checkpoints, *callbacks], limit_val_batches=0)
    trainer.fit(module, tiny_scenes(scenes, "faster_rcnn", scale_range=(56, 72), color_jitter=0.3), ckpt_path=ckpt_path)
    assert trainer.global_step == 8
    return module


def test_killed_and_resumed_run_matches_the_uninterrupted_one(tmp_path):
    reference = resumable_run(tmp_path / "full", tmp_path / "scenes")
    with pytest.raises(RuntimeError, match="simulated crash at step 5"):
        resumable_run(tmp_path / "split", tmp_path / "scenes", [CrashAt(5)])
    assert torch.load(tmp_path / "split" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 5
    resumed = resumable_run(tmp_path / "split", tmp_path / "scenes", ckpt_path="last")
    assert_same_weights(reference, resumed)


class TopLeftQuarter(nn.Module):
    """A 'detector' that finds one object of label 2 in the top-left quarter of each image it is given."""

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        boxes = [torch.tensor([[0.0, 0.0, image.shape[-1] / 2, image.shape[-2] / 2]]) for image in images]
        return [dict(boxes=box, scores=torch.tensor([0.9]), labels=torch.tensor([2])) for box in boxes]


def test_quickstart_shortened_then_predict_in_original_pixels(tmp_path, monkeypatch, capsys):
    """``vimkit fit`` on the quickstart config (2 steps); then ``vimkit predict`` of a scene and of a 200x100 image
    (resized to 128x64 for the model) whose detections, the top-left quarter of the model's input, are written in the
    original images' pixels and category ids; a corrupt file listed with its reason; every readable input drawn."""
    monkeypatch.setenv("VIM_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    config = str(REPO / "configs/detection_quickstart.yaml")
    quick = ["--trainer.max_steps=2", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false"]
    main(["fit", "--config", config, *quick])
    out = capsys.readouterr().out
    last = Path("runs/detection_quickstart/version_0/checkpoints/last.ckpt")
    assert f"Final checkpoint: {last} (step 2" in out and "Final validation box mAP " in out
    assert torch.load(last, weights_only=True)["category_ids"] == [1, 2, 3]

    inputs = tmp_path / "to_detect"
    inputs.mkdir()
    Image.open(tmp_path / "cache/scenes/images/val/0000.png").save(inputs / "a_scene.png")
    Image.new("RGB", (200, 100), (90, 120, 30)).save(inputs / "b_wide.png")
    (inputs / "c_corrupt.png").write_bytes(b"not an image")
    monkeypatch.setattr(Detector, "eval_model", property(lambda module: TopLeftQuarter()))
    output = tmp_path / "detections.json"
    predict = [f"--ckpt_path={last}", f"--data.init_args.predict_root={inputs}", f"--predict_writer.output={output}"]
    main(["predict", "--config", config, *predict, *quick[2:]])
    assert json.loads(output.read_text()) == [
        {"file_name": str(inputs / "a_scene.png"), "category_id": 2, "bbox": [0, 0, 32, 32], "score": 0.9},
        {"file_name": str(inputs / "b_wide.png"), "category_id": 2, "bbox": [0, 0, 100, 50], "score": 0.9},
    ]
    drawn = sorted(path.name for path in (tmp_path / "detections_drawn").iterdir())
    assert drawn == ["00000_a_scene.png", "00001_b_wide.png"] and Image.open(tmp_path / "detections_drawn" / drawn[1]).size == (
        200,
        100,
    )
    unreadable = json.loads((tmp_path / "detections_unreadable.json").read_text())
    assert [u["file_name"] for u in unreadable] == [str(inputs / "c_corrupt.png")] and "cannot identify" in unreadable[0][
        "reason"
    ]
