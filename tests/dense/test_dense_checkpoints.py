"""VMamba's released detection and segmentation checkpoints (mmdetection Mask R-CNN, mmsegmentation UperNet) as the
start of a fine-tune, without downloading them: files in upstream's layout (``{"meta", "state_dict"}``, keys
``backbone.*`` of ``MM_VSSM``, ``neck.*`` of mmdetection's FPN, a few head keys), random values, saved as ``.pth``.

What is checked: every backbone tensor lands (the trunk, the four output norms), the maps equal the float64 re-written
``MM_VSSM`` forward (``tests/reference/vmamba.py``) and the FPN's the re-written mmdetection FPN
(``tests/reference/openmmlab.py``) on the same weights; the heads are named in a warning; plain ``timm.create_model``
takes the trunk; keys that do not fit are named; the full tiny key set maps completely (names and shapes).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import timm
import torch

import vim.dense
from vim.dense.checkpoints import dense_parts
from vim.models.checkpoint import CheckpointError
from vim.models.vmamba import checkpoint_filter_fn, to_official_state_dict

from reference.openmmlab import mmdet_fpn_forward, mmdet_fpn_shapes, mmseg_uperhead_forward, mmseg_uperhead_shapes
from reference.vmamba import official_backbone_forward, official_backbone_shapes, official_vssm_state_dict
from support.pickles import TouchOnUnpickle

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: see tests/conftest.py

TEST_CONFIG = ([16, 32, 64, 128], [1, 1, 1, 1], 2.0)  # test_vmamba
TINY_CONFIG = ([96, 192, 384, 768], [2, 2, 8, 2], 1.0)  # vmamba_tiny_s1l8, upstream's *_tiny.py configs (vssm1)
TOLERANCES = {torch.float64: dict(rtol=1e-6, atol=1e-6), torch.float32: dict(rtol=1e-4, atol=1e-4)}  # as test_vmamba
ImagePair = tuple[torch.Tensor, torch.Tensor]


def _head_shapes(dims: list[int], kind: str) -> dict[str, tuple]:
    """A few of the heads' keys: Mask R-CNN's RPN and RoI heads, or UperNet's decode and auxiliary heads (150 classes)."""
    if kind == "detection":
        return {
            "rpn_head.rpn_conv.weight": (256, 256, 3, 3), "rpn_head.rpn_cls.weight": (3, 256, 1, 1),
            "roi_head.bbox_head.fc_cls.weight": (81, 1024), "roi_head.mask_head.conv_logits.weight": (80, 256, 1, 1),
        }  # fmt: skip
    return {
        "decode_head.psp_modules.0.1.conv.weight": (512, dims[-1], 1, 1), "decode_head.conv_seg.weight": (150, 512, 1, 1),
        "auxiliary_head.convs.0.conv.weight": (256, dims[2], 3, 3), "auxiliary_head.conv_seg.weight": (150, 256, 1, 1),
    }  # fmt: skip


def _dense_shapes(config: tuple, kind: str) -> dict[str, tuple]:
    """Upstream's Mask R-CNN ("detection": MM_VSSM, FPN, heads) or UperNet ("segmentation": MM_VSSM, heads) keys."""
    dims = config[0]
    backbone = {f"backbone.{key}": shape for key, shape in official_backbone_shapes(*config).items()}
    neck = mmdet_fpn_shapes(dims) if kind == "detection" else {}
    return {**backbone, **neck, **_head_shapes(dims, kind)}


def _dense_file(tmp_path: Path, kind: str, generator: torch.Generator, drop=(), extra=None) -> tuple[Path, dict]:
    """An mmengine-style checkpoint of test_vmamba's config, random weights (less the ``drop`` keys, plus ``extra``)."""
    state = {f"backbone.{k}": v for k, v in official_vssm_state_dict(official_backbone_shapes(*TEST_CONFIG), generator).items()}
    for key, shape in _dense_shapes(TEST_CONFIG, kind).items():
        if key not in state:
            state[key] = 0.1 * torch.randn(shape, generator=generator)
    state = {key: value for key, value in {**state, **(extra or {})}.items() if key not in drop}
    path = tmp_path / f"{kind}_epoch_12.pth"
    meta = {"epoch": 12, "iter": 1000, "mmdet_version": "3.3.0", "dataset_meta": {"classes": ("person", "car")}}
    torch.save({"meta": meta, "state_dict": state}, path)
    return path, state


