"""The released PointMamba architecture: upstream's files load as they are, and the logits are upstream's."""

from __future__ import annotations

import pytest
import timm
import torch

import vim.models  # noqa: F401  (registers the models)
from vim.models.point_mamba import PointMambaScan
from vim.models.weights import released_weights

from reference.pointmamba import official_forward, official_shapes, official_state_dict, released_file
from support.paths import REPO

TINY = dict(num_groups=16, group_size=8, embed_dim=32, depth=2, d_state=8, head_hidden_size=32)
"""A shrunk pointmamba_scan_small: the golden files are made for this size."""


def clouds(batch: int = 3, points: int = 128, seed: int = 0) -> torch.Tensor:
    """Clouds of different extents (the serialisation depth is the batch's), the first a sphere, each with a point
    at the origin: the sphere's centre is soon its farthest point, but pointnet2_ops never picks |p|^2 <= 1e-3."""
    generator = torch.Generator().manual_seed(seed)
    x = (torch.rand(batch, points, 3, generator=generator) * 2 - 1) * torch.linspace(1.0, 0.45, batch)[:, None, None]
    x[0] = x[0] / x[0].norm(dim=-1, keepdim=True)
    x[:, 5] = 0.0
    return x


@pytest.fixture
def torch_hub(tmp_path, monkeypatch):
    """An empty torch hub cache; downloads fail, as without network."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def no_network(url, *args, **kwargs):
        raise OSError(f"no network in tests ({url})")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return tmp_path / "torch" / "hub" / "checkpoints"


def test_released_modelnet40_file_gives_upstreams_logits(torch_hub):
    """Golden test: an upstream-format file in torch hub's cache, loaded by timm.create_model(tag, pretrained=True);
    the logits against a float64 re-implementation of PointMambaScan.forward on the same state dict."""
    weights = official_state_dict(official_shapes(40, d=32, depth=2, d_state=8, head_width=32), torch.Generator().manual_seed(1))
    info = released_weights("pointmamba_scan_small.modelnet40")
    assert info.url == "https://github.com/LMD0311/PointMamba/releases/download/ckpts-2/finetune_modelnet.pth"
    torch_hub.mkdir(parents=True)
    torch.save(released_file(weights), torch_hub / info.filename)

    model = timm.create_model("pointmamba_scan_small.modelnet40", pretrained=True, **TINY).eval()
    assert isinstance(model, PointMambaScan) and model.num_classes == 40
    assert all(layer.mixer.directions == 1 for layer in model.layers)  # Mamba's own mixer, one direction
    points = clouds()
    with torch.no_grad():
        logits = model(points)
    expected = official_forward(weights, points, num_groups=16, group_size=8, depth=2)
    torch.testing.assert_close(logits.double(), expected, rtol=1e-4, atol=1e-4)
    assert expected.std() > 0.1  # the comparison is not between near-constants


@pytest.mark.parametrize(
    ("name", "num_classes"),
    [
        ("pointmamba_scan_small.modelnet40", 40),
        ("pointmamba_scan_small.shapenet_pretrain", None),
        ("pointmamba_scan_small_g128.scanobjectnn_objbg", 15),
        ("pointmamba_scan_small_g128.scanobjectnn_objonly", 15),
        ("pointmamba_scan_small_g128.scanobjectnn_hardest", 15),
        ("pointmamba_scan_small_g128.shapenet_pretrain", None),
    ],
)
def test_every_released_file_maps_onto_its_tag_exactly(name, num_classes):
    """Upstream's full-size key set and shapes for each release: nothing missing, nothing unexpected."""
    with torch.device("meta"):
        model = timm.create_model(name)
    state_dict = official_state_dict(official_shapes(num_classes), torch.Generator(), device="meta")
    mapped = model.checkpoint_filter(released_file(state_dict))
    expected = model.state_dict()
    assert set(mapped) == set(expected)
    assert all(mapped[key].shape == expected[key].shape for key in expected)
    assert model.num_classes == (num_classes or 0)


