"""VMamba on the shared hierarchical trunk against upstream: the official parameter counts and key layout, the
whole classifier's logits against a float64 re-implementation of upstream's ``VSSM`` forward, and timm's API.

The expected logits come from ``tests/reference/vmamba.py`` (``official_vssm_forward``: channels-first, LayerNorm2d,
Linear2d as 1x1 convs, the sequential scan), fed the same random official-format state dict that the model loads
from a temporary ``{"model": state_dict}`` file, the released layout. Nothing is downloaded.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import timm
import torch

from vim.models.vmamba import checkpoint_filter_fn, to_official_state_dict

from reference.vmamba import official_vssm_forward, official_vssm_shapes, official_vssm_state_dict

# (dims, depths, ssm_ratio) of upstream's builders (vmamba.py) and configs (vmambav2*_224.yaml)
OFFICIAL_CONFIGS = {
    "vmamba_tiny_s1l8": ([96, 192, 384, 768], [2, 2, 8, 2], 1.0),
    "vmamba_small_s2l15": ([96, 192, 384, 768], [2, 2, 15, 2], 2.0),
    "vmamba_base_s2l15": ([128, 256, 512, 1024], [2, 2, 15, 2], 2.0),
}
# the README's rounded parameter counts (millions); the tiny builder's exact count
README_MILLIONS = {"vmamba_tiny_s1l8": 30, "vmamba_small_s2l15": 50, "vmamba_base_s2l15": 89}
TINY_PARAMETERS = 30_249_064
TEST_CONFIG = ([16, 32, 64, 128], [1, 1, 1, 1], 2.0)  # test_vmamba


def _count(shapes: dict[str, tuple]) -> int:
    return sum(math.prod(shape) for shape in shapes.values())


def test_tiny_has_the_official_parameter_count() -> None:
    model = timm.create_model("vmamba_tiny_s1l8", device="meta")
    assert sum(p.numel() for p in model.parameters()) == TINY_PARAMETERS
    assert _count(official_vssm_shapes(*OFFICIAL_CONFIGS["vmamba_tiny_s1l8"])) == TINY_PARAMETERS  # the reference too


@pytest.mark.parametrize("name", sorted(OFFICIAL_CONFIGS))
def test_state_dict_is_upstreams_under_its_names(name: str) -> None:
    """Every key and shape of upstream's VSSM for the config, once renamed; the count rounds to the README's."""
    model = timm.create_model(name, device="meta")
    ours = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    official = official_vssm_shapes(*OFFICIAL_CONFIGS[name])
    assert {key: tuple(v.shape) for key, v in to_official_state_dict(model.state_dict()).items()} == official
    assert round(_count(official) / 1e6) == README_MILLIONS[name]
    assert sum(p.numel() for p in model.parameters()) == _count(official)
    # and back: upstream's names map onto ours
    renamed = checkpoint_filter_fn({key: torch.empty(shape, device="meta") for key, shape in official.items()}, model)
    assert {key: tuple(v.shape) for key, v in renamed.items()} == ours


def test_registered_configs_are_upstreams() -> None:
    """Drop path (the configs' DROP_PATH_RATE on the last block), crop, interpolation, weights file."""
    rates = {"vmamba_tiny_s1l8": 0.2, "vmamba_small_s2l15": 0.3, "vmamba_base_s2l15": 0.6}
    files = {
        "vmamba_tiny_s1l8": "vssm1_tiny_0230s_ckpt_epoch_264.pth",
        "vmamba_small_s2l15": "vssm_small_0229_ckpt_epoch_222.pth",
        "vmamba_base_s2l15": "vssm_base_0229_ckpt_epoch_237.pth",
    }
    for name, rate in rates.items():
        model = timm.create_model(name, device="meta")
        assert model.drop_path.drop_prob == pytest.approx(rate)
        cfg = model.pretrained_cfg
        assert cfg["tag"] == "in1k" and cfg["url"].endswith("/%23v2cls/" + files[name])
        assert (cfg["crop_pct"], cfg["interpolation"], cfg["num_classes"]) == (0.875, "bicubic", 1000)


def _official_file(tmp_path: Path, generator: torch.Generator) -> tuple[Path, dict[str, torch.Tensor]]:
    state = official_vssm_state_dict(official_vssm_shapes(*TEST_CONFIG), generator)
    path = tmp_path / "vssm_ckpt_epoch_1.pth"
    torch.save({"model": state, "epoch": 1}, path)
    return path, state


TOLERANCES = {torch.float64: dict(rtol=1e-6, atol=1e-6), torch.float32: dict(rtol=1e-4, atol=1e-4)}  # as test_ss2d


@pytest.mark.parametrize("size", [(64, 64), (64, 96)], ids=["square", "non-square"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_logits_match_the_official_forward(tmp_path: Path, size: tuple[int, int], dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    path, state = _official_file(tmp_path, generator)
    model = timm.create_model("test_vmamba", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    model = model.to(dtype).eval()
    images = torch.randn(2, 3, *size, generator=generator)
    with torch.no_grad():
        logits = model(images.to(dtype))
    expected = official_vssm_forward(state, images, TEST_CONFIG[1])
    torch.testing.assert_close(logits.double(), expected, **TOLERANCES[dtype])


def test_features_and_intermediates_on_a_non_square_image() -> None:
    images = torch.randn(1, 3, 64, 96)
    features = timm.create_model("test_vmamba", features_only=True).eval()
    assert features.feature_info.reduction() == [4, 8, 16, 32]
    maps = features(images)
    assert [tuple(m.shape) for m in maps] == [(1, 16, 16, 24), (1, 32, 8, 12), (1, 64, 4, 6), (1, 128, 2, 3)]
    model = timm.create_model("test_vmamba").eval()
    trunk = {key.removeprefix("model."): value for key, value in features.state_dict().items()}
    assert model.load_state_dict(trunk, strict=False).missing_keys == ["norm_f.weight", "norm_f.bias", "head.weight", "head.bias"]
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(images)
        for got, expected in zip(intermediates, maps):
            torch.testing.assert_close(got, expected)
        torch.testing.assert_close(model.forward_head(final), model(images))


def test_a_tensor_of_the_wrong_shape_is_named(tmp_path: Path) -> None:
    path, state = _official_file(tmp_path, torch.Generator().manual_seed(0))
    state["layers.1.downsample.1.weight"] = torch.zeros(64, 32, 2, 2)  # downsample v1/v2's kernel, not v3's
    torch.save({"model": state}, path)
    with pytest.raises(ValueError, match=r"'stages\.2\.downsample\.conv\.weight' has shape \(64, 32, 2, 2\)"):
        timm.create_model("test_vmamba", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
