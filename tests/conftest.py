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


@pytest.fixture
def poison_uninitialized_memory():
    """Fill every ``torch.empty`` allocation (kernel outputs, partial sums, scratch) with NaN for the test, so that
    a kernel that leaves part of an output unwritten fails its comparison instead of passing on stale zeros."""
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    previous_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    assert torch.empty(3, device="cuda" if _HAS_CUDA else "cpu").isnan().all()
    yield
    torch.utils.deterministic.fill_uninitialized_memory = previous_fill
    torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


@pytest.fixture
def single_thread():
    """torch on one thread for the test: tests of tiny models are many small ops, for which a second thread (two
    xdist workers already share two cores) only adds waiting at each op's barrier, ten times the time on a loaded
    machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
