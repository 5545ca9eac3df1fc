"""VideoMamba backbones: official layout and keys, checkpoints (official, resampled, inflated from images), features."""

from __future__ import annotations

import argparse
import math

import pytest
import timm
import torch
import torch.nn.functional as F

import vim.models  # noqa: F401
from vim.models.checkpoint import load_checkpoint_into
from vim.models.video_mamba import checkpoint_filter_fn, inflate_image_state_dict
from vim.models.vision_mamba import VisionMamba

TINY = dict(embed_dim=32, depth=2, d_state=8, patch_size=8)


def official_embedding(model, x: torch.Tensor) -> torch.Tensor:
    """VideoMamba's forward_features up to pos_drop, re-written from the official code (einops rearranges as reshapes)."""
    x = model.patch_embed.proj(x)
    B, C, T, H, W = x.shape
    x = x.permute(0, 2, 3, 4, 1).reshape(B * T, H * W, C)
    x = torch.cat([model.cls_token.expand(B * T, -1, -1), x], dim=1) + model.pos_embed
    cls_tokens = x[:B, :1]
    x = x[:, 1:].reshape(B, T, H * W, C).permute(0, 2, 1, 3).reshape(B * H * W, T, C)  # '(b t) n m -> (b n) t m'
    x = x + model.temporal_pos_embedding
    x = x.reshape(B, H * W, T, C).permute(0, 2, 1, 3).reshape(B, T * H * W, C)  # '(b n) t m -> b (t n) m'
    return torch.cat([cls_tokens, x], dim=1)


def test_embedding_and_forward_follow_the_official_model():
    torch.manual_seed(0)
    model = timm.create_model("test_videomamba", num_frames=4, tubelet_size=2).eval()
    with torch.no_grad():
        model.temporal_pos_embedding.normal_()  # zero at init: make it matter
        x = torch.randn(2, 3, 4, 32, 32)
        tokens = official_embedding(model, x)
        torch.testing.assert_close(model._embed(x), tokens)
        hidden, residual = tokens, None
        for layer in model.layers:
            hidden, residual = layer(hidden, residual)
        features = model.norm_f(residual + hidden)
        torch.testing.assert_close(model.forward_features(x), features)
        torch.testing.assert_close(model(x), model.head(features[:, 0]))
        torch.testing.assert_close(model.forward_head(features, pre_logits=True), features[:, 0])
    assert all(not layer.mixer.divide_out for layer in model.layers)  # VideoMamba sums the two directions


def test_registered_sizes_and_official_parameter_names():
    with torch.device("meta"):
        sizes = {name: timm.create_model(name) for name in ("videomamba_tiny", "videomamba_small", "videomamba_middle")}
    assert {n: (m.embed_dim, len(m.layers)) for n, m in sizes.items()} == {
        "videomamba_tiny": (192, 24),
        "videomamba_small": (384, 24),
        "videomamba_middle": (576, 32),
    }
    model = sizes["videomamba_tiny"]
    d, inner, rank = 192, 384, math.ceil(192 / 16)
    expected = {
        "patch_embed.proj.weight": (d, 3, 1, 16, 16),
        "patch_embed.proj.bias": (d,),
        "cls_token": (1, 1, d),
        "pos_embed": (1, 197, d),
        "temporal_pos_embedding": (1, 8, d),
        "norm_f.weight": (d,),
        "head.weight": (400, d),
        "head.bias": (400,),
    }
    for i in range(24):
        expected[f"layers.{i}.norm.weight"] = (d,)
        expected[f"layers.{i}.mixer.in_proj.weight"] = (2 * inner, d)
        expected[f"layers.{i}.mixer.out_proj.weight"] = (d, inner)
        for s in ("", "_b"):
            expected |= {
                f"layers.{i}.mixer.conv1d{s}.weight": (inner, 1, 4),
                f"layers.{i}.mixer.conv1d{s}.bias": (inner,),
                f"layers.{i}.mixer.x_proj{s}.weight": (rank + 32, inner),
                f"layers.{i}.mixer.dt_proj{s}.weight": (inner, rank),
                f"layers.{i}.mixer.dt_proj{s}.bias": (inner,),
                f"layers.{i}.mixer.A{s}_log": (inner, 16),
                f"layers.{i}.mixer.D{s}": (inner,),
            }
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected


