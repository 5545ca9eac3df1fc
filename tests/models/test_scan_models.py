"""Whole models on two scan backends, same weights and inputs: the Triton kernels inside a real network.

On a GPU: Vim-Ti (224 px) and VideoMamba-Ti (8 frames of 224 px), forward and backward on CUDA (Triton)
against the CPU ("auto": the fused C kernel). The CPU twins run the same comparison for the tiny test
models, Triton in its interpreter against the C kernel.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch

import vim  # noqa: F401  (registers the models with timm)
from vim.kernels import scan_native

pytest.importorskip("triton")


def _run(model: torch.nn.Module, x: torch.Tensor, dout: torch.Tensor) -> dict[str, torch.Tensor]:
    """The output and every parameter's gradient of <model(x), dout>, as float64 on the CPU."""
    out = model(x)
    out.backward(dout.to(out.device))
    results = {"output": out}
    results |= {f"grad of {name}": p.grad for name, p in model.named_parameters() if p.grad is not None}
    return {name: value.detach().double().cpu() for name, value in results.items()}


def assert_same_model_on_two_backends(name: str, x: torch.Tensor, runs, tolerance: float, monkeypatch, **model_kwargs) -> None:
    """``runs``: two (device, scan backend) pairs; ``tolerance``: largest ||a - b|| / ||b|| of any tensor."""
    torch.manual_seed(0)
    model = timm.create_model(name, **model_kwargs)
    dout = torch.randn(x.shape[0], model.num_classes)
    results = []
    for device, backend in runs:
        monkeypatch.setenv("VIM_SCAN_BACKEND", backend)
        results.append(_run(copy.deepcopy(model).to(device), x.to(device), dout))
    first, second = results
    assert first.keys() == second.keys()
    assert len(first) > 10, "the gradients of the parameters were collected"
    for key, expected in second.items():
        error = (first[key] - expected).norm() / expected.norm().clamp_min(1e-12)
        assert torch.isfinite(first[key]).all(), key
        assert error <= tolerance or (first[key] - expected).abs().max() <= 1e-7, f"{key}: relative error {error:.2e}"


@pytest.fixture
def exact_float32():
    """fp32 matrix products and convolutions without TF32 on the GPU, so the two runs differ only in rounding."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


needs_compiler = pytest.mark.skipif(not scan_native.native_available(), reason="no C compiler to build the fused CPU scan")
CPU_RUNS = [("cpu", "triton"), ("cpu", "native")]
GPU_RUNS = [("cuda", "triton"), ("cpu", "auto")]


# the CPU twins: one block of the tiny test models at 16 px (Triton's interpreter is slow)
@needs_compiler
def test_test_vim_on_triton_matches_the_c_kernel(monkeypatch):
    image = torch.randn(1, 3, 16, 16)
    assert_same_model_on_two_backends("test_vim", image, CPU_RUNS, 1e-5, monkeypatch, depth=1, img_size=16)


@needs_compiler
def test_test_videomamba_on_triton_matches_the_c_kernel(monkeypatch):
    clip = torch.randn(1, 3, 4, 16, 16)
    assert_same_model_on_two_backends("test_videomamba", clip, CPU_RUNS, 1e-5, monkeypatch, depth=1, img_size=16)


@pytest.mark.gpu
def test_vim_tiny_on_gpu_matches_cpu(monkeypatch, exact_float32):
    assert_same_model_on_two_backends("vim_tiny_patch16_224", torch.randn(2, 3, 224, 224), GPU_RUNS, 1e-3, monkeypatch)


@pytest.mark.gpu
def test_videomamba_tiny_on_gpu_matches_cpu(monkeypatch, exact_float32):
    clip = torch.randn(1, 3, 8, 224, 224)
    assert_same_model_on_two_backends("videomamba_tiny", clip, GPU_RUNS, 1e-3, monkeypatch, num_classes=400)
