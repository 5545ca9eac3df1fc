"""Files that are never half written, folders that one process writes at a time, and weights files checked before
reading. No Lightning: extraction and export use them as well as training.

:func:`atomic_write` replaces a file all at once, so a crash while saving never leaves a truncated ``last.ckpt``,
export or feature shard, and removes the temporary files that killed writers of the same file left behind;
:func:`folder_lock` keeps a second process out of a folder that one is writing; :func:`check_weights_file` names a
missing or empty weights file, or a URL where a local file is needed, and the setting that gave it (:func:`is_remote`
tells a URL from a local path);
:func:`file_identity` tells whether a file still holds the same bytes (``last.ckpt`` is rewritten in place by training).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shlex
import socket
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import fsspec.utils


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """Replace ``path`` all at once: ``write(tmp)`` fills a temporary file beside it, which is fsynced and then
    renamed into place (``Path.replace``).

    The rename is atomic on one filesystem, so ``path`` holds either its previous content or the complete
    new one; the temporary file is removed if writing fails, and those of killed writers of ``path`` are removed
    first (:func:`remove_stale_temporaries`). The file gets the permissions a plain ``open(path, "w")`` would give it
    (``0o666`` less the umask), whatever mode the writer created the temporary file with (safetensors uses 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        with tmp.open("rb+") as file:
            os.fsync(file.fileno())
        tmp.chmod(0o666 & ~current_umask())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def current_umask() -> int:
    """The process's umask (read by setting it and setting it back: the only way the OS offers)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def is_remote(path: str | os.PathLike) -> bool:
    """``path`` is a URL that fsspec reads (``http://``, ``https://``, ``s3://``, ...), not a local file (``file://``
    counts as local)."""
    return fsspec.utils.get_protocol(str(path)) not in ("file", "local")


def _is_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (one of another user counts: signal 0 is refused, not unknown)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        pass
    return True


def remove_stale_temporaries(path: Path) -> None:
    """Remove the temporary files of :func:`atomic_write` for ``path`` (``.<name>.<pid>.<8 hex>.tmp`` beside it) whose
    writer is no longer alive, e.g. killed (``kill -9``) while saving.

    A live writer's file is left alone. The pid is looked up on this machine: vim never has two machines write the
    same file into a shared folder at once (only rank 0 saves checkpoints; extraction locks its output folder).
    """
    pattern = re.compile(rf"\.{re.escape(path.name)}\.([1-9][0-9]*)\.[0-9a-f]{{8}}\.tmp")
    for candidate in path.parent.iterdir():
        match = pattern.fullmatch(candidate.name)
        if match and not _is_alive(int(match.group(1))):
            candidate.unlink(missing_ok=True)  # another writer may be removing it too


class FolderInUseError(RuntimeError):
    """Another process holds a folder's :func:`folder_lock`; the message names that process."""


def _lock_holder(lock: Path) -> str:
    """The process that :func:`folder_lock` recorded in ``lock``: pid, host and command."""
    try:
        holder = json.loads(lock.read_text())
        return f"pid {holder['pid']} on {holder['host']} ({holder['command']})"
    except (OSError, ValueError, KeyError, TypeError):  # not written yet by a holder that has just taken the lock
        return "another process"


@contextmanager
def folder_lock(folder: Path, name: str) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` while the block runs: ``fcntl.flock`` on the file ``folder/name``, which
    records this process (pid, host, command) for the message a second process gets.

    The operating system releases the lock when this process ends, however it ends (``kill -9`` too); the file stays.

    Raises:
        FolderInUseError: another process holds the lock (also one of this process through another open file).
    """
    lock = folder / name
    descriptor = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FolderInUseError(
                f"'{folder}' is in use by {_lock_holder(lock)}, which holds {lock}; wait for it to end, or use another folder"
            ) from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": shlex.join(sys.argv)}
        os.ftruncate(descriptor, 0)
        os.write(descriptor, json.dumps(holder).encode())
        yield
    finally:
        os.close(descriptor)  # releases the lock


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
