"""``vim.files``: atomic writes and what killed writers leave behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vim.files import atomic_write


def pid_of_an_ended_process() -> int:
    """The pid of a process that has exited and been reaped, so no process has it (until the system reuses it)."""
    process = subprocess.Popen([sys.executable, "-c", ""])
    process.wait()
    return process.pid


def test_a_write_removes_the_temporary_files_of_dead_writers_of_that_file_only(tmp_path):
    target = tmp_path / "last.ckpt"
    target.write_bytes(b"old")
    dead = pid_of_an_ended_process()
    killed = tmp_path / f".last.ckpt.{dead}.0123abcd.tmp"  # a writer killed with -9 while saving
    running = tmp_path / f".last.ckpt.{os.getpid()}.89abcdef.tmp"  # a writer still saving
    other_file = tmp_path / f".best.ckpt.{dead}.0123abcd.tmp"  # a dead writer of another file
    not_ours = [tmp_path / f".last.ckpt.{dead}.tmp", tmp_path / f"last.ckpt.{dead}.0123abcd.tmp"]
    for path in (killed, running, other_file, *not_ours):
        path.write_bytes(b"partial")

    atomic_write(target, lambda tmp: Path(tmp).write_bytes(b"new"))

    assert target.read_bytes() == b"new"
    assert not killed.exists()
    assert running.read_bytes() == b"partial" and other_file.exists() and all(path.exists() for path in not_ours)
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(
        path.name for path in (target, running, other_file, *not_ours)
    )  # nothing of this write is left either


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_atomic_writes_get_the_permissions_of_a_plain_write(tmp_path, umask):
    """safetensors creates its file 0600; what atomic_write leaves behind has open()'s mode under the umask."""
    from safetensors.torch import save_file

    previous = os.umask(umask)
    try:
        atomic_write(tmp_path / "w.safetensors", lambda tmp: save_file({"x": torch.zeros(2)}, str(tmp)))
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(previous)
    expected = (tmp_path / "plain.txt").stat().st_mode & 0o777
    assert expected == 0o666 & ~umask
    assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == expected
