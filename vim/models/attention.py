"""The self-attention token mixer of MambaVision's later blocks: timm's ``Attention``, reused rather than rewritten.

Upstream's ``Attention`` (NVlabs/MambaVision ``mambavision/models/mamba_vision.py``) and ``timm.layers.Attention``
hold the same parameters under the same names, ``qkv`` (3C, C) with a bias and ``proj`` (C, C) with a bias
(``q_norm`` / ``k_norm`` are parameter-free identities with qk-norm off, as MambaVision builds it; timm's extra
``norm`` is one too), and compute the same thing: qkv split as (3, heads, head_dim), scaled dot-product
attention at ``head_dim ** -0.5`` with no positional term, heads concatenated, ``proj``. One difference: upstream
hands its attention dropout to SDPA in eval mode too, timm only while training; MambaVision's attention dropout
is 0, where the two agree.

API::

    attn = mambavision_attention(dim, num_heads)   # MambaVision's settings: qkv bias on, qk-norm off
    y = attn(x)                                    # x, y: (B, N, dim)
"""

from __future__ import annotations

from timm.layers import Attention

__all__ = ["Attention", "mambavision_attention"]


def mambavision_attention(
    dim: int, num_heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0, device=None, dtype=None
) -> Attention:
    """Self-attention over (B, N, dim) tokens as a MambaVision block builds it (``qkv_bias=True``, no qk-norm)."""
    if dim % num_heads:
        raise ValueError(f"mambavision_attention: dim {dim} is not a multiple of num_heads {num_heads}")
    return Attention(
        dim, num_heads=num_heads, qkv_bias=True, attn_drop=attn_drop, proj_drop=proj_drop, device=device, dtype=dtype
    )
