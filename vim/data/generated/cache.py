"""Where the generated datasets are written, once."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

COMPLETE = ".complete"
"""The file that marks a finished tree."""


def cache_dir() -> Path:
    """``$VIM_CACHE`` or ``~/.cache/vim``."""
    return Path(os.environ.get("VIM_CACHE", Path.home() / ".cache" / "vim"))


def write_once(root: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """``write(root)`` unless ``root`` holds a finished tree (marked by ``root/.complete``); an interrupted write, which
    leaves no mark, is redone. Returns ``root``."""
    root = Path(root)
    if not (root / COMPLETE).exists():
        write(root)
        (root / COMPLETE).touch()
    return root
