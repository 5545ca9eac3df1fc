"""The shared trunk: its norm choice against the pre-norm residual definition, head reset, pooling, weight decay."""

from __future__ import annotations

import re
from functools import partial

import pytest
import timm
import torch
from timm.layers import Attention
from torch import nn

from vim.models import MambaBackbone, MambaMixer

from support.norms import randomize_norms


class TokenBackbone(MambaBackbone):
    """The trunk alone on (B, L, D) tokens: no class token, no stem."""

    pool_types = ("avg", "max", "catavgmax", "")
    num_prefix_tokens = 0

    def __init__(
        self,
        norm_layer: str = "rmsnorm",
        directions: int = 2,
        global_pool: str = "avg",
        kernel_backend: str = "torch",
        drop_path_rate: float = 0.0,
        depth: int = 3,
        **trunk_kwargs,
    ) -> None:
        super().__init__()
        self.init_head_attributes(3, global_pool, 16)
        self.build_trunk(
            16, depth, drop_path_rate, norm_layer=norm_layer, directions=directions, d_state=4, kernel_backend=kernel_backend,
            **trunk_kwargs,
        )  # fmt: skip
        self.head_drop = nn.Identity()
        self.head = self.linear_head(3)
        self.init_trunk_weights()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_trunk(x)


def _randomize_norms(model: nn.Module) -> None:
    randomize_norms(model, torch.Generator().manual_seed(1))


@pytest.mark.parametrize(("norm_layer", "norm_type"), [("layernorm", nn.LayerNorm), ("rmsnorm", nn.RMSNorm)])
@pytest.mark.parametrize("directions", [1, 2])
def test_trunk_is_the_pre_norm_residual_chain(norm_layer: str, norm_type: type, directions: int) -> None:
    """forward_trunk = final_norm(x_L) with x_{i+1} = x_i + mixer_i(norm_i(x_i)), as PointMamba's blocks write it."""
    torch.manual_seed(0)
    model = TokenBackbone(norm_layer, directions).eval()
    _randomize_norms(model)
    assert all(isinstance(layer.norm, norm_type) for layer in model.layers) and isinstance(model.norm_f, norm_type)
    assert all(layer.mixer.directions == directions for layer in model.layers)

    def norm(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
        if norm_layer == "layernorm":
            return nn.functional.layer_norm(x, (16,), module.weight, module.bias, 1e-5)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * module.weight

    x = torch.randn(2, 7, 16)
    expected = x
    for layer in model.layers:
        expected = expected + layer.mixer(norm(expected, layer.norm))
    expected = norm(expected, model.norm_f)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), expected, rtol=1e-5, atol=1e-5)


def test_trunk_places_another_mixer_at_given_layers() -> None:
    """layer_mixers={1: attention, 3: attention}: self-attention mixes in blocks 1 and 3, Mamba in 0 and 2, each block
    still the pre-norm residual step; forward and backward reach every block's parameters."""
    torch.manual_seed(0)
    attention = partial(Attention, num_heads=2, qkv_bias=True)
    model = TokenBackbone(depth=4, layer_mixers={1: attention, 3: attention})
    assert [type(layer.mixer) for layer in model.layers] == [MambaMixer, Attention, MambaMixer, Attention]
    assert {"layers.1.mixer.qkv.weight", "layers.3.mixer.proj.bias", "layers.2.mixer.A_b_log"} <= set(model.state_dict())
    x = torch.randn(2, 7, 16)
    expected = x
    for layer in model.layers:
        expected = expected + layer.mixer(nn.functional.rms_norm(expected, (16,), layer.norm.weight, 1e-5))
    features = model.forward_features(x)
    torch.testing.assert_close(features, nn.functional.rms_norm(expected, (16,), model.norm_f.weight, 1e-5))
    features.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.layers.parameters())


def test_layer_mixers_outside_the_trunk_are_named() -> None:
    with pytest.raises(ValueError, match=r"layer_mixers names blocks \[-1, 3\], but the trunk has blocks 0..2"):
        TokenBackbone(layer_mixers={3: Attention, -1: Attention})


