"""Test setup: without CUDA, Triton kernels run in Triton's interpreter on CPU tensors."""

import os

import pytest

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; the CPU twin of this test covers the same logic")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
