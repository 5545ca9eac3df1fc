"""Selective-scan kernels for Vision Mamba: Triton on GPU, a chunked PyTorch path on CPU.

Installed as ``vim.kernels``; this package imports nothing from the rest of ``vim``.
"""

from .scan_reference import selective_scan_ref
from .selective_scan import BACKENDS, bidirectional_selective_scan, resolve_backend, selective_scan

__all__ = ["BACKENDS", "bidirectional_selective_scan", "resolve_backend", "selective_scan", "selective_scan_ref"]
