"""What every benchmark in ``tools/`` records about its run, and how it writes its results.

The ``bench_*.py`` scripts import this module by name (run as ``python tools/bench_x.py``, ``tools/`` is on the
path): :func:`machine` describes the machine and the software a run measured (date, device, versions, load);
:func:`create_model` builds the models they time, :func:`write_json` saves the results for programs,
:func:`markdown_table` and :func:`write_markdown` for people.
"""

from __future__ import annotations

import datetime
import importlib
import json
import os
import platform
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from pathlib import Path

import torch


def version(package: str) -> str | None:
    """``package.__version__``, or None where ``package`` cannot be imported."""
    try:
        return importlib.import_module(package).__version__
    except ImportError:
        return None


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cores_available() -> int | None:
    """The CPU cores this process may run on (its affinity where the system has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def load_average() -> float | None:
    """The 1-minute load average (how busy the machine was), or None where the system has none."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def device_name(device: torch.device | str, threads: int | None = None) -> str:
    """The CUDA device's name, or the CPU's with ``threads`` (default: torch's) and the cores available."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = threads or torch.get_num_threads()
    return f"CPU: {cpu_name()}, {threads} thread{'s' if threads > 1 else ''}, {cores_available()} cores available"


def machine(device: torch.device | str, threads: int | None = None) -> dict:
    """Date (UTC), device (see :func:`device_name`), Python, torch, triton and timm versions, and the load average."""
    return dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device=device_name(device, threads),
        python=platform.python_version(),
        torch=torch.__version__,
        triton=version("triton"),
        timm=version("timm"),
        load_average=load_average(),
    )


def median_seconds(
    fn: Callable[[], object], device: torch.device | str, min_seconds: float = 0.5, max_repeats: int = 100
) -> float:
    """Median seconds per call of ``fn`` after one warm-up call: at least 3 calls, then more until ``min_seconds``
    have passed or ``max_repeats`` calls were made (the median is robust to a busy machine); CUDA is synchronised."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    fn()
    sync()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_repeats and (time.perf_counter() - start < min_seconds or len(times) < 3):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def create_model(spec: str, size: int) -> torch.nn.Module:
    """The timm model of ``spec`` (``NAME`` or ``NAME:BACKEND``) for ``size`` px images: ``img_size`` is passed unless
    the model takes no such argument (ConvNeXt, ResNet and other CNNs take any size as they are)."""
    import timm

    import vim.models  # noqa: F401  (registers the Vim models)

    name, _, backend = spec.partition(":")
    kwargs: dict = {"kernel_backend": backend} if backend else {}
    try:
        return timm.create_model(name, num_classes=1000, img_size=size, **kwargs)
    except TypeError as error:
        if "img_size" not in str(error):
            raise
        return timm.create_model(name, num_classes=1000, **kwargs)


def write_json(path: Path, **sections: object) -> None:
    """``sections`` (``meta=...``, ``results=...``) as indented JSON at ``path``, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(sections, indent=2) + "\n")


def markdown_table(
    columns: Sequence[str], rows: Iterable[Sequence[object]], float_format: str = ".3g", right_aligned: Collection[str] = ()
) -> list[str]:
    """The lines of a Markdown table: a float cell formatted with ``float_format``, any other as ``str``."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "".join("---:|" if c in right_aligned else "---|" for c in columns)]
    for row in rows:
        lines.append("| " + " | ".join(format(v, float_format) if isinstance(v, float) else str(v) for v in row) + " |")
    return lines


def records_table(records: Sequence[dict], float_format: str = ".3g") -> list[str]:
    """A Markdown table of ``records`` with a column per key (in the order keys first appear); a missing one is empty."""
    columns = list(dict.fromkeys(key for record in records for key in record))
    return markdown_table(columns, ([record.get(c, "") for c in columns] for record in records), float_format)


def bullet_list(values: dict) -> list[str]:
    """``- key: value`` lines, one per item."""
    return [f"- {key}: {value}" for key, value in values.items()]


def write_markdown(path: Path, title: str, preamble: Sequence[str], table: Sequence[str]) -> str:
    """A Markdown report at ``path`` (the title, the preamble's lines, the table), creating its folder; returns its text."""
    text = "\n".join([f"# {title}", "", *preamble, "", *table]) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text
