"""Selective-scan kernels for Vision Mamba: Triton on GPU, a chunked PyTorch path on CPU.

Installed as ``vim.kernels``; this package imports nothing from the rest of ``vim``.
"""

from .scan_reference import selective_scan_ref
from .selective_scan import BACKENDS, bidirectional_selective_scan, cross_selective_scan, resolve_backend, selective_scan

__all__ = [
    "BACKENDS",
    "bidirectional_selective_scan",
    "cross_selective_scan",
    "resolve_backend",
    "selective_scan",
    "selective_scan_ref",
]

# fused conv + SiLU of both scan directions, and residual add + norm (Triton on CUDA; C or PyTorch on CPU)
from .add_norm import add_norm
from .add_norm_reference import add_norm_ref
from .conv_silu import causal_conv1d_silu
from .conv_silu_reference import causal_conv1d_silu_ref

__all__ += ["add_norm", "add_norm_ref", "causal_conv1d_silu", "causal_conv1d_silu_ref"]