def _overlay(path: Path) -> dict:
    return dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_detection_checkpoint_gives_upstreams_maps_and_fpn(tmp_path: Path, dtype: torch.dtype) -> None:
    """Mask R-CNN's file in vim.dense.backbone: each backbone and neck tensor lands; the raw maps are MM_VSSM's
    (outnorm{i} of each stage), the FPN's maps mmdetection's FPN's, on a 64 x 96 image; the heads are named."""
    generator = torch.Generator().manual_seed(0)
    path, state = _dense_file(tmp_path, "detection", generator)
    with pytest.warns(UserWarning, match=r"roi_head\.\* \(2 keys\), rpn_head\.\* \(2 keys\) not loaded"):
        dense = vim.dense.backbone("test_vmamba", **_overlay(path))
    official = to_official_state_dict(dense.body.trunk.state_dict())
    for key, value in official.items():
        torch.testing.assert_close(value, state[f"backbone.{key}"], rtol=0, atol=0, msg=key)
    for i, norm in enumerate(dense.body.norms):
        torch.testing.assert_close(norm.weight, state[f"backbone.outnorm{i}.weight"], rtol=0, atol=0)
    dense = dense.to(dtype).eval()
    images = torch.randn(1, 3, 64, 96, generator=generator)
    with torch.no_grad():
        raw, maps = dense.body(images.to(dtype)), dense(images.to(dtype))
    expected = official_backbone_forward({k.removeprefix("backbone."): v for k, v in state.items()}, images, TEST_CONFIG[1])
    for ours, theirs in zip(raw, expected, strict=True):
        torch.testing.assert_close(ours.double(), theirs, **TOLERANCES[dtype])
    fpn = mmdet_fpn_forward(state, raw)  # on our maps: the neck alone
    assert list(maps) == ["0", "1", "2", "3", "pool"]
    for ours, theirs in zip(maps.values(), fpn, strict=True):
        torch.testing.assert_close(ours.double(), theirs, **TOLERANCES[dtype])


def test_segmentation_checkpoint_in_upernet(tmp_path: Path) -> None:
    """UperNet's file in vim.dense.segmentation.UPerNet: the encoder's maps are MM_VSSM's; the decode and auxiliary
    heads (not smp's decoder, docs/dense.md) are named in a warning and left at their init."""
    segmentation = pytest.importorskip("vim.dense.segmentation")
    generator = torch.Generator().manual_seed(1)
    path, state = _dense_file(tmp_path, "segmentation", generator)
    with pytest.warns(UserWarning, match=r"auxiliary_head\.\* \(2 keys\), decode_head\.\* \(2 keys\) not loaded"):
        model = segmentation.UPerNet("test_vmamba", classes=150, **_overlay(path)).eval()
    images = torch.randn(1, 3, 64, 64, generator=generator)
    with torch.no_grad():
        maps = model.encoder(images)[2:]
        assert model(images).shape == (1, 150, 64, 64)
    expected = official_backbone_forward({k.removeprefix("backbone."): v for k, v in state.items()}, images, TEST_CONFIG[1])
    for ours, theirs in zip(maps, expected, strict=True):
        torch.testing.assert_close(ours.double(), theirs, **TOLERANCES[torch.float32])


def test_a_whole_upernet_checkpoint_fills_upernet_of_mmseg_layout(tmp_path: Path) -> None:
    """With head_layout="mmseg", UperNet's file fills the whole model: its logits are those of mmseg's UPerHead
    (re-written in tests/reference/openmmlab.py) on MM_VSSM's maps, on the same weights, at the image's size; only the
    auxiliary head is named as not loaded. A file of other classes keeps the decoder and re-initialises the classifier."""
    segmentation = pytest.importorskip("vim.dense.segmentation")
    generator = torch.Generator().manual_seed(3)
    head = {}
    for key, shape in mmseg_uperhead_shapes(TEST_CONFIG[0], channels=16, classes=150).items():
        values = 0.2 * torch.randn(shape, generator=generator)
        head[key] = values.abs() + 0.5 if key.endswith("running_var") else values
    path, state = _dense_file(tmp_path, "segmentation", generator, extra=head)
    with pytest.warns(UserWarning, match=r"'[^']*': auxiliary_head\.\* \(2 keys\) not loaded"):
        model = segmentation.UPerNet("test_vmamba", 150, decoder_channels=16, head_layout="mmseg", **_overlay(path))
    images = torch.randn(2, 3, 64, 96, generator=generator)
    with torch.no_grad():
        logits = model.eval().double()(images.double())
    maps = official_backbone_forward({k.removeprefix("backbone."): v for k, v in state.items()}, images, TEST_CONFIG[1])
    torch.testing.assert_close(logits, mmseg_uperhead_forward(state, maps, (64, 96)), rtol=1e-6, atol=1e-6)
    with pytest.warns(UserWarning, match="auxiliary_head"):
        other = segmentation.UPerNet("test_vmamba", 7, decoder_channels=16, head_layout="mmseg", **_overlay(path))
    torch.testing.assert_close(other.decoder.fusion_block[0].weight, head["decode_head.fpn_bottleneck.conv.weight"])
    assert other.segmentation_head.classifier.weight.shape == (7, 16, 1, 1)


