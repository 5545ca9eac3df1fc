"""Outputs and gradients of a function of named tensors, for comparing a kernel with its reference."""

from __future__ import annotations

import torch


def leaves(inputs: dict, dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
    """Copies that require grad (optionally converted to ``dtype`` or moved to ``device``; strides kept); None entries
    stay None."""
    return {
        k: None if v is None else v.detach().to(device or v.device, dtype or v.dtype).requires_grad_() for k, v in inputs.items()
    }


def run_with_grads(fn, inputs: dict, cotangents) -> tuple:
    """``fn(**inputs)`` (detached) and, for each input that requires grad, the gradient of sum_i <output_i, cotangent_i>.

    ``fn`` returns one tensor or a tuple; ``cotangents`` is one tensor or a tuple of the same length, where None leaves
    that output out of the backward pass (an output the caller does not use).
    """
    outputs = fn(**inputs)
    single = isinstance(outputs, torch.Tensor)
    pairs = [
        (out, cot.to(out.dtype))
        for out, cot in zip((outputs,) if single else outputs, (cotangents,) if single else cotangents)
        if cot is not None
    ]
    torch.autograd.backward([out for out, _ in pairs], [cot for _, cot in pairs])
    detached = outputs.detach() if single else tuple(out.detach() for out in outputs)
    return detached, {k: v.grad for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.requires_grad}


def assert_close_all(actual: dict, expected: dict, **tol) -> None:
    for name in expected:
        torch.testing.assert_close(actual[name].double(), expected[name].double(), **tol, msg=lambda m, n=name: f"d{n}: {m}")
