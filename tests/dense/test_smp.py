"""segmentation_models_pytorch on every image family: the hierarchical ones by their timm names in smp's UPerNet, FPN
and Unet, Vim in smp's DPT and, through vim.dense's pyramid, in UPerNet (vim.dense.segmentation). Each model: the
(B, classes, H, W) output, and one training step with a finite loss and a gradient on every encoder parameter.
"""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

import vim.dense

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: see tests/conftest.py

smp = pytest.importorskip("segmentation_models_pytorch")
segmentation = pytest.importorskip("vim.dense.segmentation")

HIERARCHICAL = {"test_vmamba": [16, 32, 64, 128], "test_mambavision": [16, 32, 64, 128]}  # their stage widths
VIM_PATCH16 = dict(patch_size=16, stride=16)  # test_vim in the registered vim_*_patch16_224 layout (no overlap)
CLASSES = 3


def _train_step(model: torch.nn.Module, encoder: torch.nn.Module, unused: tuple[str, ...] = ()) -> None:
    """One SGD step of cross-entropy on random masks for two 64 x 96 images: the logits are (2, CLASSES, 64, 96), the
    loss finite, every encoder parameter gets a gradient (but those whose names start with one of ``unused``)."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 64, 96, generator=generator)
    masks = torch.randint(0, CLASSES, (2, 64, 96), generator=generator)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    logits = model(images)
    assert logits.shape == (2, CLASSES, 64, 96)
    loss = F.cross_entropy(logits, masks)
    assert torch.isfinite(loss)
    loss.backward()
    used = [(key, p) for key, p in encoder.named_parameters() if not key.startswith(unused)]
    missing = [key for key, p in used if p.grad is None or not p.grad.abs().sum() > 0]
    assert used and not missing, f"no gradient reached {missing}"
    optimizer.step()


@pytest.mark.parametrize("architecture", ["UPerNet", "FPN", "Unet"])
@pytest.mark.parametrize("name", sorted(HIERARCHICAL))
def test_hierarchical_family_by_its_timm_name(name: str, architecture: str) -> None:
    """smp.<architecture>(encoder_name="tu-<name>"): smp reads the maps as a "transformer-style" encoder (stride 4 to 32)
    of the family's stage widths, and the model trains."""
    torch.manual_seed(0)
    model = getattr(smp, architecture)(encoder_name=f"tu-{name}", encoder_weights=None, classes=CLASSES)
    assert model.encoder.out_channels == [3, 0, *HIERARCHICAL[name]]
    _train_step(model, model.encoder)


def test_weights_from_a_file_reach_smps_encoder(tmp_path) -> None:
    """encoder_weights=True with pretrained_cfg_overlay=dict(file=...) loads the file through timm, as timm.create_model
    does: the encoder's trunk holds the file's tensors."""
    torch.manual_seed(0)
    source = timm.create_model("test_vmamba")
    path = tmp_path / "test_vmamba.pth"
    torch.save(source.state_dict(), path)
    model = smp.UPerNet(
        encoder_name="tu-test_vmamba", encoder_weights=True, classes=CLASSES, pretrained_cfg_overlay=dict(file=str(path))
    )
    loaded = model.encoder.model.model.state_dict()  # smp's encoder -> timm's feature getter -> the model
    assert loaded and all(torch.equal(value, source.state_dict()[key]) for key, value in loaded.items())


@pytest.mark.parametrize("readout", ["cat", "ignore"])
def test_vim_in_dpt(readout: str) -> None:
    """smp.DPT(encoder_name="tu-test_vim"): the four blocks at stride 16 with their class token (readout "cat" uses it),
    and the model trains. smp keeps the whole timm model, as it does a timm ViT: the final norm (and a classifier,
    unless num_classes=0) get no gradient."""
    torch.manual_seed(0)
    model = smp.DPT(
        encoder_name="tu-test_vim", encoder_weights=None, classes=CLASSES, decoder_readout=readout,
        decoder_intermediate_channels=(32, 32, 32, 32), decoder_fusion_channels=32, num_classes=0, **VIM_PATCH16,
    )  # fmt: skip
    assert model.encoder.has_prefix_tokens and model.encoder.output_strides == [16] * 4 and model.encoder.out_channels == [32] * 4
    _train_step(model, model.encoder, unused=("model.norm_f.",))


@pytest.mark.parametrize("layers", [None, [0, 1, 2, 3]])
def test_vim_in_upernet_through_the_pyramid(layers) -> None:
    """vim.dense.segmentation.UPerNet("test_vim"): smp's UPerNet decoder on the simple pyramid of the last block (or of
    blocks 0..3), which SmpEncoder hands over as smp's feature list; the model trains."""
    torch.manual_seed(0)
    model = segmentation.UPerNet("test_vim", classes=CLASSES, layers=layers, decoder_channels=32, **VIM_PATCH16)
    assert model.encoder.out_channels == [3, 0, 32, 32, 32, 32]
    images = torch.randn(2, 3, 64, 96)
    features = model.encoder(images)
    with torch.no_grad():
        expected = list(model.encoder.dense(images).values())
    assert [tuple(x.shape) for x in features] == [(2, 3, 64, 96), (2, 0, 32, 48)] + [
        (2, 32, 64 // s, 96 // s) for s in (4, 8, 16, 32)
    ]
    for ours, reference in zip(features[2:], expected, strict=True):
        torch.testing.assert_close(ours, reference)
    _train_step(model, model.encoder)


def test_smp_encoder_takes_the_raw_maps_only() -> None:
    with pytest.raises(ValueError, match=r"build the backbone with vim.dense.backbone\(name, fpn=False\)"):
        segmentation.SmpEncoder(vim.dense.backbone("test_vim", **VIM_PATCH16))
