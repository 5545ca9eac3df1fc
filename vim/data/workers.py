"""How many data-loader processes a machine can feed."""

from __future__ import annotations

import os


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one, e.g. a container's CPU limit)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_num_workers(limit: int = 8, processes: int = 1) -> int:
    """Loader processes to start by default for each of ``processes`` model processes on this machine: one per core that
    the model processes leave free, shared out evenly, at most ``limit``; 0 when no core is left (load in the model's
    process)."""
    return max(0, min(limit, available_cores() // processes - 1))
