"""vim.dense.backbone as torchvision's detection backbone: keys, strides and channels of the maps; the flat trunk's
pyramid against its definition on the trunk's own ``forward_intermediates``; the hierarchical trunks' stage maps at
sizes that are not multiples of 32; grids that do not tile refused; released-format weight files loaded; and a few
training steps of FasterRCNN, MaskRCNN, RetinaNet and FCOS on each family.

Vim is tested with 16-pixel patches at stride 16 (the layout of the registered ``vim_*_patch16_224`` models): the
registered ``test_vim``'s 8-pixel patches at stride 4 overlap, and its grid does not tile the image (refused below).
"""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet

import vim.dense
from vim.models import mambavision, vmamba

from support.norms import randomize_norms

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: see tests/conftest.py

FAMILIES = {  # name: (model arguments, the widths of the raw maps at strides 4 / 8 / 16 / 32)
    "test_vim": (dict(patch_size=16, stride=16), [32, 32, 32, 32]),
    "test_vmamba": ({}, [16, 32, 64, 128]),
    "test_mambavision": ({}, [16, 32, 64, 128]),
}
OFFICIAL_FORMAT = {  # name: the released file's layout of a state dict
    "test_vim": lambda state: {"model": state},
    "test_vmamba": lambda state: {"model": vmamba.to_official_state_dict(state)},
    "test_mambavision": lambda state: {
        "state_dict": {f"module.{k}": v for k, v in mambavision.to_official_state_dict(state).items()}
    },
}
RCNN_SETTINGS = dict(  # few proposals and sampled boxes (a fast CPU step), every detection kept (random weights score low)
    rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=50, rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=50,
    box_batch_size_per_image=32, box_detections_per_img=10, box_score_thresh=0.0,
)  # fmt: skip
DENSE_SETTINGS = dict(topk_candidates=100, detections_per_img=10, score_thresh=0.0)
DETECTORS = {
    "FasterRCNN": (FasterRCNN, RCNN_SETTINGS),
    "MaskRCNN": (MaskRCNN, RCNN_SETTINGS),
    "RetinaNet": (RetinaNet, DENSE_SETTINGS),
    "FCOS": (FCOS, DENSE_SETTINGS),
}


