"""Upstream VMamba's SS2D mixer, re-written for the tests from its released code: parameter shapes and the forward.

Nothing here uses ``vim.models`` or ``vim.kernels``: the tests compare :class:`vim.models.ss2d.SS2D` against these
functions. Upstream is MzeroMiko/VMamba ``classification/models/vmamba.py`` (``SS2D`` built by ``__initv2__`` with
``forward_type="v05_noz"``, ``channel_first=True`` for the ``ln2d`` models; its forward is ``forwardv2`` and
``forward_corev2``), ``csm_triton.py`` (``cross_scan_fwd`` / ``cross_merge_fwd``, ``scans=0``) and ``csms6s.py``
(``selective_scan_torch``, the sequential scan over ``K * D`` channels with one B, C group per direction).

* :func:`official_ss2d_shapes`: the keys and shapes of one SS2D's state dict.
* :func:`official_ss2d_state_dict`: random values of sensible size for those keys.
* :func:`official_ss2d_forward`: the forward pass in float64, channels-first as upstream's ln2d models run it,
  with explicit cross-scan copies, the sequential scan, an explicit cross-merge, LayerNorm2d and the projections.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

K = 4  # cross2d: rows, columns, rows reversed, columns reversed


def official_ss2d_shapes(d_model: int, d_state: int = 1, ssm_ratio: float = 1.0, d_conv: int = 3) -> dict[str, tuple]:
    """SS2D(d_model, d_state, ssm_ratio, dt_rank="auto", d_conv, conv_bias=False, forward_type="v05_noz",
    channel_first=True): ``in_proj`` / ``out_proj`` are ``Linear2d`` (an ``nn.Linear``: 2-D weights, bias=False),
    ``out_norm`` a ``LayerNorm2d`` (an ``nn.LayerNorm``), ``initialize="v0"`` stacks K copies of dt / A / D."""
    inner, rank = int(ssm_ratio * d_model), math.ceil(d_model / 16)
    return {
        "x_proj_weight": (K, rank + 2 * d_state, inner),
        "A_logs": (K * inner, d_state),
        "Ds": (K * inner,),
        "dt_projs_weight": (K, inner, rank),
        "dt_projs_bias": (K, inner),
        "out_norm.weight": (inner,),
        "out_norm.bias": (inner,),
        "in_proj.weight": (inner, d_model),
        "conv2d.weight": (inner, 1, d_conv, d_conv),
        "out_proj.weight": (d_model, inner),
    }


def official_ss2d_state_dict(shapes: dict[str, tuple], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random float32 values: A_logs near log(1..N), Ds and the norm's weight near 1, step sizes of a trained model's
    size (softplus(dt_projs_bias) around 0.01-0.1), weights of fan-in scale."""
    out = {}
    for key, shape in shapes.items():
        noise = torch.randn(shape, generator=generator)
        if key == "A_logs":
            out[key] = torch.log(torch.arange(1, shape[1] + 1.0)).expand(shape) + 0.3 * noise
        elif key in ("Ds", "out_norm.weight"):
            out[key] = 1 + 0.2 * noise
        elif key == "dt_projs_bias":
            out[key] = -3.5 + 0.5 * noise
        elif key == "out_norm.bias":
            out[key] = 0.1 * noise
        else:
            out[key] = noise / math.sqrt(math.prod(shape[1:]))
    return out


def _cross_scan(x: torch.Tensor) -> torch.Tensor:
    """csm_triton.cross_scan_fwd (channels-first, scans=0): (B, D, H, W) -> (B, K, D, L) copies in each scan order."""
    rows, columns = x.flatten(2, 3), x.transpose(2, 3).flatten(2, 3)
    return torch.stack([rows, columns, rows.flip(-1), columns.flip(-1)], dim=1)


def _cross_merge(ys: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """csm_triton.cross_merge_fwd (channels-first, scans=0): (B, K, D, L) in scan order -> (B, D, L) in grid order."""
    batch, _, dim, length = ys.shape
    ys = ys[:, 0:2] + ys[:, 2:4].flip(-1)
    return ys[:, 0] + ys[:, 1].view(batch, dim, width, height).transpose(2, 3).reshape(batch, dim, length)


def _selective_scan(u, delta, A, B, C, D, delta_bias) -> torch.Tensor:
    """csms6s.selective_scan_torch (softplus on): u, delta (B, K * D, L), A (K * D, N), B, C (B, K, N, L), D and
    delta_bias (K * D,) -> (B, K * D, L); direction k's B and C serve its D channels. One step at a time."""
    batch, groups, n_state, length = B.shape
    channels = u.shape[1]
    delta = F.softplus(delta + delta_bias[:, None])
    B = B.repeat_interleave(channels // groups, dim=1)  # (B, K * D, N, L)
    C = C.repeat_interleave(channels // groups, dim=1)
    state = u.new_zeros(batch, channels, n_state)
    ys = []
    for t in range(length):
        state = torch.exp(delta[:, :, t, None] * A) * state + (delta[:, :, t] * u[:, :, t])[..., None] * B[..., t]
        ys.append((state * C[..., t]).sum(-1))
    return torch.stack(ys, dim=-1) + u * D[:, None]


def official_ss2d_forward(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """SS2D.forwardv2 with forward_corev2 (v05_noz: no gate, no einsum, ln2d) in float64: (B, C, H, W) -> (B, C, H, W)."""
    sd = {k: v.double() for k, v in sd.items()}
    x = x.double()
    batch, _, height, width = x.shape
    length = height * width
    inner, n_state = sd["A_logs"].shape[0] // K, sd["A_logs"].shape[1]
    rank = sd["dt_projs_weight"].shape[-1]

    x = F.conv2d(x, sd["in_proj.weight"][:, :, None, None])  # Linear2d
    weight = sd["conv2d.weight"]
    x = F.silu(F.conv2d(x, weight, padding=(weight.shape[-1] - 1) // 2, groups=inner))

    xs = _cross_scan(x)  # (B, K, D, L)
    x_dbl = F.conv1d(xs.reshape(batch, K * inner, length), sd["x_proj_weight"].reshape(-1, inner, 1), groups=K)
    dts, Bs, Cs = x_dbl.view(batch, K, -1, length).split([rank, n_state, n_state], dim=2)
    dts = F.conv1d(dts.reshape(batch, K * rank, length), sd["dt_projs_weight"].reshape(K * inner, rank, 1), groups=K)
    ys = _selective_scan(
        xs.reshape(batch, K * inner, length), dts, -torch.exp(sd["A_logs"]), Bs, Cs, sd["Ds"], sd["dt_projs_bias"].flatten()
    )
    y = _cross_merge(ys.view(batch, K, inner, length), height, width).view(batch, inner, height, width)

    y = y.permute(0, 2, 3, 1)  # LayerNorm2d: over the channels of each token
    mean = y.mean(-1, keepdim=True)
    var = ((y - mean) ** 2).mean(-1, keepdim=True)
    y = ((y - mean) / torch.sqrt(var + 1e-5) * sd["out_norm.weight"] + sd["out_norm.bias"]).permute(0, 3, 1, 2)
    return F.conv2d(y, sd["out_proj.weight"][:, :, None, None])  # Linear2d
