"""The hierarchical trunk through the timm API every layout shares: test_hier_mamba's stages, features and grouping."""

from __future__ import annotations

import re

import pytest
import timm
import torch
from torch import nn

from vim.models.backbone import MambaBackbone
from vim.models.hierarchical import HierarchicalMamba
from vim.models.timm_api import TimmBackbone

DIMS, REDUCTIONS = [16, 32, 64, 128], [4, 8, 16, 32]


def _model(**kwargs) -> HierarchicalMamba:
    torch.manual_seed(0)
    return timm.create_model("test_hier_mamba", kernel_backend="torch", **kwargs)


def _stage_outputs(model: HierarchicalMamba, x: torch.Tensor) -> list[torch.Tensor]:
    """Each stage's output as NCHW, written out from the modules: stem, then downsample conv and each block's
    pre-norm residual step ``x + mixer(norm(x))``."""
    maps, tokens = [], model.patch_embed.proj(x)  # (B, 16, H/4, W/4)
    for stage in model.stages:
        if stage.downsample is not None:
            tokens = stage.downsample.conv(tokens)
        grid = tokens.shape[2:]
        seq = tokens.flatten(2).transpose(1, 2)
        for block in stage.blocks:
            seq = seq + block.mixer(nn.functional.layer_norm(seq, seq.shape[-1:], block.norm.weight, block.norm.bias))
        tokens = seq.transpose(1, 2).unflatten(2, grid)
        maps.append(tokens)
    return maps


def test_shared_api_serves_both_layouts() -> None:
    model = _model()
    assert isinstance(model, TimmBackbone) and not isinstance(model, MambaBackbone)
    assert [type(stage.downsample).__name__ for stage in model.stages] == ["NoneType", *["GridDownsample"] * 3]


def test_features_only_gives_one_nchw_map_per_stage() -> None:
    model = _model().eval()
    features = timm.create_model("test_hier_mamba", features_only=True, kernel_backend="torch")
    features.model.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith(("head", "norm_f"))})
    assert features.feature_info.reduction() == REDUCTIONS and features.feature_info.channels() == DIMS
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        maps, expected = features(x), _stage_outputs(model, x)
    assert [tuple(m.shape) for m in maps] == [(2, c, 64 // r, 64 // r) for c, r in zip(DIMS, REDUCTIONS)]
    for got, want in zip(maps, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_forward_intermediates_numbers_stages() -> None:
    model = _model().eval()
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        expected = _stage_outputs(model, x)
        final, maps = model.forward_intermediates(x, indices=[1, -1])
        tokens = model.forward_intermediates(x, indices=2, output_fmt="NLC", intermediates_only=True)
        normed = model.forward_intermediates(x, indices=[3], norm=True, intermediates_only=True)[0]
        early = model.forward_intermediates(x, indices=[0], stop_early=True, intermediates_only=True)[0]
    torch.testing.assert_close(final, model.forward_features(x))  # (B, L_3, 128) normalised last stage
    torch.testing.assert_close(maps[0], expected[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(maps[1], expected[3], rtol=1e-5, atol=1e-5)
    assert [tuple(t.shape) for t in tokens] == [(2, 4 * 2, 64), (2, 2 * 1, 128)]  # (B, H_i * W_i, C_i)
    torch.testing.assert_close(tokens[1], expected[3].flatten(2).transpose(1, 2), rtol=1e-5, atol=1e-5)
    last = expected[3].movedim(1, -1)
    reference = nn.functional.layer_norm(last, (128,), model.norm_f.weight, model.norm_f.bias).movedim(-1, 1)
    torch.testing.assert_close(normed, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(early, expected[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="indices="):
        model.forward_intermediates(x, indices=[4])


def test_prune_intermediate_layers_drops_later_stages() -> None:
    model = _model()
    assert model.prune_intermediate_layers([0, 1], prune_norm=True) == [0, 1]
    assert len(model.stages) == 2 and isinstance(model.norm_f, nn.Identity) and model.num_classes == 0
    maps = model.forward_intermediates(torch.randn(1, 3, 32, 32), indices=2, intermediates_only=True)
    assert [m.shape[1] for m in maps] == [16, 32]


def test_group_matcher_groups_stages_then_norm() -> None:
    model = _model()
    matcher = model.group_matcher()
    groups = [
        (name, pattern) for pattern, _ in matcher["blocks"] for name, _ in model.named_parameters() if re.match(pattern, name)
    ]
    names = {name for name, _ in model.named_parameters()}
    stem = {name for name in names if re.match(matcher["stem"], name)}
    assert stem == {"patch_embed.proj.weight", "patch_embed.proj.bias"}
    assert {name for name, _ in groups} | stem | {n for n in names if n.startswith("head")} == names
    assert "stages.2.downsample.conv.weight" in {name for name, _ in groups}
    assert model.no_weight_decay() == set()  # no position embedding; timm's rule leaves 1-D parameters undecayed


def test_gradient_checkpointing_gives_the_same_outputs_and_grads() -> None:
    x = torch.randn(2, 3, 32, 32)
    results = []
    for enable in (False, True):
        model = _model()
        model.set_grad_checkpointing(enable)
        assert model.grad_checkpointing is enable
        out = model(x)
        out.square().mean().backward()
        results.append((out.detach(), {n: p.grad for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=0)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, msg=name)
