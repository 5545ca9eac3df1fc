"""Fused residual add + RMSNorm / LayerNorm of a Mamba block: the PyTorch definition, dispatch and ``torch.library`` ops.

A Vision Mamba block (and PointMamba's) adds the previous mixer output to a float32 residual stream,
then normalises the stream in the norm weight's dtype::

    normed, residual = add_norm(hidden, residual, norm.weight, norm.bias, norm.eps, norm="rms")

On CUDA this runs as one Triton kernel forward and one backward (:mod:`vim.kernels.add_norm_triton`)
behind the custom ops ``vim::add_norm_fwd`` and ``vim::add_norm_bwd``, which have fake implementations
so ``torch.compile(fullgraph=True)`` traces them. Elsewhere, for float64 and for rows wider than
:data:`MAX_DIM` (2048), the PyTorch ops of :func:`add_norm_ref` run
(differentiated by autograd). The backend is chosen as for the selective scan
(``backend=``, else ``$VIM_SCAN_BACKEND``, else auto): "triton" runs the kernels (CPU tensors under
``TRITON_INTERPRET=1``), any other backend the PyTorch ops.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .add_norm_reference import MAX_DIM, NORMS, add_norm_ref
from .selective_scan import requested_backend

__all__ = ["MAX_DIM", "NORMS", "add_norm", "add_norm_ref"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ---------------------------------------------------------------------------------------------
# custom ops around the Triton kernels
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("vim::add_norm_fwd", mutates_args=())
def _add_norm_fwd(
    hidden: Tensor, residual: Tensor | None, weight: Tensor, bias: Tensor | None, eps: float, is_rms: bool
) -> tuple[Tensor, Tensor]:
    from .add_norm_triton import triton_add_norm_forward

    return triton_add_norm_forward(hidden, residual, weight, bias, eps, is_rms)


@_add_norm_fwd.register_fake
def _(hidden, residual, weight, bias, eps, is_rms):
    return hidden.new_empty(hidden.shape, dtype=weight.dtype), hidden.new_empty(hidden.shape, dtype=torch.float32)


@torch.library.custom_op("vim::add_norm_bwd", mutates_args=())
def _add_norm_bwd(
    dnormed: Tensor,
    dresidual_out: Tensor | None,
    residual_out: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    eps: float,
    is_rms: bool,
    store_sum: bool,
    hidden_dtype: torch.dtype | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from .add_norm_triton import triton_add_norm_backward

    return triton_add_norm_backward(dnormed, dresidual_out, residual_out, weight, bias, eps, is_rms, store_sum, hidden_dtype)


@_add_norm_bwd.register_fake
def _(dnormed, dresidual_out, residual_out, weight, bias, eps, is_rms, store_sum, hidden_dtype):
    empty = residual_out.new_empty(0)
    return (
        torch.empty_like(residual_out) if store_sum else empty,
        residual_out.new_empty(residual_out.shape, dtype=hidden_dtype) if hidden_dtype is not None else empty.clone(),
        torch.empty_like(weight),
        torch.empty_like(bias) if bias is not None else empty.clone(),
    )


def _setup_context(ctx, inputs, output):
    hidden, residual, weight, bias, eps, is_rms = inputs
    ctx.save_for_backward(output[1], weight, bias)
    ctx.flags = (eps, is_rms, residual is not None, hidden.dtype)
    ctx.set_materialize_grads(False)  # an unused residual_out (the last block's) costs no pass over zeros


def _backward(ctx, dnormed, dresidual_out):
    residual_out, weight, bias = ctx.saved_tensors
    eps, is_rms, has_residual, hidden_dtype = ctx.flags
    if dnormed is None:  # only the stream was used: its gradient passes straight to hidden and residual
        return dresidual_out.to(hidden_dtype), dresidual_out if has_residual else None, None, None, None, None
    # the stream's float32 gradient serves the residual, and a float32 hidden; another dtype gets its own copy
    store_sum = has_residual or hidden_dtype == torch.float32
    dsum, dhidden, dweight, dbias = _add_norm_bwd(
        dnormed, dresidual_out, residual_out, weight, bias, eps, is_rms, store_sum,
        None if hidden_dtype == torch.float32 else hidden_dtype,
    )  # fmt: skip
    return (
        dsum if hidden_dtype == torch.float32 else dhidden,
        dsum if has_residual else None,
        dweight,
        dbias if bias is not None else None,
        None,
        None,
    )


_add_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# validation and the public function
# ---------------------------------------------------------------------------------------------


def _validate(hidden: Tensor, residual: Tensor | None, weight: Tensor, bias: Tensor | None, eps: float | None, norm: str) -> None:
    """Raise ValueError naming the argument for bad input."""
    if norm not in NORMS:
        raise ValueError(f"add_norm: unknown norm {norm!r}; expected one of {NORMS}")
    if eps is None and norm != "rms":
        raise ValueError("add_norm: eps=None (the default of torch.nn.RMSNorm) is for norm='rms'; LayerNorm needs a number")
    if hidden.dim() != 3:
        raise ValueError(f"add_norm: hidden must be (batch, L, dim), got shape {tuple(hidden.shape)}")
    dim = hidden.shape[-1]
    if residual is not None:
        if residual.shape != hidden.shape:
            raise ValueError(f"add_norm: residual has shape {tuple(residual.shape)}, hidden {tuple(hidden.shape)}")
        if residual.dtype != torch.float32:
            raise ValueError(f"add_norm: residual must be the float32 residual stream, got dtype {residual.dtype}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (dim,):
            raise ValueError(
                f"add_norm: {name} has shape {tuple(t.shape)}, expected ({dim},) for hidden of shape {tuple(hidden.shape)}"
            )
    tensors = {"hidden": hidden, "residual": residual, "weight": weight, "bias": bias}
    for name, t in tensors.items():
        if t is not None and t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"add_norm: {name} must be a floating tensor, got dtype {t.dtype}")
    devices = {t.device for t in tensors.values() if t is not None}
    if len(devices) > 1:
        raise ValueError(f"add_norm: inputs are on different devices: {sorted(map(str, devices))}")


def add_norm(
    hidden: Tensor,
    residual: Tensor | None,
    weight: Tensor,
    bias: Tensor | None = None,
    eps: float | None = 1e-5,
    norm: str = "rms",
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Residual add + RMSNorm or LayerNorm, as a Mamba block runs them; gradients to every tensor input.

    ``residual_out = (hidden if residual is None else residual + hidden).float()`` and
    ``normed = norm(residual_out.to(weight.dtype))``: ``torch.nn.RMSNorm`` semantics (``+ bias`` if given)
    for ``norm="rms"``, ``F.layer_norm`` for ``norm="layer"``. Stochastic depth stays with the caller,
    which scales ``hidden`` first.

    Args:
        hidden: (B, L, D), any strides: the previous mixer's output (or the embedded tokens).
        residual: (B, L, D) float32, any strides: the residual stream; None for the first block.
        weight, bias: (D,) the norm's parameters; bias None for none.
        eps: added to the variance (mean square for RMSNorm). None is ``torch.nn.RMSNorm``'s default (the
            machine epsilon of its float32 arithmetic, float64 for float64), so any RMSNorm's ``eps`` can be passed.
        norm: "rms" or "layer".
        backend: "triton" runs the fused kernels (CUDA, or CPU under ``TRITON_INTERPRET=1``); "auto",
            "native", "torch" or "reference" the PyTorch ops on CPU (default: ``$VIM_SCAN_BACKEND`` or auto,
            i.e. Triton for CUDA tensors).

    Returns:
        ``normed`` (B, L, D) in ``weight.dtype`` and ``residual_out`` (B, L, D) float32 (contiguous from the kernels).
    """
    _validate(hidden, residual, weight, bias, eps, norm)
    backend = requested_backend(hidden.device, backend)
    use_triton = (backend == "triton" or (backend == "auto" and hidden.is_cuda)) and hidden.shape[-1] <= MAX_DIM
    if not use_triton or torch.float64 in {hidden.dtype, weight.dtype}:
        return add_norm_ref(hidden, residual, weight, bias, eps, norm)
    eps = torch.finfo(torch.float32).eps if eps is None else float(eps)  # the kernels' arithmetic is float32
    return _add_norm_fwd(hidden, residual, weight, bias, eps, norm == "rms")
