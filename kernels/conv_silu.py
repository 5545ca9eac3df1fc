"""Public conv + SiLU API: validation, backend dispatch and the ``torch.library`` ops.

:func:`causal_conv1d_silu` runs the depthwise causal conv + SiLU that precedes a Mamba scan, for one
direction or for both directions of a bidirectional block in one pass (the backward direction's causal
conv seen from the original order, so its scan can read the sequence backwards without a flipped copy;
see :mod:`vim.kernels.conv_silu_reference` for the definition). Each direction's taps are passed as
``nn.Conv1d`` stores them, so nothing is stacked per call. ``padding="same"`` runs a centred conv instead
(``F.conv1d(padding="same")``, MambaVision's): the same kernels on ``x`` with zero rows appended, output shifted.

Two custom ops (``vim::conv1d_silu_fwd`` and ``vim::conv1d_silu_bwd``) carry the fused backends, with
fake implementations, so ``torch.compile(fullgraph=True)`` traces a model that calls them.

Backends, chosen as for the selective scan (:func:`vim.kernels.resolve_backend`: ``backend=``, else
``$VIM_SCAN_BACKEND``, else auto): ``"triton"`` (CUDA; CPU tensors under ``TRITON_INTERPRET=1``),
``"native"`` (the C kernel in ``scan_native.c``, vectorised over channels, built on first use),
``"torch"`` (``F.conv1d`` + ``F.silu``, differentiated by autograd inside the ops), ``"reference"``
(the same PyTorch ops called directly, no custom op). Auto picks Triton for CUDA tensors, "native"
for CPU tensors where the C kernel is cached or a C compiler is found, and "torch" otherwise. Float64
input takes the "torch" path whatever the backend, so its arithmetic stays float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .conv_silu_reference import MAX_WIDTH, causal_conv1d_silu_ref, reference_backward
from .selective_scan import requested_backend, resolve_backend

__all__ = ["causal_conv1d_silu"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _implementation(backend: str, device: torch.device):
    """(forward, backward) of the "triton", "native" or "torch" backend ("auto" resolved for ``device``), imported on use."""
    backend = resolve_backend(device, backend)
    if backend == "triton":
        from .conv_silu_triton import triton_conv_backward, triton_conv_forward

        return triton_conv_forward, triton_conv_backward
    if backend == "native":
        from .conv_silu_native import native_conv_backward, native_conv_forward

        return native_conv_forward, native_conv_backward
    return causal_conv1d_silu_ref, reference_backward


# ---------------------------------------------------------------------------------------------
# custom ops: x (B, L, C) any strides; taps (C, W); out (K, B, L, C) contiguous
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("vim::conv1d_silu_fwd", mutates_args=())
def _conv_fwd(
    x: Tensor, weight: Tensor, bias: Tensor | None, weight_b: Tensor | None, bias_b: Tensor | None, backend: str
) -> Tensor:
    forward, _ = _implementation(backend, x.device)
    return forward(x, weight, bias, weight_b, bias_b).contiguous()


@_conv_fwd.register_fake
def _(x, weight, bias, weight_b, bias_b, backend):
    return x.new_empty(1 if weight_b is None else 2, *x.shape)


@torch.library.custom_op("vim::conv1d_silu_bwd", mutates_args=())
def _conv_bwd(
    dout: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None, weight_b: Tensor | None, bias_b: Tensor | None, backend: str
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    _, backward = _implementation(backend, x.device)
    dx, dweight, dbias, dweight_b, dbias_b = backward(dout, x, weight, bias, weight_b, bias_b)

    def dense(grad: Tensor | None) -> Tensor:
        """A custom op returns tensors only, none aliasing another: an absent parameter gets an empty gradient."""
        return x.new_empty(0) if grad is None else grad.contiguous()

    return dense(dx), dense(dweight), dense(dbias), dense(dweight_b), dense(dbias_b)


@_conv_bwd.register_fake
def _(dout, x, weight, bias, weight_b, bias_b, backend):
    def like(t: Tensor | None) -> Tensor:
        return x.new_empty(0) if t is None else torch.empty_like(t, memory_format=torch.contiguous_format)

    return like(x), like(weight), like(bias), like(weight_b), like(bias_b)


def _setup_context(ctx, inputs, output):
    x, weight, bias, weight_b, bias_b, backend = inputs
    ctx.save_for_backward(x, weight, bias, weight_b, bias_b)
    ctx.backend = backend


def _backward(ctx, dout):
    x, weight, bias, weight_b, bias_b = ctx.saved_tensors
    grads = _conv_bwd(dout, x, weight, bias, weight_b, bias_b, ctx.backend)
    present = (x, weight, bias, weight_b, bias_b)
    return (*(None if t is None else g for t, g in zip(present, grads)), None)


_conv_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# validation and the public function
# ---------------------------------------------------------------------------------------------


def _taps(name: str, weight: Tensor, channels: int, x: Tensor) -> Tensor:
    """``weight`` (C, 1, W) or (C, W) as a (C, W) view; ValueError naming it otherwise."""
    taps = weight.squeeze(1) if weight.dim() == 3 and weight.shape[1] == 1 else weight
    if taps.dim() != 2 or taps.shape[0] != channels or not 1 <= taps.shape[1] <= MAX_WIDTH:
        raise ValueError(
            f"causal_conv1d_silu: {name} has shape {tuple(weight.shape)}, expected ({channels}, 1, W) or ({channels}, W) "
            f"with 1 <= W <= {MAX_WIDTH} for x of shape {tuple(x.shape)}"
        )
    return taps


def _validate(x: Tensor, weight: Tensor, bias, weight_b, bias_b) -> tuple[Tensor, Tensor | None]:
    """Raise ValueError naming the argument for bad input; the taps as (C, W) views."""
    if x.dim() != 3 or x.shape[1] < 1:
        raise ValueError(f"causal_conv1d_silu: x must be (batch, L, channels) with L >= 1, got shape {tuple(x.shape)}")
    channels = x.shape[-1]
    weight = _taps("weight", weight, channels, x)
    if weight_b is not None:
        weight_b = _taps("weight_b", weight_b, channels, x)
        if weight_b.shape != weight.shape:
            raise ValueError(f"causal_conv1d_silu: weight_b has width {weight_b.shape[-1]}, weight {weight.shape[-1]}")
    elif bias_b is not None:
        raise ValueError("causal_conv1d_silu: bias_b is given without weight_b (the backward direction's taps)")
    for name, b in (("bias", bias), ("bias_b", bias_b)):
        if b is not None and tuple(b.shape) != (channels,):
            raise ValueError(
                f"causal_conv1d_silu: {name} has shape {tuple(b.shape)}, expected ({channels},) for x of shape {tuple(x.shape)}"
            )
    tensors = {"x": x, "weight": weight, "bias": bias, "weight_b": weight_b, "bias_b": bias_b}
    for name, t in tensors.items():
        if t is not None and t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"causal_conv1d_silu: {name} must be a floating tensor, got dtype {t.dtype}")
    devices = {t.device for t in tensors.values() if t is not None}
    if len(devices) > 1:
        raise ValueError(f"causal_conv1d_silu: inputs are on different devices: {sorted(map(str, devices))}")
    return weight, weight_b


def causal_conv1d_silu(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    weight_b: Tensor | None = None,
    bias_b: Tensor | None = None,
    backend: str | None = None,
    padding: str = "causal",
) -> Tensor:
    """Depthwise causal conv + SiLU of one direction, or of both directions of a bidirectional block (or centred: ``padding``).

    ``out[0, b, t] = silu(bias + sum_i weight[:, i] * x[b, t - (W-1) + i])`` (the causal conv) and, with
    ``weight_b``, ``out[1, b, t] = silu(bias_b + sum_i weight_b[:, i] * x[b, t + (W-1) - i])``: the backward
    direction's causal conv on the reversed sequence, given back in the original order. ``x`` is zero
    outside the sequence. Gradients flow to ``x`` and every weight and bias.

    Args:
        x: (B, L, C), any strides (e.g. the first half of a mixer's input projection, rows 2C apart).
        weight, weight_b: (C, 1, W) as ``nn.Conv1d`` stores them, or (C, W); W <= 8. ``weight_b`` None for
            one direction.
        bias, bias_b: (C,) or None.
        backend: "auto", "triton", "native", "torch" or "reference" (default: ``$VIM_SCAN_BACKEND`` or auto).
        padding: "causal" (the formulas above) or "same": one direction centred on the token like
            ``F.conv1d(padding="same")``, ``out[0, b, t] = silu(bias + sum_i weight[:, i] * x[b, t - (W-1)//2 + i])``.

    Returns:
        (K, B, L, C) contiguous in ``x.dtype`` (K = 2 with ``weight_b``, else 1); for "same" (K = 1) a view whose
        batch elements are ``W // 2`` rows further apart. The fused backends compute in float32 whatever the
        weights' dtype; the PyTorch paths in the promoted dtype of ``x`` and the weights.
    """
    weight, weight_b = _validate(x, weight, bias, weight_b, bias_b)
    backend = requested_backend(x.device, backend)  # "auto" is resolved inside the op: see selective_scan
    lookahead = _lookahead(padding, weight, weight_b)
    if lookahead:
        # the centred conv at t is the causal conv at t + lookahead of x followed by lookahead zero rows: the
        # fused kernels run unchanged (forward+backward on CPU: 10% over a causal conv of x; F.conv1d took twice as long)
        x = F.pad(x, (0, 0, 0, lookahead))
    if backend == "reference":
        out = causal_conv1d_silu_ref(x, weight, bias, weight_b, bias_b)
    else:
        out = _conv_fwd(x, weight, bias, weight_b, bias_b, "torch" if x.dtype == torch.float64 else backend)
    return out[:, :, lookahead:] if lookahead else out


def _lookahead(padding: str, weight: Tensor, weight_b: Tensor | None) -> int:
    """How many taps read tokens after the current one: 0 for "causal", ``W // 2`` for "same"; ValueError otherwise."""
    if padding == "causal":
        return 0
    if padding != "same":
        raise ValueError(f"causal_conv1d_silu: padding must be 'causal' or 'same', got {padding!r}")
    if weight_b is not None:
        raise ValueError("causal_conv1d_silu: padding='same' runs one direction; weight_b is given")
    return weight.shape[-1] // 2  # F.conv1d's "same" puts (W - 1) // 2 zeros before and the rest after