def test_pretraining_file_keeps_the_encoder_and_drops_the_decoder(tmp_path):
    generator = torch.Generator().manual_seed(2)
    pretrain = official_state_dict(official_shapes(None, d=32, depth=2, d_state=8), generator)
    path = tmp_path / "pretrain.pth"
    torch.save(released_file(pretrain, accuracy=0.0), path)
    overlay = dict(file=str(path))
    headless = timm.create_model(
        "pointmamba_scan_small.shapenet_pretrain", pretrained=True, pretrained_cfg_overlay=overlay, **TINY
    )
    torch.testing.assert_close(headless.layers[1].mixer.A_log, pretrain["MAE_encoder.blocks.layers.1.mixer.A_log"])
    torch.testing.assert_close(headless.order_shift[1], pretrain["MAE_encoder.OrderScale_beta_2"])
    with torch.no_grad():
        pooled = headless.eval()(clouds())
    assert pooled.shape == (3, 32)  # no head: the mean of the final tokens
    # fine-tuning start: a 15-class model keeps its new head, the encoder comes from the file
    torch.manual_seed(0)
    fresh = timm.create_model("pointmamba_scan_small_g128", num_classes=15, **TINY)
    head = {k: v.clone() for k, v in fresh.head.state_dict().items()}
    torch.manual_seed(0)
    tuned = timm.create_model(
        "pointmamba_scan_small_g128", num_classes=15, pretrained=True, pretrained_cfg_overlay=overlay, **TINY
    )
    torch.testing.assert_close(tuned.norm_f.bias, pretrain["MAE_encoder.blocks.norm_f.bias"])
    for key, value in tuned.head.state_dict().items():
        torch.testing.assert_close(value, head[key])


def test_bad_files_are_refused_naming_the_key(tmp_path):
    generator = torch.Generator().manual_seed(3)
    weights = official_state_dict(official_shapes(10, d=32, depth=2, d_state=8, head_width=32), generator)

    def load(state_dict):
        path = tmp_path / "bad.pth"
        torch.save(released_file(state_dict), path)
        return timm.create_model("test_pointmamba_scan", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))

    assert load(weights).num_classes == 10
    wrong = dict(weights, **{"blocks.layers.1.mixer.x_proj.weight": torch.zeros(3, 64)})
    with pytest.raises(ValueError, match=r"'layers\.1\.mixer\.x_proj\.weight' has shape \(3, 64\)"):
        load(wrong)
    with pytest.raises(ValueError, match=r"missing keys \['layers\.0\.mixer\.D'\]"):
        load({k: v for k, v in weights.items() if k != "blocks.layers.0.mixer.D"})
    with pytest.raises(ValueError, match="'OrderScale_gamma_2' is missing"):
        load({k: v for k, v in weights.items() if k != "OrderScale_gamma_2"})
    with pytest.raises(ValueError, match=r"unexpected keys \['cls_token'\]"):
        load(dict(weights, cls_token=torch.zeros(1, 1, 32)))


def test_head_reset_pooling_and_training_step():
    torch.manual_seed(0)
    model = timm.create_model("test_pointmamba_scan", global_pool="catavgmax", num_classes=4)
    assert model.head[0].in_features == 64 and model.head_hidden_size == 64  # mean and max, as avg_head + max_head
    points = clouds(batch=4)
    with torch.no_grad():
        features = model.eval().forward_features(points)
        torch.testing.assert_close(
            model.forward_head(features, pre_logits=True), torch.cat([features.mean(1), features.amax(1)], 1)
        )
    model.reset_classifier(0, global_pool="avg")
    assert isinstance(model.get_classifier(), torch.nn.Identity) and model.head_hidden_size == 32
    model.reset_classifier(3)
    assert model.head[0].in_features == 32 and model.head[-1].out_features == 3
    model.train()
    loss = torch.nn.functional.cross_entropy(model(points), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    assert model.layers[0].mixer.A_log.grad.abs().sum() > 0 and model.order_scale.grad.abs().sum() > 0


def test_released_file_converts_to_safetensors_and_loads(tmp_path):
    """tools/convert_checkpoint.py checks an upstream file against the architecture through the family's filter."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("convert_checkpoint", REPO / "tools" / "convert_checkpoint.py")
    convert = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(convert)
    weights = official_state_dict(official_shapes(10, d=32, depth=2, d_state=8, head_width=32), torch.Generator().manual_seed(5))
    source, target = tmp_path / "finetune.pth", tmp_path / "finetune.safetensors"
    torch.save(released_file(weights), source)
    assert convert.main([str(source), str(target), "--model", "test_pointmamba_scan"]) == 0
    model = timm.create_model("test_pointmamba_scan", pretrained=True, pretrained_cfg_overlay=dict(file=str(target)))
    torch.testing.assert_close(model.head[8].weight, weights["cls_head_finetune.8.weight"])
    assert convert.main([str(source), str(target), "--model", "test_pointmamba"]) == 1  # ours: bidirectional, RMSNorm
