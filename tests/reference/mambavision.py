"""Upstream MambaVision's token mixers, re-written for the tests from its released code: state dicts and forwards.

Read from NVlabs/MambaVision ``mambavision/models/mamba_vision.py`` (``MambaVisionMixer`` and ``Attention``); nothing
here uses ``vim.models``, and the scan is the sequential reference, ``vim.kernels.selective_scan_ref``.

* :func:`official_mixer_shapes`: a ``MambaVisionMixer``'s keys and shapes as a MambaVision block builds it.
* :func:`official_state_dict`: random values of sensible size for such keys.
* :func:`official_mixer_forward`: ``MambaVisionMixer.forward`` in float64 on such a state dict.
* :func:`official_attention_forward`: ``Attention.forward`` written out as softmax(Q K^T / sqrt(d)) V, float64.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vim.kernels import selective_scan_ref


def official_mixer_shapes(d_model: int, d_state: int = 8, d_conv: int = 3, expand: int = 1) -> dict[str, tuple]:
    """Upstream's Block builds the mixer with d_state 8, d_conv 3, expand 1; dt_rank is ceil(d_model / 16).

    Its convs get ``bias=conv_bias // 2`` with ``conv_bias=True``, i.e. no bias; in_proj and out_proj ``bias=False``.
    """
    inner, rank = expand * d_model, math.ceil(d_model / 16)
    half = inner // 2
    return {
        "in_proj.weight": (inner, d_model),
        "x_proj.weight": (rank + 2 * d_state, half),
        "dt_proj.weight": (half, rank),
        "dt_proj.bias": (half,),
        "A_log": (half, d_state),
        "D": (half,),
        "out_proj.weight": (d_model, inner),
        "conv1d_x.weight": (half, 1, d_conv),
        "conv1d_z.weight": (half, 1, d_conv),
    }


def official_state_dict(shapes: dict[str, tuple], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random float32 values: A_log near Mamba's log(1..N), D near 1, step-size biases around softplus^-1(0.05),
    other weights scaled by their fan-in (taps kept large enough that the convs matter)."""
    out = {}
    for key, shape in shapes.items():
        noise = torch.randn(shape, generator=generator)
        if key == "A_log":
            out[key] = torch.log(torch.arange(1, shape[1] + 1.0)).expand(shape) + 0.1 * noise
        elif key == "D":
            out[key] = 1 + 0.2 * noise
        elif key == "dt_proj.bias":
            out[key] = math.log(math.expm1(0.05)) + 0.5 * noise
        else:
            out[key] = noise / math.sqrt(math.prod(shape[1:]))
    return out


def official_mixer_forward(sd: dict[str, torch.Tensor], hidden: torch.Tensor) -> torch.Tensor:
    """``MambaVisionMixer.forward`` in float64, (B, L, D) -> (B, L, D).

    Channels first as upstream: in_proj, split into x and z halves, each a centred depthwise conv (padding="same",
    no bias) and SiLU; x through x_proj / dt_proj into the scan (D, delta_bias, softplus, no z gate); the scan's
    output concatenated with z, then out_proj.
    """
    sd = {k: v.double() for k, v in sd.items()}
    xz = (hidden.double() @ sd["in_proj.weight"].T).transpose(1, 2)  # (B, inner, L)
    x, z = xz.chunk(2, dim=1)
    half = x.shape[1]
    x = F.silu(F.conv1d(x, sd["conv1d_x.weight"], padding="same", groups=half))
    z = F.silu(F.conv1d(z, sd["conv1d_z.weight"], padding="same", groups=half))
    rank, d_state = sd["dt_proj.weight"].shape[1], sd["A_log"].shape[1]
    dt, B, C = (x.transpose(1, 2) @ sd["x_proj.weight"].T).split([rank, d_state, d_state], dim=-1)
    delta = (dt @ sd["dt_proj.weight"].T).transpose(1, 2)
    y = selective_scan_ref(
        x, delta, -torch.exp(sd["A_log"]), B.transpose(1, 2), C.transpose(1, 2), sd["D"],
        z=None, delta_bias=sd["dt_proj.bias"], delta_softplus=True,
    )  # fmt: skip
    return torch.cat([y, z], dim=1).transpose(1, 2) @ sd["out_proj.weight"].T


def official_attention_forward(sd: dict[str, torch.Tensor], x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``Attention.forward`` (qkv with bias, no q/k norm, eval) in float64, (B, N, C) -> (B, N, C).

    The qkv output's channels are laid out (3, heads, head_dim); each head attends with softmax(q k^T / sqrt(d)) v.
    """
    sd = {k: v.double() for k, v in sd.items()}
    batch, tokens, width = x.shape
    qkv = x.double() @ sd["qkv.weight"].T + sd["qkv.bias"]
    q, k, v = qkv.reshape(batch, tokens, 3, num_heads, width // num_heads).permute(2, 0, 3, 1, 4)  # (B, H, N, d) each
    scores = q @ k.transpose(-1, -2) / math.sqrt(width // num_heads)
    weights = torch.exp(scores - scores.amax(-1, keepdim=True))
    heads = (weights / weights.sum(-1, keepdim=True)) @ v
    return heads.transpose(1, 2).reshape(batch, tokens, width) @ sd["proj.weight"].T + sd["proj.bias"]