@pytest.mark.parametrize("norm_layer", ["rmsnorm", "layernorm"])
def test_fused_kernels_give_the_pytorch_trunk(norm_layer: str) -> None:
    """backend="triton" (the add + norm, conv and scan kernels; the interpreter without CUDA) gives the "torch" trunk's
    output and every gradient, in training mode with stochastic depth (the same draws) and random norm weights.

    One direction keeps the interpreter's time down; the mixer's tests cover both.
    """
    torch.manual_seed(0)
    reference = TokenBackbone(norm_layer, directions=1, drop_path_rate=0.5).train()
    _randomize_norms(reference)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fused = TokenBackbone(norm_layer, directions=1, kernel_backend="triton", drop_path_rate=0.5).to(device).train()
    fused.load_state_dict(reference.state_dict())
    x, grad_out = torch.randn(1, 5, 16), torch.randn(1, 5, 16)

    def run(model: TokenBackbone) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        device = next(model.parameters()).device
        tokens = x.to(device).requires_grad_()
        torch.manual_seed(1)  # the same stochastic-depth draws
        out = model.forward_features(tokens)
        (out * grad_out.to(device)).sum().backward()
        grads = {"tokens": tokens.grad} | {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
        return out.cpu(), {name: grad.cpu() for name, grad in grads.items()}

    (expected, expected_grads), (out, grads) = run(reference), run(fused)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_reset_classifier_without_a_class_token() -> None:
    model = TokenBackbone().to(torch.float64)
    assert not hasattr(model, "cls_token")
    model.reset_classifier(5)
    assert model.head.out_features == 5 and model.head.weight.dtype == torch.float64
    model.reset_classifier(0)
    assert isinstance(model.get_classifier(), nn.Identity)


def test_catavgmax_pool_concatenates_mean_and_max() -> None:
    model = TokenBackbone(global_pool="catavgmax")
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(model.pool(x), torch.cat([x.mean(1), x.max(1).values], dim=1))


def test_weight_decay_groups_as_upstream_trains() -> None:
    """timm's factory, as Vim's, VideoMamba's and PointMamba's trainings use it: A_log (2-D) decays, D and the
    other 1-D parameters do not, nor the stem's named parameters."""
    from timm.optim import create_optimizer_v2

    for directions in (1, 2):
        model = TokenBackbone(directions=directions)
        assert model.no_weight_decay() == set(model.stem_no_weight_decay) <= dict(model.named_parameters()).keys()
        optimizer = create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=0.05)  # as the classifiers call it
        names = {id(p): n for n, p in model.named_parameters()}
        decayed = {names[id(p)] for group in optimizer.param_groups if group["weight_decay"] > 0 for p in group["params"]}
        assert "layers.2.mixer.A_log" in decayed and "layers.2.mixer.D" not in decayed
        assert ("layers.0.mixer.A_b_log" in decayed) == (directions == 2)
        assert not any(name.endswith(".bias") or "norm" in name for name in decayed)


def test_unknown_norm_layer() -> None:
    with pytest.raises(ValueError, match="norm_layer must be one of"):
        TokenBackbone(norm_layer="batchnorm")


@pytest.mark.parametrize("indices", [None, 1, 4, 12, [0, 5, 11], [-1], [-12, 3], (2,)])
def test_take_indices_as_timm(indices):
    """Our block selection against timm's own (a private helper there, so ours is kept apart)."""
    from timm.models._features import feature_take_indices

    from vim.models.timm_api import take_indices

    assert take_indices(12, indices) == feature_take_indices(12, indices)


@pytest.mark.parametrize("indices", [0, 13, [12], [-13], []])
def test_take_indices_out_of_range(indices):
    from vim.models.timm_api import take_indices

    with pytest.raises(ValueError, match="indices="):
        take_indices(12, indices)


@pytest.mark.parametrize(
    ("model_name", "unbatched", "layout"),
    [
        ("test_vim", (3, 32, 32), "images of shape (B, 3, H, W)"),
        ("test_videomamba", (3, 4, 32, 32), "clips of shape (B, 3, T, H, W)"),
        ("test_pointmamba", (128, 3), "point clouds of shape (B, N, 3)"),
        ("test_pointmamba_scan", (128, 3), "point clouds of shape (B, N, 3)"),
    ],
)
def test_unbatched_input_is_named_with_the_expected_shape(model_name: str, unbatched: tuple, layout: str) -> None:
    model = timm.create_model(model_name)
    message = f"{model_name} expects {layout}, got {unbatched}; add a batch dimension with x.unsqueeze(0)"
    for entry in (model, model.forward_features, model.forward_intermediates):
        with pytest.raises(ValueError, match=re.escape(message)):
            entry(torch.randn(unbatched))


@pytest.mark.parametrize(
    ("model_name", "shape", "mismatch"),
    [
        ("test_vim", (1, 4, 32, 32), "images of shape (B, 3, H, W), got (1, 4, 32, 32): axis 1 (channels) has size 4"),
        ("test_videomamba", (1, 1, 4, 32, 32), "(B, 3, T, H, W), got (1, 1, 4, 32, 32): axis 1 (channels) has size 1"),
        ("test_pointmamba", (1, 128, 4), "(B, N, 3), got (1, 128, 4): axis 2 (coordinates) has size 4, expected 3"),
        ("test_pointmamba_scan", (2, 1, 128, 3), "point clouds of shape (B, N, 3), got (2, 1, 128, 3)"),
    ],
)
def test_wrong_channels_or_rank_name_the_expected_shape(model_name: str, shape: tuple, mismatch: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"{model_name} expects ") + ".*" + re.escape(mismatch)):
        timm.create_model(model_name)(torch.randn(shape))


def test_input_check_reads_the_channels_of_the_patch_embedding() -> None:
    """A model built with in_chans=1 (grayscale) expects one channel; a model built directly is named by its class."""
    from vim.models import VisionMamba

    gray = timm.create_model("test_vim", in_chans=1)
    assert gray(torch.randn(2, 1, 32, 32)).shape == (2, gray.num_classes)
    with pytest.raises(ValueError, match=re.escape("test_vim expects images of shape (B, 1, H, W), got (2, 3, 32, 32)")):
        gray(torch.randn(2, 3, 32, 32))
    direct = VisionMamba(img_size=32, patch_size=8, embed_dim=16, depth=1, d_state=4)
    with pytest.raises(ValueError, match=re.escape("VisionMamba expects images of shape (B, 3, H, W), got (3, 32, 32)")):
        direct(torch.randn(3, 32, 32))
