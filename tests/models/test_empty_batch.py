"""A batch of 0: every kernel on every CPU backend, and every family through timm's API, as timm's own models do.

timm's models take an empty batch and give an empty result, with gradients of zero for every parameter (a ViT
does); the kernels return empty outputs and gradients of the inputs' shapes, zero for the parameters. Memory
left unwritten is NaN here (``poison_uninitialized_memory``), so a gradient nobody writes is caught.
"""

from __future__ import annotations

import pytest
import timm
import torch

from vim.kernels import add_norm, bidirectional_selective_scan, causal_conv1d_silu, selective_scan

pytestmark = pytest.mark.usefixtures("poison_uninitialized_memory")  # tests/conftest.py

KERNEL_BACKENDS = ["native", "torch", "reference", "triton"]  # triton: in its interpreter without CUDA
MODEL_BACKENDS = ["native", "torch", "reference"]
BATCH, DIM, LENGTH, STATE, WIDTH = 0, 4, 5, 3, 4


def _leaf(*shape: int) -> torch.Tensor:
    return torch.randn(*shape).requires_grad_()


def _scan(backend: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    inputs = dict(
        u=_leaf(BATCH, DIM, LENGTH), delta=_leaf(BATCH, DIM, LENGTH), A=_leaf(DIM, STATE), B=_leaf(BATCH, STATE, LENGTH),
        C=_leaf(BATCH, STATE, LENGTH), D=_leaf(DIM), z=_leaf(BATCH, DIM, LENGTH), delta_bias=_leaf(DIM),
    )  # fmt: skip
    return selective_scan(**inputs, delta_softplus=True, backend=backend), inputs


def _bidirectional_scan(backend: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    inputs = dict(
        u=_leaf(2, BATCH, DIM, LENGTH), delta=_leaf(2, BATCH, DIM, LENGTH), A=_leaf(2, DIM, STATE),
        B=_leaf(2, BATCH, STATE, LENGTH), C=_leaf(2, BATCH, STATE, LENGTH), D=_leaf(2, DIM), z=_leaf(BATCH, DIM, LENGTH),
        delta_bias=_leaf(2, DIM),
    )  # fmt: skip
    return bidirectional_selective_scan(**inputs, delta_softplus=True, backend=backend), inputs


def _conv(backend: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    inputs = dict(x=_leaf(BATCH, LENGTH, DIM), weight=_leaf(DIM, 1, WIDTH), bias=_leaf(DIM), weight_b=_leaf(DIM, 1, WIDTH))
    inputs["bias_b"] = _leaf(DIM)
    return causal_conv1d_silu(**inputs, backend=backend), inputs


def _add_norm(backend: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    inputs = dict(hidden=_leaf(BATCH, LENGTH, DIM), residual=_leaf(BATCH, LENGTH, DIM), weight=_leaf(DIM), bias=_leaf(DIM))
    normed, residual = add_norm(**inputs, backend=backend)
    return torch.stack([normed, residual]), inputs


EXPECTED_OUT = {
    _scan: (BATCH, DIM, LENGTH),
    _bidirectional_scan: (2, BATCH, DIM, LENGTH),
    _conv: (2, BATCH, LENGTH, DIM),
    _add_norm: (2, BATCH, LENGTH, DIM),
}


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("op", list(EXPECTED_OUT), ids=lambda op: op.__name__.strip("_"))
def test_kernels_take_an_empty_batch_forward_and_backward(op, backend: str) -> None:
    out, inputs = op(backend)
    assert out.shape == EXPECTED_OUT[op]
    out.sum().backward()
    for name, x in inputs.items():
        assert x.grad is not None and x.grad.shape == x.shape, name
        assert (x.grad == 0).all(), f"{name}: a parameter of an empty batch gets a zero gradient"


FAMILIES = {  # model: a batch of one input
    "test_vim": (1, 3, 32, 32),
    "test_videomamba": (1, 3, 4, 32, 32),
    "test_pointmamba": (1, 128, 3),
    "test_pointmamba_scan": (1, 128, 3),
    "test_vmamba": (1, 3, 64, 64),
    "test_mambavision": (1, 3, 64, 64),
}


def _empty_like_batch_of_one(model_name: str) -> torch.Tensor:
    return torch.randn(0, *FAMILIES[model_name][1:])


@pytest.mark.parametrize("backend", MODEL_BACKENDS)
@pytest.mark.parametrize("model_name", list(FAMILIES))
def test_every_family_takes_an_empty_batch(model_name: str, backend: str) -> None:
    torch.manual_seed(0)
    model = timm.create_model(model_name, scan_backend=backend)
    with torch.no_grad():  # the reference: one input's shapes, the batch axis then set to 0
        one = model.eval().forward_features(torch.randn(FAMILIES[model_name]))
    model.train()
    features = model.forward_features(_empty_like_batch_of_one(model_name))
    assert features.shape == (0, *one.shape[1:])
    logits = model.forward_head(features)
    assert logits.shape == (0, model.num_classes)
    logits.sum().backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and (parameter.grad == 0).all(), f"{name}: zero gradient, as timm's ViT gives"
    assert all(buffer.isfinite().all() for buffer in model.buffers() if buffer.is_floating_point()), "batch-norm statistics"


@pytest.mark.parametrize("model_name", list(FAMILIES))
def test_forward_intermediates_of_an_empty_batch(model_name: str) -> None:
    model = timm.create_model(model_name).eval()
    final_one, intermediates_one = model.forward_intermediates(torch.randn(FAMILIES[model_name]), indices=1)
    final, intermediates = model.forward_intermediates(_empty_like_batch_of_one(model_name), indices=1)
    assert final.shape == (0, *final_one.shape[1:])
    assert [t.shape for t in intermediates] == [(0, *t.shape[1:]) for t in intermediates_one]


# VideoMamba has no features_only: its (B, D, T', H', W') maps have no format in timm's Format
@pytest.mark.parametrize("model_name", ["test_vim", "test_pointmamba", "test_pointmamba_scan", "test_vmamba", "test_mambavision"])
def test_features_only_of_an_empty_batch(model_name: str) -> None:
    features = timm.create_model(model_name, features_only=True, out_indices=(1,)).eval()
    [one] = features(torch.randn(FAMILIES[model_name]))
    [empty] = features(_empty_like_batch_of_one(model_name))
    assert empty.shape == (0, *one.shape[1:])