def test_timm_create_model_takes_the_trunk(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Plain timm.create_model on Mask R-CNN's file: the trunk's tensors are the file's; the final norm and the
    classifier (the dense backbone has neither) keep their init, as a log line says, naming what is left out."""
    path, state = _dense_file(tmp_path, "detection", torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    fresh = to_official_state_dict(timm.create_model("test_vmamba").state_dict())
    torch.manual_seed(0)
    with caplog.at_level(logging.INFO, logger="vim.models.checkpoint"):
        model = timm.create_model("test_vmamba", **_overlay(path))
    assert "['norm_f.bias', 'norm_f.weight'] keep their initialisation" in caplog.text
    assert "left out: backbone.* (8 keys), neck.* (16 keys), roi_head.* (2 keys), rpn_head.* (2 keys)" in caplog.text
    for key, value in to_official_state_dict(model.state_dict()).items():
        expected = fresh[key] if key.startswith("classifier.") else state[f"backbone.{key}"]
        torch.testing.assert_close(value, expected, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize(
    ("drop", "extra", "message"),
    [
        (("backbone.outnorm2.weight",), None, r"missing keys \['body.norms.2.weight'\]"),
        (("neck.fpn_convs.3.conv.bias",), None, r"missing keys \['fpn.layer_blocks.3.0.bias'\]"),
        ((), {"neck.lateral_convs.4.conv.bias": torch.zeros(256)}, r"unexpected keys \['neck.lateral_convs.4.conv.bias'\]"),
        (("backbone.layers.1.blocks.0.norm2.bias",), None, r"missing keys \['stages.1.blocks.0.norm2.bias'\]"),
        ((), {"backbone.layers.1.extra.weight": torch.zeros(1)}, r"unexpected keys \['layers.1.extra.weight'\]"),
        ((), {"backbone.outnorm1.weight": torch.zeros(5)}, r"'body.norms.1.weight' has shape \(5,\), the model expects \(32,\)"),
    ],
    ids=["outnorm-missing", "neck-missing", "neck-unexpected", "trunk-missing", "trunk-unexpected", "wrong-shape"],
)
def test_keys_that_do_not_fit_are_named(tmp_path: Path, drop: tuple, extra: dict | None, message: str) -> None:
    path, _ = _dense_file(tmp_path, "detection", torch.Generator().manual_seed(3), drop=drop, extra=extra)
    with pytest.raises(ValueError, match=message):
        vim.dense.backbone("test_vmamba", **_overlay(path))


def test_pickled_code_stays_refused(tmp_path: Path) -> None:
    """A checkpoint whose meta holds an object outside the safe types is not read."""
    path, marker = tmp_path / "unsafe.pth", tmp_path / "ran"
    torch.save({"meta": {"hook": TouchOnUnpickle(marker)}, "state_dict": {"backbone.outnorm0.weight": torch.ones(16)}}, path)
    with pytest.raises(CheckpointError, match="refused"):
        vim.dense.backbone("test_vmamba", **_overlay(path))
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["detection", "segmentation"])
def test_the_full_tiny_key_set_maps_completely(kind: str) -> None:
    """vmamba_tiny_s1l8's Mask R-CNN / UperNet keys and shapes (on the meta device): the trunk's map onto every key of
    the dense backbone's trunk (its final norm aside, pruned), the output norms and the neck onto the rest."""
    shapes = _dense_shapes(TINY_CONFIG, kind)
    state = {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}
    dense = vim.dense.backbone("vmamba_tiny_s1l8", fpn=kind == "detection", device="meta")
    trunk = dense.body.trunk
    ours = {key: tuple(v.shape) for key, v in dense.state_dict().items()}
    mapped = {f"body.trunk.{key}": tuple(v.shape) for key, v in checkpoint_filter_fn(state, trunk).items()}
    parts, left_out = dense_parts(state, dense)
    mapped.update({key: tuple(v.shape) for key, v in parts.items()})
    assert mapped == ours
    assert sorted({key.split(".")[0] for key in left_out}) == sorted({key.split(".")[0] for key in _head_shapes([0] * 4, kind)})
