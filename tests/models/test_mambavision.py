"""MambaVision on the shared hierarchical trunk against upstream: the official parameter counts and key layout, the
whole classifier's logits against a float64 re-implementation of upstream's ``MambaVision`` forward, the windows,
and timm's API.

The expected logits come from ``tests/reference/mambavision.py`` (``official_model_forward``: channels-first,
BatchNorm in eval mode, upstream's ``window_partition`` / ``window_reverse`` with its zero padding, the sequential
scan), fed the same random official-format state dict that the model loads from a temporary ``.pth.tar`` file with
the weights under ``"state_dict"``, the released layout. Nothing is downloaded.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import timm
import torch

from vim.models.hierarchical import merge_windows, partition_windows
from vim.models.mambavision import attention_blocks, checkpoint_filter_fn, to_official_state_dict

from reference.mambavision import (
    official_model_forward,
    official_model_shapes,
    official_parameter_count,
    official_state_dict,
    official_transformer_blocks,
)

# (dim, in_dim, depths, num_heads, layer_scale) of upstream's builders (mamba_vision.py), and its README's parameter
# counts in millions (one decimal, as printed there)
OFFICIAL_CONFIGS = {
    "mambavision_tiny": (80, 32, [1, 3, 8, 4], [2, 4, 8, 16], False),
    "mambavision_tiny2": (80, 32, [1, 3, 11, 4], [2, 4, 8, 16], False),
    "mambavision_small": (96, 64, [3, 3, 7, 5], [2, 4, 8, 16], False),
    "mambavision_base": (128, 64, [3, 3, 10, 5], [2, 4, 8, 16], True),
    "mambavision_large": (196, 64, [3, 3, 10, 5], [4, 8, 16, 32], True),
    "mambavision_large2": (196, 64, [3, 3, 12, 5], [4, 8, 16, 32], True),
    "mambavision_large3_256": (256, 64, [3, 3, 20, 10], [4, 8, 16, 32], True),
}
README_MILLIONS = {
    "mambavision_tiny": 31.8,
    "mambavision_tiny2": 35.1,
    "mambavision_small": 50.1,
    "mambavision_base": 97.7,
    "mambavision_large": 227.9,
    "mambavision_large2": 241.5,
    "mambavision_large3_256": 739.6,
}
TINY_PARAMETERS = 31_794_248
# test_mambavision: (dim, in_dim, depths, num_heads), window sizes
TEST_CONFIG = (16, 8, [1, 1, 3, 2], [1, 2, 2, 4])
TEST_WINDOWS = [8, 8, 3, 2]


def test_tiny_has_the_official_parameter_count() -> None:
    model = timm.create_model("mambavision_tiny", device="meta")
    assert sum(p.numel() for p in model.parameters()) == TINY_PARAMETERS
    assert official_parameter_count(official_model_shapes(*OFFICIAL_CONFIGS["mambavision_tiny"][:4])) == TINY_PARAMETERS


@pytest.mark.parametrize("name", sorted(OFFICIAL_CONFIGS))
def test_state_dict_is_upstreams_under_its_names(name: str) -> None:
    """Every key and shape of upstream's MambaVision for the config, once renamed; the count is the README's."""
    model = timm.create_model(name, device="meta")
    official = official_model_shapes(*OFFICIAL_CONFIGS[name])
    assert {key: tuple(v.shape) for key, v in to_official_state_dict(model.state_dict()).items()} == official
    count = sum(p.numel() for p in model.parameters())
    assert count == official_parameter_count(official)
    assert abs(count / 1e6 - README_MILLIONS[name]) < 0.1
    # and back: upstream's names map onto ours
    renamed = checkpoint_filter_fn({key: torch.empty(shape, device="meta") for key, shape in official.items()}, model)
    assert {key: tuple(v.shape) for key, v in renamed.items()} == {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_registered_configs_are_upstreams() -> None:
    """Hub files, crops, input sizes, windows, the non-commercial licence on every released tag."""
    expected = {  # upstream's default_cfgs: (Hub repository, file, crop_pct, crop_mode, input side)
        "mambavision_tiny.in1k": ("MambaVision-T-1K", "mambavision_tiny_1k.pth.tar", 1.0, "center", 224),
        "mambavision_tiny2.in1k": ("MambaVision-T2-1K", "mambavision_tiny2_1k.pth.tar", 0.98, "center", 224),
        "mambavision_small.in1k": ("MambaVision-S-1K", "mambavision_small_1k.pth.tar", 0.93, "center", 224),
        "mambavision_base.in1k": ("MambaVision-B-1K", "mambavision_base_1k.pth.tar", 1.0, "center", 224),
        "mambavision_base.in21k_ft_in1k": ("MambaVision-B-21K", "mambavision_base_21k.pth.tar", 1.0, "center", 224),
        "mambavision_large.in1k": ("MambaVision-L-1K", "mambavision_large_1k.pth.tar", 1.0, "center", 224),
        "mambavision_large.in21k_ft_in1k": ("MambaVision-L-21K", "mambavision_large_21k.pth.tar", 1.0, "center", 224),
        "mambavision_large2.in1k": ("MambaVision-L2-1K", "mambavision_large2_1k.pth.tar", 1.0, "center", 224),
        "mambavision_large2_512.in21k_ft_in1k": (
            "MambaVision-L2-512-21K",
            "mambavision_L2_21k_240m_512.pth.tar",
            0.93,
            "squash",
            512,
        ),
        "mambavision_large3_256.in21k_ft_in1k": (
            "MambaVision-L3-256-21K",
            "mambavision_L3_21k_740m_256.pth.tar",
            1.0,
            "center",
            256,
        ),
        "mambavision_large3_512.in21k_ft_in1k": (
            "MambaVision-L3-512-21K",
            "mambavision_L3_21k_740m_512.pth.tar",
            0.93,
            "squash",
            512,
        ),
    }
    assert sorted(timm.list_pretrained("mambavision*")) == sorted(expected)
    windows = {224: (14, 7), 256: (16, 8), 512: (32, 16)}
    for tag, (hub, filename, crop_pct, crop_mode, side) in expected.items():
        model = timm.create_model(tag, device="meta")
        cfg = model.pretrained_cfg
        assert (cfg["hf_hub_id"], cfg["hf_hub_filename"]) == (f"nvidia/{hub}", filename)
        assert (cfg["crop_pct"], cfg["crop_mode"], cfg["input_size"]) == (crop_pct, crop_mode, (3, side, side))
        assert cfg["license"] == "cc-by-nc-sa-4.0"
        assert model.nominal_input_shape() == (3, side, side)
        assert tuple(stage.window_size for stage in model.stages[2:]) == windows[side], "one window per stage at its size"
    assert timm.create_model("mambavision_tiny", device="meta").drop_path.drop_prob == pytest.approx(0.2)


def test_attention_blocks_are_upstreams_transformer_blocks() -> None:
    for depth in range(1, 21):
        assert list(attention_blocks(depth)) == official_transformer_blocks(depth)
    model = timm.create_model("mambavision_tiny", device="meta")
    kinds = [[type(block.mixer).__name__ for block in stage.blocks] for stage in model.stages[2:]]
    assert kinds == [["MambaVisionMixer"] * 4 + ["Attention"] * 4, ["MambaVisionMixer"] * 2 + ["Attention"] * 2]


@pytest.mark.parametrize("grid, window", [((4, 4), 3), ((4, 6), 3), ((2, 3), 2), ((7, 7), 7), ((3, 5), 8)])
def test_windows_are_upstreams_and_merge_back(grid: tuple[int, int], window: int) -> None:
    """Our channels-last windows equal upstream's ``window_partition`` of the zero-padded (B, C, H, W) map."""
    from reference.mambavision import _window_partition

    tokens = torch.randn(2, grid[0] * grid[1], 5)
    windows = partition_windows(tokens, grid, window)
    height, width = (-(-side // window) * window for side in grid)
    padded = torch.zeros(2, 5, height, width)
    padded[:, :, : grid[0], : grid[1]] = tokens.transpose(1, 2).unflatten(2, grid)
    torch.testing.assert_close(windows, _window_partition(padded, window), rtol=0, atol=0)
    torch.testing.assert_close(merge_windows(windows, grid, window), tokens, rtol=0, atol=0)


def _official_file(tmp_path: Path, generator: torch.Generator, layer_scale: bool) -> tuple[Path, dict[str, torch.Tensor]]:
    state = official_state_dict(official_model_shapes(*TEST_CONFIG, layer_scale=layer_scale), generator)
    path = tmp_path / "mambavision_test_1k.pth.tar"
    torch.save({"state_dict": {f"module.{key}": value for key, value in state.items()}, "epoch": 1}, path)
    return path, state


TOLERANCES = {torch.float64: dict(rtol=1e-6, atol=1e-6), torch.float32: dict(rtol=1e-4, atol=1e-4)}


@pytest.mark.parametrize("size", [(64, 64), (64, 96), (32, 32)], ids=["square", "non-square", "one-window"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("layer_scale", [False, True], ids=["plain", "layer-scale"])
def test_logits_match_the_official_forward(tmp_path: Path, size, dtype: torch.dtype, layer_scale: bool) -> None:
    """At 64 x 64 the third stage (4 x 4) is padded to four 3 x 3 windows and the fourth (2 x 2) is one window; at
    64 x 96 the fourth (2 x 3) is two windows; at 32 x 32 every stage fits one padded window."""
    generator = torch.Generator().manual_seed(0)
    path, state = _official_file(tmp_path, generator, layer_scale)
    model = timm.create_model(
        "test_mambavision", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
        layer_scale=1e-5 if layer_scale else None,
    )  # fmt: skip
    model = model.to(dtype).eval()
    images = torch.randn(2, 3, *size, generator=generator)
    with torch.no_grad():
        logits = model(images.to(dtype))
    expected = official_model_forward(state, images, TEST_CONFIG[2], TEST_CONFIG[3], TEST_WINDOWS)
    torch.testing.assert_close(logits.double(), expected, **TOLERANCES[dtype])


def test_hub_transformers_keys_load(tmp_path: Path) -> None:
    """The Hub's ``transformers`` copy keeps the model under ``model.``: those files load too."""
    path, state = _official_file(tmp_path, torch.Generator().manual_seed(1), layer_scale=False)
    from safetensors.torch import save_file

    hub_file = tmp_path / "model.safetensors"
    save_file({f"model.{key}": value.contiguous() for key, value in state.items()}, hub_file)
    from_pth = timm.create_model("test_mambavision", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    from_hub = timm.create_model("test_mambavision", pretrained=True, pretrained_cfg_overlay=dict(file=str(hub_file)))
    for (key, ours), theirs in zip(from_pth.state_dict().items(), from_hub.state_dict().values()):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0, msg=key)


def test_features_and_intermediates_on_a_non_square_image() -> None:
    images = torch.randn(1, 3, 64, 96)
    features = timm.create_model("test_mambavision", features_only=True).eval()
    assert features.feature_info.reduction() == [4, 8, 16, 32]
    maps = features(images)
    assert [tuple(m.shape) for m in maps] == [(1, 16, 16, 24), (1, 32, 8, 12), (1, 64, 4, 6), (1, 128, 2, 3)]
    model = timm.create_model("test_mambavision").eval()
    trunk = {key.removeprefix("model."): value for key, value in features.state_dict().items()}
    missing = model.load_state_dict(trunk, strict=False).missing_keys
    assert sorted(missing) == sorted(
        ["norm_f.weight", "norm_f.bias", "norm_f.running_mean", "norm_f.running_var", "head.weight", "head.bias"]
    )
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(images)
        for got, expected in zip(intermediates, maps):
            torch.testing.assert_close(got, expected)
        torch.testing.assert_close(model.forward_head(final), model(images))


def test_training_step_updates_every_parameter() -> None:
    """Training mode (BatchNorm on batch statistics, windows, attention, the scan's backward): finite gradients
    reaching every parameter."""
    model = timm.create_model("test_mambavision", num_classes=5, layer_scale=1e-5).train()
    loss = torch.nn.functional.cross_entropy(model(torch.randn(3, 3, 64, 96)), torch.tensor([0, 1, 4]))
    loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    assert math.isfinite(loss.item())


def test_a_tensor_of_the_wrong_shape_is_named(tmp_path: Path) -> None:
    path, state = _official_file(tmp_path, torch.Generator().manual_seed(0), layer_scale=False)
    state["levels.1.downsample.reduction.0.weight"] = torch.zeros(64, 32, 2, 2)
    torch.save({"state_dict": state}, path)
    with pytest.raises(ValueError, match=r"'stages\.2\.downsample\.conv\.weight' has shape \(64, 32, 2, 2\)"):
        timm.create_model("test_mambavision", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