def test_official_checkpoint_file_loads_and_resamples(tmp_path):
    torch.manual_seed(0)
    source = timm.create_model("test_videomamba", num_frames=4)
    with torch.no_grad():
        source.temporal_pos_embedding.normal_()
    path = tmp_path / "videomamba_official.pth"
    torch.save({"model": source.state_dict(), "epoch": 3, "args": argparse.Namespace(lr=1e-4)}, path)

    same = timm.create_model("test_videomamba", num_frames=4)
    assert load_checkpoint_into(same, path) == []
    x = torch.randn(1, 3, 4, 32, 32)
    torch.testing.assert_close(same.eval()(x), source.eval()(x))

    other = timm.create_model("test_videomamba", num_frames=8, img_size=48)
    other.reset_classifier(5)
    assert sorted(load_checkpoint_into(other, path)) == ["head.bias", "head.weight"]  # another class count: dropped
    temporal = F.interpolate(source.temporal_pos_embedding.detach().transpose(1, 2), size=8, mode="linear").transpose(1, 2)
    torch.testing.assert_close(other.temporal_pos_embedding.detach(), temporal)
    grid = source.pos_embed.detach()[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    spatial = F.interpolate(grid, size=(6, 6), mode="bicubic", antialias=True).permute(0, 2, 3, 1).flatten(1, 2)
    torch.testing.assert_close(other.pos_embed.detach(), torch.cat([source.pos_embed.detach()[:, :1], spatial], dim=1))

    evil = tmp_path / "evil.pth"
    torch.save({"model": source.state_dict(), "hook": print}, evil)
    with pytest.raises(ValueError, match="weights_only"):
        load_checkpoint_into(same, evil)


def test_image_checkpoint_inflates_to_the_same_per_frame_computation():
    torch.manual_seed(0)
    image = VisionMamba(img_size=32, num_classes=10, **TINY)
    video = timm.create_model("test_videomamba", num_frames=4, tubelet_size=2)
    video.load_state_dict(checkpoint_filter_fn(image.state_dict(), video))
    kernel = video.patch_embed.proj.weight.detach()
    torch.testing.assert_close(kernel[:, :, 1], image.patch_embed.proj.weight.detach())  # centre slice of 2 = index 1
    assert kernel[:, :, 0].abs().max() == 0
    clip = torch.randn(1, 3, 4, 32, 32)
    frames_1_and_3 = torch.stack([image.patch_embed.proj(clip[:, :, t]) for t in (1, 3)], dim=2)
    torch.testing.assert_close(video.patch_embed(clip), frames_1_and_3)
    middle = image.pos_embed.shape[1] // 2
    torch.testing.assert_close(video.pos_embed[:, 0], image.pos_embed[:, middle])
    torch.testing.assert_close(
        video.pos_embed[:, 1:], torch.cat([image.pos_embed[:, :middle], image.pos_embed[:, middle + 1 :]], 1)
    )
    assert video.temporal_pos_embedding.abs().max() == 0
    tokens = torch.randn(2, 9, 32)  # halved out_proj + summed directions == Vim's averaged directions
    torch.testing.assert_close(video.layers[1].mixer(tokens), image.layers[1].mixer(tokens))
    front = inflate_image_state_dict(image.state_dict(), video, middle_cls_token=False, divide_out=False)
    torch.testing.assert_close(front["pos_embed"], image.pos_embed.detach())
    torch.testing.assert_close(front["layers.0.mixer.out_proj.weight"], image.layers[0].mixer.out_proj.weight.detach())


def test_intermediates_are_per_frame_maps_of_the_token_stream():
    torch.manual_seed(0)
    model = timm.create_model("test_videomamba", num_frames=4).eval()
    x = torch.randn(2, 3, 4, 32, 40)
    with pytest.raises(ValueError, match=r"input clip size \(T, H, W\) = \(4, 32, 40\)"):
        model(x)
    x = x[..., :32]
    with torch.no_grad():
        final, maps = model.forward_intermediates(x, indices=[0, 1], norm=True)
        tokens = model.forward_intermediates(x, indices=[1], norm=True, output_fmt="NLC", intermediates_only=True)
        ((patches, cls),) = model.forward_intermediates(
            x, indices=1, norm=True, return_prefix_tokens=True, intermediates_only=True
        )
        features = model.forward_features(x)
    assert [m.shape for m in maps] == [(2, 32, 4, 4, 4)] * 2
    torch.testing.assert_close(final, features)
    torch.testing.assert_close(tokens[0], features[:, 1:])  # last block + final norm = the output tokens
    torch.testing.assert_close(cls, features[:, :1])
    t, h, w = 2, 1, 3  # spatial-first order: token index t * H'W' + h * W' + w
    torch.testing.assert_close(maps[1][:, :, t, h, w], features[:, 1 + t * 16 + h * 4 + w])
    torch.testing.assert_close(patches, maps[1])


def test_other_clip_sizes_resample_like_set_input_size():
    torch.manual_seed(0)
    dynamic = timm.create_model("test_videomamba", num_frames=4, dynamic_img_size=True).eval()
    fixed = timm.create_model("test_videomamba", num_frames=4).eval()
    fixed.load_state_dict(dynamic.state_dict())
    fixed.set_input_size(num_frames=6, img_size=(48, 40))
    assert fixed.temporal_pos_embedding.shape == (1, 6, 32) and fixed.pos_embed.shape == (1, 1 + 6 * 5, 32)
    x = torch.randn(1, 3, 6, 48, 40)
    with torch.no_grad():
        torch.testing.assert_close(dynamic(x), fixed(x))
    odd = timm.create_model("test_videomamba", num_frames=4, tubelet_size=2, dynamic_img_size=True)
    with pytest.raises(ValueError, match="num_frames=5 is not a multiple of tubelet_size=2"):
        odd(torch.randn(1, 3, 5, 32, 32))
    with pytest.raises(ValueError, match="smaller than the patch size"):
        odd(torch.randn(1, 3, 4, 6, 32))


def test_set_input_size_takes_timms_argument_order_and_keeps_unchanged_parameters():
    model = timm.create_model("test_videomamba", num_frames=4)
    pos_embed, temporal = model.pos_embed, model.temporal_pos_embedding
    model.set_input_size()
    model.set_input_size(32, 8, num_frames=4)  # the current sizes, positionally as timm passes them
    assert model.pos_embed is pos_embed and model.temporal_pos_embedding is temporal
    model.set_input_size(num_frames=6)  # only the clip length changes: the spatial embedding stays
    assert model.pos_embed is pos_embed and model.temporal_pos_embedding.shape == (1, 6, 32)
    model.set_input_size((48, 40))
    assert model.pos_embed.shape == (1, 1 + 6 * 5, 32) and model.patch_embed.grid_size == (6, 6, 5)
    with pytest.raises(ValueError, match="cannot change patch_size"):
        model.set_input_size(patch_size=16)
