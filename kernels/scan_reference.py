"""Sequential selective scan in plain PyTorch: the definition every fast path is tested against.

It walks the sequence one step at a time, exactly as the recurrence is written, and works in
float64 when given float64 input. Slow by design; use it for tests and debugging only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _expand_groups(x: torch.Tensor, dim: int) -> torch.Tensor:
    """(batch, N, L) or (batch, G, N, L) -> (batch, dim, N, L), group g serving dim // G channels."""
    if x.dim() == 3:
        x = x.unsqueeze(1)
    return x.repeat_interleave(dim // x.shape[1], dim=1)


def selective_scan_ref(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    reverse: bool = False,
    return_last_state: bool = False,
    return_all_states: bool = False,
):
    """Selective scan (Mamba S6), one step at a time.

    ``h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t``, ``y_t = C_t . h_t + D * u_t``,
    ``out_t = y_t * silu(z_t)``; with ``reverse`` the steps run from ``t = L - 1`` down to 0.

    Args:
        u, delta, z: (batch, dim, L).
        A: (dim, N).
        B, C: (batch, N, L) or grouped (batch, G, N, L).
        D, delta_bias: (dim,).
        return_all_states: also return every state, (batch, dim, L, N), indexed by time.

    Returns:
        ``out`` (batch, dim, L) in ``u.dtype``; with ``return_last_state`` also the final state
        (batch, dim, N) in the compute dtype (float64 for float64 input, else float32).
    """
    dtype = u.dtype
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    u, delta, A = u.to(compute), delta.to(compute), A.to(compute)
    if delta_bias is not None:
        delta = delta + delta_bias.to(compute)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    dim, length = u.shape[1], u.shape[2]
    B = _expand_groups(B.to(compute), dim).transpose(-1, -2)  # (batch, dim, L, N)
    C = _expand_groups(C.to(compute), dim).transpose(-1, -2)

    # every step's h -> a h + b at once; the loop is the recurrence alone. unbind (not indexing) keeps the
    # backward linear in L: one stack of the per-step gradients instead of a full-size tensor per step
    decays = torch.exp(delta.unsqueeze(-1) * A[:, None, :]).unbind(2)
    drives = ((delta * u).unsqueeze(-1) * B).unbind(2)
    h = u.new_zeros(u.shape[0], dim, A.shape[1])
    states = []
    for t in range(length - 1, -1, -1) if reverse else range(length):
        h = decays[t] * h + drives[t]
        states.append(h)
    if reverse:
        states.reverse()  # in token order
    all_states = torch.stack(states, dim=2)  # (batch, dim, L, N)
    y = (all_states * C).sum(-1)
    if D is not None:
        y = y + D.to(compute)[:, None] * u
    if z is not None:
        y = y * F.silu(z.to(compute))
    out = y.to(dtype)
    extra = []
    if return_last_state:
        extra.append(h)
    if return_all_states:
        extra.append(all_states)
    return (out, *extra) if extra else out
