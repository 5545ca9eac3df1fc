"""PointMamba: tokenizer and serialisation against a direct re-computation, timm API, shared trunk, bad input."""

from __future__ import annotations

import pytest
import timm
import torch

import vim.models  # noqa: F401
from vim.models.block import MambaBlock
from vim.models.point_mamba import PointMamba
from vim.models.point_ops import farthest_point_sample, hilbert_encode, knn_indices, quantize_to_grid


def tiny(**kwargs) -> PointMamba:
    torch.manual_seed(0)
    return timm.create_model("test_pointmamba", **{"num_classes": 5, **kwargs}).eval()


def clouds(batch: int = 2, points: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, points, 3, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_registered_configs():
    small = timm.create_model("pointmamba_small")
    assert (len(small.layers), small.embed_dim, small.num_groups, small.group_size) == (12, 384, 64, 32)
    assert small.pretrained_cfg["input_size"][-1] == 1024 and small.num_classes == 40
    scan = timm.create_model("pointmamba_small_g128", num_classes=15)
    assert scan.num_groups == 128 and scan.pretrained_cfg["input_size"][-1] == 2048
    assert all(isinstance(layer, MambaBlock) for layer in scan.layers)  # the trunk every modality shares


def test_embedding_matches_a_direct_computation():
    """Tokens = order-scaled mini-PointNet features of FPS/kNN groups, sorted along each curve, plus the centre MLP."""
    model, points = tiny(), clouds()
    with torch.no_grad():
        tokens = model._embed(points)
        assert tokens.shape == (2, 2 * 16, 32)  # two orders (hilbert, hilbert-trans) of 16 groups
        for b in range(2):
            centres = points[b, farthest_point_sample(points[b : b + 1], 16)[0]]
            groups = points[b, knn_indices(centres[None], points[b : b + 1], 8)[0]] - centres[:, None]
            features = model.encoder(groups[None])[0]  # (16, 32)
            pos = model.pos_embed(centres)
            grid = quantize_to_grid(centres[None], model.serial_bits)[0]
            for k, axes in enumerate(([0, 1, 2], [1, 0, 2])):
                order = hilbert_encode(grid[:, axes], model.serial_bits).argsort(stable=True)
                expected = features[order] * model.order_scale[k] + model.order_shift[k] + pos[order]
                torch.testing.assert_close(tokens[b, 16 * k : 16 * (k + 1)], expected, rtol=1e-5, atol=1e-5)


def test_forward_pooling_head_and_intermediates():
    model, points = tiny(), clouds()
    with torch.no_grad():
        features = model.forward_features(points)
        torch.testing.assert_close(features, model.forward_trunk(model._embed(points)))
        pre_logits = model.forward_head(features, pre_logits=True)
        torch.testing.assert_close(pre_logits, model.head.pre_logits(features.mean(dim=1)))
        torch.testing.assert_close(model(points), model.head.fc(pre_logits))
        final, inter = model.forward_intermediates(points, indices=[0, 1], norm=True)
        torch.testing.assert_close(final, features)
        torch.testing.assert_close(inter[-1], features)  # the last block's normalised stream is the output
        assert inter[0].shape == (2, 32, 32)
    features_only = timm.create_model("test_pointmamba", features_only=True, out_indices=(1,))
    assert [f.shape for f in features_only(points)] == [(2, 32, 32)]


def test_output_invariant_to_point_order_after_the_first():
    """FPS starts at point 0 and kNN/max-pooling ignore order: shuffling the other points changes nothing."""
    model, points = tiny(), clouds(points=48)
    shuffled = torch.cat([points[:, :1], points[:, 1:][:, torch.randperm(47, generator=torch.Generator().manual_seed(3))]], 1)
    with torch.no_grad():
        torch.testing.assert_close(model(shuffled), model(points), rtol=1e-4, atol=1e-5)


def test_classifier_reset_and_training_step():
    model = tiny()
    model.reset_classifier(0)
    assert isinstance(model.get_classifier(), torch.nn.Identity)
    with torch.no_grad():
        assert model(clouds()).shape == (2, model.head_hidden_size)
    model.reset_classifier(3)
    model.train()
    loss = torch.nn.functional.cross_entropy(model(clouds(batch=4)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    assert model.order_scale.grad.abs().sum() > 0 and model.encoder.first_conv[0].weight.grad.abs().sum() > 0
    assert model.no_weight_decay() == {"order_scale", "order_shift"}


@pytest.mark.parametrize(
    ("points", "message"),
    [
        (torch.rand(2, 64, 2), r"shape \(B, N, 3\).*\(2, 64, 2\)"),
        (torch.rand(2, 10, 3), "10 points per cloud, the model needs at least 16"),
        (torch.full((1, 64, 3), float("nan")), "NaN or infinite"),
        (torch.ones(1, 64, 3, dtype=torch.long), "floating-point"),
    ],
)
def test_bad_point_batches(points, message):
    with pytest.raises(ValueError, match=message):
        tiny()(points)


def test_bad_configuration():
    with pytest.raises(ValueError, match="orders must be"):
        PointMamba(num_groups=4, group_size=4, embed_dim=16, depth=1, orders=("spiral",))