def _backbone(name: str, **kwargs) -> vim.dense.DenseBackbone:
    return vim.dense.backbone(name, **{**FAMILIES[name][0], **kwargs})


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_maps_have_torchvisions_keys_strides_and_channels(name: str) -> None:
    """With the FPN: "0".."3" at strides 4..32 and "pool" at 64, all of width out_channels (an int); without: "0".."3"
    of the family's widths, out_channels that list."""
    torch.manual_seed(0)
    images = torch.randn(2, 3, 64, 128)
    with_fpn = _backbone(name, out_channels=24).eval()
    raw = _backbone(name, fpn=False).eval()
    with torch.no_grad():
        maps, raw_maps = with_fpn(images), raw(images)
    assert with_fpn.out_channels == 24 and raw.out_channels == FAMILIES[name][1]
    assert list(maps) == ["0", "1", "2", "3", "pool"] and list(raw_maps) == ["0", "1", "2", "3"]
    assert [tuple(x.shape) for x in maps.values()] == [(2, 24, 64 // s, 128 // s) for s in (4, 8, 16, 32, 64)]
    assert [tuple(x.shape) for x in raw_maps.values()] == [
        (2, c, 64 // s, 128 // s) for c, s in zip(FAMILIES[name][1], (4, 8, 16, 32))
    ]


@pytest.mark.parametrize("name", ["test_vmamba", "test_mambavision"])
def test_hierarchical_maps_are_the_stages_at_any_image_size(name: str) -> None:
    """A 70 x 90 image (no multiple of 32): the raw maps are the trunk's four stage outputs, ceil(side / stride) on each
    side (3x3 stride-2 convs with padding 1 round up), VMamba's through a LayerNorm over the channels (eps 1e-5, its
    MM_VSSM's ``outnorm{i}``), and the FPN's maps take their sizes."""
    torch.manual_seed(0)
    images = torch.randn(1, 3, 70, 90)
    backbone = _backbone(name).eval()
    with torch.no_grad():
        raw = backbone.body(images)
        stages = backbone.body.trunk.forward_intermediates(images, output_fmt="NCHW", intermediates_only=True)
        maps = backbone(images)
    assert [x.shape[-2:] for x in raw] == [(math.ceil(70 / s), math.ceil(90 / s)) for s in (4, 8, 16, 32)]
    if name == "test_vmamba":
        norms = backbone.body.norms
        stages = [
            F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], n.weight, n.bias, eps=1e-5).permute(0, 3, 1, 2)
            for x, n in zip(stages, norms, strict=True)
        ]
    else:
        assert backbone.body.norms is None
    for ours, stage in zip(raw, stages, strict=True):
        torch.testing.assert_close(ours, stage, rtol=0, atol=0)
    assert [maps[str(i)].shape[-2:] for i in range(4)] == [x.shape[-2:] for x in raw]


def _reference_pyramid(maps: list[torch.Tensor], pyramid: vim.dense.SimpleFeaturePyramid) -> list[torch.Tensor]:
    """ViTDet's simple pyramid on stride-16 maps, written out with the pyramid's weights: deconv, LayerNorm over the
    channels, GELU, deconv (stride 4); deconv (8); the map (16); 2x2 max-pool (32)."""
    up4, up2 = pyramid.levels[0], pyramid.levels[1]
    fine, middle, same, coarse = maps if len(maps) == 4 else maps * 4
    x = F.conv_transpose2d(fine, up4[0].weight, up4[0].bias, stride=2)
    x = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), up4[1].weight, up4[1].bias, eps=1e-6).permute(0, 3, 1, 2)
    x = F.conv_transpose2d(F.gelu(x), up4[3].weight, up4[3].bias, stride=2)
    return [x, F.conv_transpose2d(middle, up2[0].weight, up2[0].bias, stride=2), same, F.max_pool2d(coarse, 2)]


