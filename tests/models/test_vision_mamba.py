"""Vision Mamba image backbones: official numerics, parameter counts and the timm model API."""

from __future__ import annotations

import argparse
import math
import os
import shutil

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import DropPath

import vim.models  # noqa: F401  (registers the models)
from vim.kernels import selective_scan_ref
from vim.models import VisionMamba, drop_path_schedule, insert_middle_token, middle_token_index, split_middle_token

# test_vim: 32 px images, 8 px patches at stride 4 (a 7 x 7 grid), width 32, 4 blocks, N = 8
TEST_CFG = dict(img=32, patch=8, stride=4, dim=32, depth=4, d_state=8, classes=1000)


# ---------------------------------------------------------------------------------------------
# an independent re-implementation of the official Vim forward, on an official-format state dict
# ---------------------------------------------------------------------------------------------


def official_state_dict(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the official key names and shapes (hustvl/Vim, bimamba v2)."""
    g = torch.Generator().manual_seed(seed)
    dim, inner, n = cfg["dim"], 2 * cfg["dim"], cfg["d_state"]
    rank = math.ceil(dim / 16)
    grid = (cfg["img"] - cfg["patch"]) // cfg["stride"] + 1

    def rand(*shape: int, scale: float = 0.1, shift: float = 0.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale + shift

    sd = {
        "cls_token": rand(1, 1, dim, scale=0.5),
        "pos_embed": rand(1, grid * grid + 1, dim, scale=0.5),
        "patch_embed.proj.weight": rand(dim, 3, cfg["patch"], cfg["patch"]),
        "patch_embed.proj.bias": rand(dim),
        "norm_f.weight": rand(dim, shift=1.0),
        "head.weight": rand(cfg["classes"], dim),
        "head.bias": rand(cfg["classes"]),
    }
    for i in range(cfg["depth"]):
        p = f"layers.{i}."
        sd[p + "norm.weight"] = rand(dim, shift=1.0)
        sd[p + "mixer.in_proj.weight"] = rand(2 * inner, dim, scale=0.2)
        sd[p + "mixer.out_proj.weight"] = rand(dim, inner, scale=0.2)
        for s in ("", "_b"):
            sd[p + f"mixer.conv1d{s}.weight"] = rand(inner, 1, 4, scale=0.4)
            sd[p + f"mixer.conv1d{s}.bias"] = rand(inner)
            sd[p + f"mixer.x_proj{s}.weight"] = rand(rank + 2 * n, inner, scale=0.2)
            sd[p + f"mixer.dt_proj{s}.weight"] = rand(inner, rank, scale=0.5)
            sd[p + f"mixer.dt_proj{s}.bias"] = rand(inner, scale=0.5, shift=-3.0)
            sd[p + f"mixer.A{s}_log"] = torch.log(torch.arange(1, n + 1.0)).expand(inner, n) + rand(inner, n)
            sd[p + f"mixer.D{s}"] = rand(inner, shift=1.0)
    return sd


def _rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * weight


def _official_mixer(sd: dict, p: str, hidden: torch.Tensor, d_state: int) -> torch.Tensor:
    """Mamba(bimamba_type="v2", if_divide_out=True).forward, with explicit flips for the backward direction."""
    inner = sd[p + "out_proj.weight"].shape[1]
    xz = (hidden @ sd[p + "in_proj.weight"].T).transpose(1, 2)
    x, z = xz.chunk(2, dim=1)

    def direction(x: torch.Tensor, z: torch.Tensor, s: str) -> torch.Tensor:
        length = x.shape[-1]
        x = F.silu(F.conv1d(x, sd[p + f"conv1d{s}.weight"], sd[p + f"conv1d{s}.bias"], padding=3, groups=inner)[..., :length])
        x_dbl = x.transpose(1, 2) @ sd[p + f"x_proj{s}.weight"].T
        rank = x_dbl.shape[-1] - 2 * d_state
        dt, B, C = x_dbl.split([rank, d_state, d_state], dim=-1)
        delta = (dt @ sd[p + f"dt_proj{s}.weight"].T).transpose(1, 2)
        A = -torch.exp(sd[p + f"A{s}_log"])
        return selective_scan_ref(
            x,
            delta,
            A,
            B.transpose(1, 2),
            C.transpose(1, 2),
            sd[p + f"D{s}"],
            z=z,
            delta_bias=sd[p + f"dt_proj{s}.bias"],
            delta_softplus=True,
        )

    y = (direction(x, z, "") + direction(x.flip(-1), z.flip(-1), "_b").flip(-1)) / 2
    return y.transpose(1, 2) @ sd[p + "out_proj.weight"].T


def official_vim_logits(sd: dict, images: torch.Tensor, cfg: dict) -> torch.Tensor:
    """VisionMamba.forward of hustvl/Vim (middle class token, residual in fp32, RMSNorm), step by step."""
    x = F.conv2d(images, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=cfg["stride"])
    x = x.flatten(2).transpose(1, 2)
    middle = x.shape[1] // 2
    cls = sd["cls_token"].expand(x.shape[0], -1, -1)
    x = torch.cat([x[:, :middle], cls, x[:, middle:]], dim=1) + sd["pos_embed"]
    hidden, residual = x, None
    for i in range(cfg["depth"]):
        residual = hidden if residual is None else residual + hidden
        hidden = _official_mixer(sd, f"layers.{i}.mixer.", _rms_norm(residual, sd[f"layers.{i}.norm.weight"]), cfg["d_state"])
    features = _rms_norm(residual + hidden, sd["norm_f.weight"])
    return features[:, middle] @ sd["head.weight"].T + sd["head.bias"]


def test_golden_official_checkpoint_reproduces_official_logits(tmp_path) -> None:
    sd = official_state_dict(TEST_CFG)
    path = tmp_path / "vim_official.pth"
    optimizer = {"state": {}, "param_groups": []}
    torch.save({"model": sd, "optimizer": optimizer, "epoch": 3, "args": argparse.Namespace(lr=1e-3)}, path)
    model = timm.create_model("test_vim", pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(images)
        expected = official_vim_logits(sd, images, TEST_CFG)
    assert logits.shape == (2, 1000)
    assert expected.abs().max() > 0.1  # the comparison is not between two near-zero tensors
    assert (logits - expected).abs().max() <= 1e-4


# ---------------------------------------------------------------------------------------------
# architecture
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, count",
    [
        ("vim_tiny_patch16_224", 7_148_008),
        ("vim_tiny_patch16_stride8_224", 7_250_344),
        ("vim_small_patch16_224", 25_796_584),
        ("vim_small_patch16_stride8_224", 26_001_256),
        ("vim_base_patch16_224", 97_598_440),
    ],
)
def test_parameter_counts_equal_the_official_models(name: str, count: int) -> None:
    model = timm.create_model(name, device="meta")
    assert sum(p.numel() for p in model.parameters()) == count
    assert len(model.layers) == 24
    stride = 8 if "stride8" in name else 16
    assert model.pos_embed.shape[1] == ((224 - 16) // stride + 1) ** 2 + 1


def test_drop_path_schedule_follows_vim() -> None:
    depth, rate = 5, 0.2
    expected = [0.0] + [rate * i / (depth - 1) for i in range(depth - 1)]
    assert drop_path_schedule(rate, depth) == pytest.approx(expected)
    model = timm.create_model("test_vim", depth=depth, drop_path_rate=rate, device="meta")
    rates = [layer.drop_path.drop_prob if isinstance(layer.drop_path, DropPath) else 0.0 for layer in model.layers]
    assert rates == pytest.approx(expected)
    assert isinstance(model.drop_path, DropPath) and model.drop_path.drop_prob == pytest.approx(rate)


def test_middle_token_helpers() -> None:
    patches = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)
    token = torch.full((1, 1, 3), -1.0)
    x = insert_middle_token(patches, token)
    assert middle_token_index(x.shape[1]) == 2
    torch.testing.assert_close(x[:, 2], token[:, 0].expand(2, -1))
    torch.testing.assert_close(torch.cat([x[:, :2], x[:, 3:]], dim=1), patches)
    cls, rest = split_middle_token(x)
    torch.testing.assert_close(cls, token.expand(2, -1, -1))
    torch.testing.assert_close(rest, patches)


# ---------------------------------------------------------------------------------------------
# the timm model API on test_vim
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model() -> VisionMamba:
    torch.manual_seed(0)
    return timm.create_model("test_vim").eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_features_head_and_classifier(model: VisionMamba, images: torch.Tensor) -> None:
    with torch.no_grad():
        tokens = model.forward_features(images)
        pooled = model.forward_head(tokens, pre_logits=True)
        logits = model(images)
    assert tokens.shape == (2, 7 * 7 + 1, 32) and model.num_features == model.head_hidden_size == 32
    torch.testing.assert_close(pooled, tokens[:, 24])  # the middle class token
    torch.testing.assert_close(logits, pooled @ model.head.weight.T + model.head.bias)
    assert model.get_classifier() is model.head

    fresh = timm.create_model("test_vim").eval()
    fresh.load_state_dict(model.state_dict())
    fresh.reset_classifier(5)
    assert fresh.head.out_features == 5 and fresh.num_classes == 5
    fresh.reset_classifier(0, "avg")
    with torch.no_grad():
        torch.testing.assert_close(fresh(images), tokens.mean(dim=1))
    fresh.reset_classifier(0, "")
    with torch.no_grad():
        torch.testing.assert_close(fresh(images), tokens)
    with pytest.raises(ValueError, match="global_pool"):
        fresh.reset_classifier(0, "max")


def test_no_weight_decay_group_matcher_and_cfg(model: VisionMamba) -> None:
    names = dict(model.named_parameters())
    no_wd = model.no_weight_decay()
    assert no_wd <= set(names)
    assert no_wd == {"pos_embed", "cls_token"}  # with timm's 1-D rule; A_log decays, as upstream trained it

    from timm.models._manipulate import group_parameters

    group_of = group_parameters(model, model.group_matcher(), reverse=True)  # name -> group index
    assert group_of["patch_embed.proj.weight"] == group_of["pos_embed"] == group_of["cls_token"] == 0
    blocks = [group_of[f"layers.{i}.mixer.in_proj.weight"] for i in range(4)]
    assert blocks == sorted(set(blocks)) and blocks[0] > 0
    assert group_of["layers.2.norm.weight"] == blocks[2]
    assert group_of["norm_f.weight"] == blocks[-1] < group_of["head.weight"]  # as timm's ViT groups its final norm

    cfg = timm.create_model("vim_small_patch16_224", device="meta").pretrained_cfg
    assert cfg["crop_pct"] == 0.875 and cfg["interpolation"] == "bicubic" and cfg["input_size"] == (3, 224, 224)
    assert cfg["mean"] == timm.data.IMAGENET_DEFAULT_MEAN and cfg["std"] == timm.data.IMAGENET_DEFAULT_STD


def test_forward_intermediates_and_features_only(model: VisionMamba, images: torch.Tensor) -> None:
    with torch.no_grad():
        final, inter = model.forward_intermediates(images, indices=[1, -1], norm=True)
        tokens = model.forward_features(images)
        nlc = model.forward_intermediates(images, indices=2, output_fmt="NLC", intermediates_only=True, return_prefix_tokens=True)
        early = model.forward_intermediates(images, indices=[0], stop_early=True, intermediates_only=True)
    torch.testing.assert_close(final, tokens)
    assert [t.shape for t in inter] == [(2, 32, 7, 7)] * 2
    # the last block's normalised stream is the final output, patches laid out on the 7 x 7 grid
    cls, patches = split_middle_token(tokens)
    torch.testing.assert_close(inter[-1], patches.reshape(2, 7, 7, 32).permute(0, 3, 1, 2))
    (patches_nlc, cls_nlc) = nlc[-1]
    assert patches_nlc.shape == (2, 49, 32) and cls_nlc.shape == (2, 1, 32)
    # un-normalised intermediates: RMSNorm of them gives the final output
    torch.testing.assert_close(model.norm_f(patches_nlc), patches)
    torch.testing.assert_close(model.norm_f(cls_nlc), cls)
    assert early[0].shape == (2, 32, 7, 7)

    features = timm.create_model("test_vim", features_only=True, out_indices=(1, 3)).eval()
    result = features.model.load_state_dict(model.state_dict(), strict=False)  # the getter wraps the pruned model
    assert not result.missing_keys and set(result.unexpected_keys) == {"norm_f.weight", "head.weight", "head.bias"}
    assert features.feature_info.channels() == [32, 32] and features.feature_info.reduction() == [4, 4]
    with torch.no_grad():
        maps = features(images)
    assert [m.shape for m in maps] == [(2, 32, 7, 7)] * 2
    with torch.no_grad():
        expected = model.forward_intermediates(images, indices=[1, 3], intermediates_only=True)
    torch.testing.assert_close(maps[1], expected[1])

    pruned = timm.create_model("test_vim").eval()
    pruned.load_state_dict(model.state_dict())
    assert pruned.prune_intermediate_layers(indices=[1], prune_norm=True) == [1]
    assert len(pruned.layers) == 2 and pruned.num_classes == 0
    with torch.no_grad():
        torch.testing.assert_close(pruned.forward_intermediates(images, indices=[1], intermediates_only=True)[0], expected[0])


def test_dynamic_img_size_resamples_around_the_middle_slot(model: VisionMamba, images: torch.Tensor) -> None:
    assert model.dynamic_img_size  # the registered models take any image size
    strict = timm.create_model("test_vim", dynamic_img_size=False).eval()
    strict.load_state_dict(model.state_dict())
    larger = torch.randn(1, 3, 48, 40)
    with torch.no_grad():
        torch.testing.assert_close(model(images), strict(images))  # nominal size: nothing resampled
        out = model.forward_features(larger)
    assert out.shape == (1, 11 * 9 + 1, 32)
    with pytest.raises(ValueError, match=r"input image size \(48, 40\)"):
        strict(larger)

    # the same as a model whose pos_embed was resampled by hand: the class slot kept, the 7 x 7 patch
    # grid interpolated (bicubic, antialiased) to 11 x 9, the class slot re-inserted in the middle
    cls_slot, grid = split_middle_token(model.pos_embed.detach())
    grid = F.interpolate(grid.reshape(1, 7, 7, 32).permute(0, 3, 1, 2), size=(11, 9), mode="bicubic", antialias=True)
    pos_embed = insert_middle_token(grid.permute(0, 2, 3, 1).reshape(1, 99, 32), cls_slot)
    torch.testing.assert_close(pos_embed[:, 49], model.pos_embed[:, 24].detach())
    fixed = timm.create_model("test_vim", img_size=(48, 40), dynamic_img_size=False).eval()
    fixed.load_state_dict(dict(model.state_dict(), pos_embed=pos_embed))
    with torch.no_grad():
        torch.testing.assert_close(out, fixed.forward_features(larger))

    strict.set_input_size(img_size=(48, 40))
    torch.testing.assert_close(strict.pos_embed.detach(), pos_embed)


def test_grad_checkpointing_gives_the_same_gradients(images: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = timm.create_model("test_vim", drop_path_rate=0.3).train()

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model.zero_grad()
        model.set_grad_checkpointing(checkpointing)
        torch.manual_seed(1)  # the same stochastic-depth draws in both runs
        model(images).square().mean().backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    plain, checkpointed = grads(False), grads(True)
    assert model.grad_checkpointing
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, msg=f"gradient of {name}")


def test_fx_feature_extraction_traces_the_model():
    """timm's FX feature extraction traces the model (the pos-embed resampling must stay a leaf)."""
    from timm.models._features_fx import create_feature_extractor, get_graph_node_names

    model = timm.create_model("test_vim", num_classes=5).eval()
    _, eval_nodes = get_graph_node_names(model)
    extractor = create_feature_extractor(model, return_nodes=[eval_nodes[-1]])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(extractor(x)[eval_nodes[-1]], model(x))


# ---------------------------------------------------------------------------------------------
# torch.compile of the whole model (Inductor on CPU builds C++: it needs a compiler)
# ---------------------------------------------------------------------------------------------

needs_cxx = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "g++")) is None, reason="Inductor needs a C++ compiler to compile for CPU"
)


@pytest.fixture
def fresh_dynamo():
    """Each compile test traces from scratch and leaves no compiled code behind."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.slow  # Inductor benchmarks every matrix product's candidate kernels
@needs_cxx
def test_max_autotune_compiles_the_training_forward_without_a_graph_break(images: torch.Tensor, fresh_dynamo) -> None:
    """mode="max-autotune" with fullgraph=True: a graph break would raise; the logits are eager's."""
    torch.manual_seed(0)
    model = timm.create_model("test_vim", num_classes=5).train()
    compiled = torch.compile(model, mode="max-autotune", fullgraph=True)
    torch.testing.assert_close(compiled(images), model(images), rtol=1e-4, atol=1e-5)
