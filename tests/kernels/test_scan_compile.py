"""torch.compile(fullgraph=True) of whole models with the default scan backend ("auto"), forward and backward.

"auto" is resolved inside the custom ops when they run (looking for a C compiler touches the file system,
which Dynamo cannot trace), so a default compile traces the whole model in one graph.
"""

from __future__ import annotations

import pytest
import timm
import torch

import vim  # noqa: F401  (registers the models with timm)
from vim.kernels import scan_native


def _forward_backward(model: torch.nn.Module, run, x: torch.Tensor, dout: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """``run(x)`` (the model or its compiled form) and the gradient of <out, dout> for each of the model's parameters."""
    model.zero_grad(set_to_none=True)
    out = run(x)
    out.backward(dout)
    return out.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def _assert_compiled_matches_eager(name: str, x: torch.Tensor, rtol: float, atol: float) -> None:
    """Compiled first (nothing chosen or loaded yet, as in a fresh process), then eager."""
    torch.manual_seed(0)
    model = timm.create_model(name).to(x.device)
    dout = torch.randn(x.shape[0], model.num_classes, device=x.device)
    torch._dynamo.reset()
    out, grads = _forward_backward(model, torch.compile(model, fullgraph=True), x, dout)
    expected, expected_grads = _forward_backward(model, model, x, dout)
    torch.testing.assert_close(out, expected, rtol=rtol, atol=atol)
    for param, grad in expected_grads.items():
        torch.testing.assert_close(grads[param], grad, rtol=rtol, atol=atol, msg=lambda m, p=param: f"grad of {p}: {m}")


@pytest.mark.slow  # about 30 s of CPU compiling C++ from a cold Inductor cache
def test_fullgraph_compile_of_test_vim_with_default_settings(monkeypatch):
    """The default compiler (Inductor) and the default scan backend, as a user calls them."""
    monkeypatch.delenv("VIM_SCAN_BACKEND", raising=False)
    monkeypatch.setattr(scan_native, "_library", None)  # as in a fresh process: the C kernel not loaded yet
    monkeypatch.setattr(scan_native, "_unavailable", None)
    scan_native._find_compiler.cache_clear()
    scan_native._found_in_cache.cache_clear()
    _assert_compiled_matches_eager("test_vim", torch.randn(2, 3, 32, 32), rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_fullgraph_compile_of_vim_tiny_on_gpu(monkeypatch):
    """Vim-Ti at 224 px on the GPU: the Triton ops inside one Inductor graph, forward and backward."""
    monkeypatch.delenv("VIM_SCAN_BACKEND", raising=False)
    _assert_compiled_matches_eager("vim_tiny_patch16_224", torch.randn(2, 3, 224, 224, device="cuda"), rtol=1e-3, atol=1e-3)
