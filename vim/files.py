"""Files that are never half written, and weights files checked before reading. No Lightning: extraction and export
use them as well as training.

:func:`atomic_write` replaces a file all at once, so a crash while saving never leaves a truncated ``last.ckpt``,
export or feature shard; :func:`check_weights_file` names a missing or empty weights file, or a URL where a local file
is needed, and the setting that gave it (:func:`is_remote` tells a URL from a local path);
:func:`file_identity` tells whether a file still holds the same bytes (``last.ckpt`` is rewritten in place by training).
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Callable
from pathlib import Path

import fsspec.utils


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """Replace ``path`` all at once: ``write(tmp)`` fills a temporary file beside it, which is fsynced and then
    renamed into place (``Path.replace``).

    The rename is atomic on one filesystem, so ``path`` holds either its previous content or the complete
    new one; the temporary file is removed if writing fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        with tmp.open("rb+") as file:
            os.fsync(file.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def is_remote(path: str | os.PathLike) -> bool:
    """``path`` is a URL that fsspec reads (``http://``, ``https://``, ``s3://``, ...), not a local file (``file://``
    counts as local)."""
    return fsspec.utils.get_protocol(str(path)) not in ("file", "local")


def check_weights_file(path: str | os.PathLike, argument: str) -> Path:
    """``path`` once it names a local file with content; ValueError naming ``argument`` and the file otherwise (a URL,
    which ``Path`` would mangle into a missing file, or a missing or zero-byte file, which would otherwise end in
    torch.load's FileNotFoundError or bare ``EOFError: Ran out of input``)."""
    if is_remote(path):
        raise ValueError(f"{argument}: '{path}' is a URL; this command reads local files only, so download it first")
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{argument}: '{path}' does not exist or is not a file")
    if path.stat().st_size == 0:
        raise ValueError(f"{argument}: '{path}' is empty (0 bytes), e.g. an interrupted download or copy")
    return path


def file_identity(path: str | os.PathLike, chunk_size: int = 1 << 20) -> dict[str, int | str]:
    """``{"sha256": hex digest of the contents, "size": bytes}`` of ``path``: the same for the same bytes at any path.

    The file is read once, ``chunk_size`` bytes at a time, so a few GB of weights never sit in memory at once.
    """
    digest, size = hashlib.sha256(), 0
    with Path(path).open("rb") as file:
        while chunk := file.read(chunk_size):
            digest.update(chunk)
            size += len(chunk)
    return {"sha256": digest.hexdigest(), "size": size}