@pytest.mark.parametrize("layers", [None, (0, 1, 2, 3)])
def test_flat_pyramid_is_vitdets_on_the_trunks_intermediates(layers) -> None:
    """The raw maps of a flat trunk are the simple pyramid on forward_intermediates' "NCHW" maps of the last block
    (every level) or of blocks 0..3 (level i from block i), at strides 4 / 8 / 16 / 32 of the 64 x 96 image."""
    torch.manual_seed(0)
    backbone = _backbone("test_vim", fpn=False, layers=layers).eval()
    randomize_norms(backbone, torch.Generator().manual_seed(1))
    images = torch.randn(2, 3, 64, 96)
    indices = [-1] if layers is None else list(layers)
    with torch.no_grad():
        maps = list(backbone(images).values())
        blocks = backbone.body.trunk.forward_intermediates(images, indices=indices, output_fmt="NCHW", intermediates_only=True)
        expected = _reference_pyramid(blocks, backbone.body.pyramid)
    assert [tuple(x.shape) for x in expected] == [(2, 32, 64 // s, 96 // s) for s in (4, 8, 16, 32)]
    for ours, reference in zip(maps, expected, strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_flat_grids_that_do_not_tile_and_wrong_layers_are_refused() -> None:
    """test_vim's overlapping patches (8 px at stride 4: a 15 x 15 grid on 64 px) and a side that is no multiple of
    the stride are named; so are layers that are not 1 or 4 increasing blocks, and layers for a hierarchical trunk."""
    with pytest.raises(ValueError, match=r"test_vim: its 15x15 token grid at stride 4 covers 60x60 pixels of the 64x64"):
        vim.dense.backbone("test_vim")(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match=r"4x4 token grid at stride 16 covers 64x64 pixels of the 72x72 image"):
        _backbone("test_vim")(torch.randn(1, 3, 72, 72))
    for layers in [(0, 1), (3, 2, 1, 0)]:
        with pytest.raises(ValueError, match=r"take 1 block of test_vim \(for every level\) or 4 distinct ones"):
            _backbone("test_vim", layers=layers)
    with pytest.raises(ValueError, match=r"test_vmamba is hierarchical"):
        vim.dense.backbone("test_vmamba", layers=(-1,))


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_weights_from_a_file_load_as_timm_loads_them(name: str, tmp_path) -> None:
    """A released-format file (official key names, a 1000-class head) gives the backbone the file's trunk tensors, as
    timm.create_model(pretrained=True, pretrained_cfg_overlay=dict(file=...)) does; the head is dropped."""
    torch.manual_seed(0)
    source = timm.create_model(name, **FAMILIES[name][0])
    path = tmp_path / "weights.pth"
    torch.save(OFFICIAL_FORMAT[name](source.state_dict()), path)
    torch.manual_seed(1)
    loaded = _backbone(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).body.trunk.state_dict()
    random = _backbone(name).body.trunk.state_dict()
    expected = source.state_dict()
    assert not any(key.startswith(("head.", "norm_f.")) for key in loaded)  # pruned
    key = next(key for key in loaded if "mixer" in key and key.endswith("weight"))  # a Mamba mixer's tensor
    assert not torch.equal(random[key], expected[key])
    for key, value in loaded.items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)


def _targets(sizes: list[tuple[int, int]], generator: torch.Generator, masks: bool) -> list[dict[str, torch.Tensor]]:
    """Three random boxes (at least 8 px wide) per image, random labels 1..2, and with ``masks`` their box masks."""
    targets = []
    for height, width in sizes:
        corner = torch.rand(3, 2, generator=generator) * torch.tensor([width - 16, height - 16])
        boxes = torch.cat([corner, corner + 8 + torch.rand(3, 2, generator=generator) * 8], dim=1)
        target = {"boxes": boxes, "labels": torch.randint(1, 3, (3,), generator=generator)}
        if masks:
            target["masks"] = torch.zeros(3, height, width, dtype=torch.uint8)
            for mask, (x0, y0, x1, y1) in zip(target["masks"], boxes.int().tolist()):
                mask[y0:y1, x0:x1] = 1
        targets.append(target)
    return targets


@pytest.mark.parametrize("detector", sorted(DETECTORS))
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_detector_trains_and_detects(name: str, detector: str) -> None:
    """Two SGD steps on two images of different sizes (torchvision resizes them to 64 px and pads the batch to 32):
    finite losses, a gradient on every backbone parameter (trunk, pyramid, FPN); then eval mode returns detections."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    detector_cls, settings = DETECTORS[detector]
    backbone = _backbone(name, out_channels=32)
    model = detector_cls(backbone, num_classes=3, min_size=64, max_size=96, **settings)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    sizes = [(64, 64), (56, 72)]
    images = [torch.rand(3, height, width, generator=generator) for height, width in sizes]
    for _ in range(2):
        losses = model(images, _targets(sizes, generator, masks=detector == "MaskRCNN"))
        optimizer.zero_grad()
        sum(losses.values()).backward()
        assert all(torch.isfinite(loss) for loss in losses.values()), losses
        missing = [key for key, p in backbone.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
        assert not missing, f"no gradient reached {missing}"
        optimizer.step()
    model.eval()
    with torch.no_grad():
        detections = model(images)
    for (height, width), found in zip(sizes, detections, strict=True):
        count = len(found["boxes"])
        assert count > 0 and found["boxes"].shape == (count, 4) and found["scores"].shape == found["labels"].shape == (count,)
        assert (found["boxes"] >= 0).all() and (found["boxes"][:, 2] <= width).all() and (found["boxes"][:, 3] <= height).all()
        if detector == "MaskRCNN":
            assert found["masks"].shape == (count, 1, height, width)
