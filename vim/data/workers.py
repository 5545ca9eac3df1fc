"""How many data-loader processes a machine can feed."""

from __future__ import annotations

import os


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one, e.g. a container's CPU limit)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_num_workers(limit: int = 8) -> int:
    """Loader processes to start by default: one per core that the main process (running the model) leaves free, at
    most ``limit``; 0 on a single core (load in the main process)."""
    return min(limit, available_cores() - 1)
