"""Public selective-scan API: validation, backend dispatch and the ``torch.library`` ops.

Three entry points share one pair of custom ops (``vim::selective_scan_fwd`` and
``vim::selective_scan_bwd``), so ``torch.compile`` traces any model that calls them without a
graph break:

* :func:`selective_scan` has the signature and semantics of mamba_ssm's ``selective_scan_fn``;
* :func:`bidirectional_selective_scan` runs a forward and a reversed scan with different
  parameters in one launch, as a bidirectional Vision Mamba block needs;
* :func:`cross_selective_scan` scans a 2-D token grid in up to four directions (rows, columns, both
  reversed) in one launch and sums them back in grid order, as VMamba's SS2D does.

Layouts: tensors are indexed ``(batch, dim, L)`` as in mamba_ssm, but the kernels read any
strides, and the native (fastest) memory layout is channels-last: a ``(batch, dim, L)`` view of a
contiguous ``(batch, L, dim)`` tensor, which is what a vision block produces. Outputs and
gradients come back in that layout. Reversed scans read memory backwards: nothing is flipped.

Backends: ``"triton"`` (CUDA; also runs on CPU tensors under ``TRITON_INTERPRET=1``),
``"native"`` (the CPU fast path: a fused C kernel, forward and backward, built on first use, see
:mod:`vim.kernels.scan_native`), ``"torch"`` (the chunked pure-PyTorch path, forward and backward),
``"reference"`` (the sequential definition, differentiated by autograd; slow, for debugging).
``"auto"`` picks Triton for CUDA tensors, "native" for CPU tensors where the C kernel is cached or a
C compiler is found, and the chunked path otherwise. Pass ``backend=`` or set the
environment variable ``VIM_SCAN_BACKEND`` to force one. Float64 input always takes the chunked
path (its arithmetic stays in float64), whichever backend is named.

``"auto"`` is resolved inside the custom ops, at run time: looking for the cached kernel or a C
compiler touches the file system, which ``torch.compile`` cannot trace, so a compiled graph holds the
op with ``"auto"`` and the choice is made (once, then cached) when the op runs.
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from .scan_layout import (
    CROSS_SCAN_ORDERS,
    MAX_DIRECTIONS,
    MAX_STATE,
    as_channels_last,
    direction_orders,
    empty_channels_last,
    empty_checkpoints,
    grid_shape,
    step_tokens,
)
from .scan_reference import selective_scan_ref

__all__ = ["BACKENDS", "bidirectional_selective_scan", "cross_selective_scan", "selective_scan"]

BACKENDS = ("auto", "triton", "native", "torch", "reference")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _implementation(backend: str, dtype: torch.dtype):
    """(forward, backward) functions of the "triton", "native" or "torch" backend, imported on first use.

    Float64 input takes the chunked path whatever the backend: the Triton and C kernels compute in float32.
    """
    if backend == "triton" and dtype != torch.float64:
        from .scan_triton import triton_backward, triton_forward

        return triton_forward, triton_backward
    if backend == "native" and dtype != torch.float64:
        from .scan_native import native_backward, native_forward

        return native_forward, native_backward
    from .scan_cpu import chunked_backward, chunked_forward

    return chunked_forward, chunked_backward


def requested_backend(device: torch.device, backend: str | None) -> str:
    """``backend``, else ``$VIM_SCAN_BACKEND``, else "auto"; a named backend is checked against ``device``.

    Traceable by torch.compile: "auto" is returned as is, its choice is left to :func:`resolve_backend`.
    """
    name = backend or os.environ.get("VIM_SCAN_BACKEND", "auto")
    if name not in BACKENDS:
        raise ValueError(f"unknown selective-scan backend {name!r}; expected one of {BACKENDS}")
    if name == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"selective-scan backend 'triton' needs CUDA tensors, got tensors on {device}; "
            "set TRITON_INTERPRET=1 to run the Triton kernels in Triton's interpreter on CPU"
        )
    if name == "native" and device.type != "cpu":
        raise ValueError(
            f"selective-scan backend 'native' (the fused C kernel) needs CPU tensors, got tensors on {device}; "
            "use 'triton' or 'auto' for CUDA tensors"
        )
    return name


def resolve_backend(device: torch.device, backend: str | None = None) -> str:
    """The concrete backend for tensors on ``device``: ``backend``, else ``$VIM_SCAN_BACKEND``, else auto."""
    name = requested_backend(device, backend)
    if name != "auto":
        return name
    if device.type == "cuda":
        return "triton"
    from .scan_native import native_available

    return "native" if device.type == "cpu" and native_available() else "torch"


# ---------------------------------------------------------------------------------------------
# custom ops (canonical form, see scan_layout)
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("vim::selective_scan_fwd", mutates_args=())
def _scan_fwd(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    delta_softplus: bool,
    reverse: bool,
    backend: str,
    orders: list[int],
    grid: list[int],
) -> tuple[Tensor, Tensor]:
    forward, _ = _implementation(resolve_backend(u.device, backend), u.dtype)
    out, checkpoints = forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, orders=orders, grid=grid)
    return as_channels_last(out), checkpoints.contiguous()


@_scan_fwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, backend, orders, grid):
    K, batch, dim, length = u.shape
    out = empty_channels_last(K, batch, dim, length, like=u)
    checkpoints = empty_checkpoints(u, K, batch, length, dim, A.shape[-1])
    return out, checkpoints


@torch.library.custom_op("vim::selective_scan_bwd", mutates_args=())
def _scan_bwd(
    dout: Tensor,
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    delta_softplus: bool,
    reverse: bool,
    backend: str,
    checkpoints: Tensor,
    orders: list[int],
    grid: list[int],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    _, backward = _implementation(resolve_backend(u.device, backend), u.dtype)
    du, ddelta, dA, dB, dC, dD, dz, dbias = backward(
        dout, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, checkpoints, orders=orders, grid=grid
    )
    return (
        as_channels_last(du),
        as_channels_last(ddelta),
        dA.contiguous(),
        dB.contiguous(),
        dC.contiguous(),
        dD.contiguous(),
        dz if dz.numel() == 0 else as_channels_last(dz),
        dbias.contiguous(),
    )


@_scan_bwd.register_fake
def _(dout, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, backend, checkpoints, orders, grid):
    K, batch, dim, length = u.shape
    empty = u.new_empty(0, dtype=torch.float32)
    parameter_dtype = torch.float64 if u.dtype == torch.float64 else torch.float32  # float64 input: chunked, exact
    return (
        empty_channels_last(K, batch, dim, length, like=u),
        empty_channels_last(K, batch, dim, length, like=delta),
        torch.empty_like(A, dtype=parameter_dtype, memory_format=torch.contiguous_format),
        B.new_empty(B.shape),
        C.new_empty(C.shape),
        empty if D is None else D.new_empty(D.shape, dtype=parameter_dtype),
        empty if z is None else empty_channels_last(batch, dim, length, like=z),
        empty if delta_bias is None else delta_bias.new_empty(delta_bias.shape, dtype=parameter_dtype),
    )


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, backend, orders, grid = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, output[1])
    ctx.flags = (delta_softplus, reverse, backend, orders, grid)


def _backward(ctx, dout, _dcheckpoints):
    u, delta, A, B, C, D, z, delta_bias, checkpoints = ctx.saved_tensors
    delta_softplus, reverse, backend, orders, grid = ctx.flags
    # every backend reads dout through its strides: no copy into channels-last
    du, ddelta, dA, dB, dC, dD, dz, dbias = _scan_bwd(
        dout, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, backend, checkpoints, orders, grid
    )
    return (
        du,
        ddelta,
        dA.to(A.dtype),
        dB,
        dC,
        None if D is None else dD.to(D.dtype),
        None if z is None else dz,
        None if delta_bias is None else dbias.to(delta_bias.dtype),
        None,
        None,
        None,
        None,
        None,
    )


_scan_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------


def _check_shape(name: str, x: Tensor | None, expected: tuple, hint: str) -> None:
    if x is not None and tuple(x.shape) != tuple(expected):
        raise ValueError(f"selective_scan: {name} has shape {tuple(x.shape)}, expected {tuple(expected)} {hint}")


def _validate(u, delta, A, B, C, D, z, delta_bias, lead: tuple) -> None:
    """Raise ValueError naming the argument and the shapes for any inconsistent input.

    ``lead`` is ``()`` for :func:`selective_scan`, ``(2,)`` for the bidirectional call and ``(K,)`` for the cross scan.
    """
    k = len(lead)
    if u.dim() != 3 + k or tuple(u.shape[:k]) != lead:
        axes = ", ".join([*map(str, lead), "batch", "dim", "L"])
        raise ValueError(f"selective_scan: u must be ({axes}), got shape {tuple(u.shape)}")
    batch, dim, length = u.shape[k:]
    if length < 1:
        raise ValueError(f"selective_scan: the sequence is empty (u has shape {tuple(u.shape)})")
    if dim < 1:
        raise ValueError(f"selective_scan: u has no channels (dim = 0 in shape {tuple(u.shape)})")
    if A.is_complex():
        raise ValueError(
            f"selective_scan: complex A (dtype {A.dtype}, shape {tuple(A.shape)}) is not supported; "
            "the kernels implement the real-valued A of Mamba and Vision Mamba"
        )
    for name, x in (("u", u), ("delta", delta), ("B", B), ("C", C), ("z", z)):
        if x is not None and x.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"selective_scan: {name} must be a floating tensor, got dtype {x.dtype}")
    if A.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"selective_scan: A must be float32 (or float64), got dtype {A.dtype} with shape {tuple(A.shape)}")
    if A.dim() != 2 + k or tuple(A.shape[:k]) != lead or A.shape[k] != dim:
        raise ValueError(
            f"selective_scan: A has shape {tuple(A.shape)}, expected {(*lead, dim, 'N')} for u of shape {tuple(u.shape)}"
        )
    n_state = A.shape[-1]
    if not 1 <= n_state <= MAX_STATE:
        raise ValueError(f"selective_scan: state size N = {n_state} (A has shape {tuple(A.shape)}) is outside 1..{MAX_STATE}")
    hint = f"for u of shape {tuple(u.shape)} and A of shape {tuple(A.shape)}"
    _check_shape("delta", delta, u.shape, hint)
    for name, x in (("B", B), ("C", C)):
        grouped = x.dim() == 4 + k
        groups = x.shape[k + 1] if grouped else 1
        if x.dim() not in (2 + k, 3 + k, 4 + k) or groups < 1 or dim % groups:
            raise ValueError(
                f"selective_scan: {name} has shape {tuple(x.shape)}, expected {(*lead, batch, n_state, length)}, "
                f"grouped {(*lead, batch, 'G', n_state, length)} with dim {dim} divisible by G, "
                f"or time-invariant {(*lead, dim, n_state)}, {hint}"
            )
        if x.dim() == 2 + k:
            expected = (*lead, dim, n_state)
        else:
            expected = (*lead, batch, groups, n_state, length) if grouped else (*lead, batch, n_state, length)
        _check_shape(name, x, expected, hint)
    _check_shape("D", D, (*lead, dim), hint)
    _check_shape("delta_bias", delta_bias, (*lead, dim), hint)
    _check_shape("z", z, (batch, dim, length), hint)
    devices = {x.device for x in (u, delta, A, B, C, D, z, delta_bias) if x is not None}
    if len(devices) > 1:
        raise ValueError(f"selective_scan: inputs are on different devices: {sorted(map(str, devices))}")


def _with_groups(x: Tensor, lead: int, batch: int, length: int) -> Tensor:
    """B or C as a (.., batch, G, N, L) view, without copying.

    (.., batch, N, L) gets one group; grouped input stays as is; time-invariant (.., dim, N) becomes a
    stride-0 view with one group per channel, which the kernels read through its strides.
    """
    if x.dim() == 2 + lead:
        return x.unsqueeze(lead).unsqueeze(-1).expand(*x.shape[:lead], batch, *x.shape[lead:], length)
    return x.unsqueeze(lead + 1) if x.dim() == 3 + lead else x


def _regroup(x: Tensor, lead: int, groups: int) -> Tensor:
    """(.., batch, G, N, L) -> (.., batch, groups, N, L), group g of G serving groups g * groups / G onwards.

    A single group is broadcast as a stride-0 view; other counts are repeated (a copy).
    """
    axis = lead + 1
    if x.shape[axis] == groups:
        return x
    if x.shape[axis] == 1:
        return x.expand(*x.shape[:axis], groups, *x.shape[axis + 1 :])
    return x.repeat_interleave(groups // x.shape[axis], dim=axis)


def _canonical_B_C(B: Tensor, C: Tensor, lead: int, batch: int, length: int) -> tuple[Tensor, Tensor]:
    """B and C with one group axis and the same number of groups (the kernels read both with one group index)."""
    B, C = (_with_groups(x, lead, batch, length) for x in (B, C))
    groups = math.lcm(B.shape[lead + 1], C.shape[lead + 1])
    return _regroup(B, lead, groups), _regroup(C, lead, groups)


# ---------------------------------------------------------------------------------------------
# public functions
# ---------------------------------------------------------------------------------------------


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    *,
    reverse: bool = False,
    backend: str | None = None,
):
    """Selective scan (Mamba S6), forward and backward, on any device.

    ``h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t``, ``y_t = C_t . h_t + D * u_t``,
    ``out_t = y_t * silu(z_t)``. With ``reverse=True`` the scan runs from the last token to the
    first (reading memory backwards; no flipped copy is made).

    The positional order is that of mamba_ssm's ``selective_scan_fn``; ``reverse`` and ``backend``
    are keyword-only.

    Args:
        u, delta, z: (batch, dim, L); any strides, channels-last is native.
        A: (dim, N) float32 (float64 for float64 input), N <= 64; complex A is refused.
        B, C: (batch, N, L), grouped (batch, G, N, L) with dim divisible by G, or time-invariant (dim, N).
        D, delta_bias: (dim,).
        delta_softplus: apply softplus to ``delta + delta_bias``.
        return_last_state: also return the final state (batch, dim, N) float32 (not differentiable).
        reverse: scan from the last token to the first.
        backend: "auto", "triton", "native", "torch" or "reference" (default: ``$VIM_SCAN_BACKEND`` or auto).

    Returns:
        ``out`` (batch, dim, L) in ``u.dtype``, and the last state if asked for.
    """
    _validate(u, delta, A, B, C, D, z, delta_bias, lead=())
    B, C = _canonical_B_C(B, C, 0, u.shape[0], u.shape[-1])
    backend = requested_backend(u.device, backend)
    if backend == "reference":
        out, last = selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, return_last_state=True)
        return (out, last.float().detach()) if return_last_state else out
    out, checkpoints = _scan_fwd(
        u.unsqueeze(0),
        delta.unsqueeze(0),
        A.unsqueeze(0),
        B.unsqueeze(0),
        C.unsqueeze(0),
        None if D is None else D.unsqueeze(0),
        z,
        None if delta_bias is None else delta_bias.unsqueeze(0),
        delta_softplus,
        reverse,
        backend,
        list(direction_orders(1, False)),
        list(grid_shape(u.shape[-1])),
    )
    out = out.squeeze(0)
    return (out, checkpoints[0, :, -1].detach()) if return_last_state else out


def bidirectional_selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    backend: str | None = None,
) -> Tensor:
    """A forward and a reversed selective scan with separate parameters, in one launch.

    Index 0 of the leading axis is the forward direction, index 1 the reversed one (it reads the
    sequence from the last token to the first and writes its output at the tokens' own
    positions, so no flip is ever needed). The gate ``z`` is shared.

    Args:
        u, delta: (2, batch, dim, L).
        A: (2, dim, N) float32.
        B, C: (2, batch, N, L), grouped (2, batch, G, N, L) or time-invariant (2, dim, N).
        D, delta_bias: (2, dim).
        z: (batch, dim, L), shared by both directions.

    Returns:
        (2, batch, dim, L): each direction's gated output, in ``u.dtype``; sum or average them.
    """
    _validate(u, delta, A, B, C, D, z, delta_bias, lead=(2,))
    B, C = _canonical_B_C(B, C, 1, u.shape[1], u.shape[-1])
    backend = requested_backend(u.device, backend)
    if backend == "reference":
        return torch.stack(
            [
                selective_scan_ref(
                    u[k],
                    delta[k],
                    A[k],
                    B[k],
                    C[k],
                    None if D is None else D[k],
                    z,
                    None if delta_bias is None else delta_bias[k],
                    delta_softplus,
                    reverse=k == 1,
                )
                for k in range(2)
            ]
        )
    orders, grid = list(direction_orders(2, False)), list(grid_shape(u.shape[-1]))
    out, _ = _scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, False, backend, orders, grid)
    return out


def _validate_cross(u: Tensor, delta: Tensor, grid, orders) -> tuple[tuple[int, int], tuple[int, ...]]:
    """The grid (H, W) and the order codes of a cross scan, checked against ``delta`` (K, batch, dim, L) and ``u``."""
    if delta.dim() != 4:
        raise ValueError(f"cross_selective_scan: delta must be (K, batch, dim, L), got shape {tuple(delta.shape)}")
    if u.dim() not in (3, 4):
        raise ValueError(
            f"cross_selective_scan: u must be (batch, dim, L), shared by the directions, or (K, batch, dim, L), "
            f"got shape {tuple(u.shape)}"
        )
    directions, length = delta.shape[0], delta.shape[-1]
    codes = tuple(orders)
    if len(codes) != directions or not 1 <= directions <= MAX_DIRECTIONS:
        raise ValueError(
            f"cross_selective_scan: {len(codes)} orders {codes} for delta of shape {tuple(delta.shape)}: "
            f"expected one order per direction, 1 to {MAX_DIRECTIONS} directions"
        )
    if any(code not in CROSS_SCAN_ORDERS for code in codes):
        raise ValueError(f"cross_selective_scan: orders {codes} must be codes in {CROSS_SCAN_ORDERS}")
    if len(grid) != 2 or min(grid) < 1 or grid[0] * grid[1] != length:
        raise ValueError(f"cross_selective_scan: grid {tuple(grid)} is not (H, W) with H * W == L = {length}")
    return grid_shape(length, grid), codes


def _cross_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, grid, orders) -> Tensor:
    """The sequential reference of :func:`cross_selective_scan`, by definition: each direction's tokens copied into
    its step order, scanned forward, put back in grid order, and the directions summed."""
    merged = []
    for k, order in enumerate(orders):
        steps = step_tokens(order, grid, u.device)
        tokens = torch.argsort(steps)  # the step at which each token is read

        def read(x: Tensor, steps=steps) -> Tensor:
            return x.index_select(-1, steps)

        out = selective_scan_ref(
            read(u[k]), read(delta[k]), A[k], read(B[k]), read(C[k]), None if D is None else D[k],
            None if z is None else read(z), None if delta_bias is None else delta_bias[k], delta_softplus,
        )  # fmt: skip
        merged.append(out.index_select(-1, tokens))
    return torch.stack(merged).sum(0)


def cross_selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = True,
    *,
    grid: tuple[int, int],
    orders: tuple[int, ...] = CROSS_SCAN_ORDERS,
    backend: str | None = None,
) -> Tensor:
    """Selective scans of an (H, W) token grid in K directions (VMamba's SS2D), in one launch, merged in grid order.

    Direction ``k`` walks the grid in the order ``orders[k]``: 0 row by row, 1 column by column, 2 and 3 the same
    reversed (see :mod:`vim.kernels.scan_layout`); the default is VMamba's cross scan. Every tensor stays in grid
    (row-major token) order: each direction reads its steps through index arithmetic and writes its output at
    the tokens' own positions, so nothing is cross-scanned into a copy (the "torch" backend excepted, and the
    "reference" backend, which is the definition). The K outputs are summed (VMamba's cross-merge).

    Args:
        u: (batch, dim, L) shared by the K directions (as VMamba's one conv output), or (K, batch, dim, L).
        delta: (K, batch, dim, L), ``L = H * W``; any strides, channels-last is native.
        A: (K, dim, N) float32.
        B, C: (K, batch, N, L), grouped (K, batch, G, N, L) with dim divisible by G, or time-invariant (K, dim, N).
        D, delta_bias: (K, dim).
        z: (batch, dim, L), the gate shared by the directions.
        delta_softplus: apply softplus to ``delta + delta_bias`` (VMamba does).
        grid: (H, W) with ``H * W == L``.
        orders: one order code per direction, 1 to 4 directions.
        backend: as for :func:`selective_scan`.

    Returns:
        (batch, dim, L) in ``u.dtype``: the sum of the K directions' gated outputs.
    """
    grid, orders = _validate_cross(u, delta, grid, orders)
    if u.dim() == 3:
        u = u.expand(delta.shape[0], *u.shape)  # a stride-0 view: every direction reads the same memory
    _validate(u, delta, A, B, C, D, z, delta_bias, lead=(delta.shape[0],))
    B, C = _canonical_B_C(B, C, 1, u.shape[1], u.shape[-1])
    backend = requested_backend(u.device, backend)
    if backend == "reference":
        return _cross_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, grid, orders)
    out, _ = _scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, False, backend, list(orders), list(grid))
    return out.sum(0)
