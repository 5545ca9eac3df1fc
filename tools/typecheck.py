"""Type-check ``vim/``, ``kernels/`` and ``tools/`` with mypy, configured in pyproject.toml (``[tool.mypy]``).

    python tools/typecheck.py                  # what CI runs: prints the errors and exits 1 when there are any
    python tools/typecheck.py --no-incremental # any further mypy option

``kernels/`` is installed as ``vim.kernels`` (pyproject's ``package-dir``), a name that no type checker can read
off the disk: an editable install maps it with an import hook, which type checkers do not run. Given the folders,
mypy would check ``kernels/`` as a package named ``kernels`` and find no ``vim.kernels`` for ``vim/`` and
``tools/`` to import. This script hands mypy the kernel files under their installed names, so the kernels and
every call into them are checked together.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from mypy import build
from mypy.errors import CompileError
from mypy.main import process_options
from mypy.modulefinder import BuildSource

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ROOT / "kernels"
INSTALLED_AS = "vim.kernels"


def kernel_sources() -> list[BuildSource]:
    """Each ``kernels/*.py`` as the module it is installed as (``kernels/scan_cpu.py`` -> ``vim.kernels.scan_cpu``)."""
    return [
        BuildSource(str(path.relative_to(ROOT)), INSTALLED_AS if path.stem == "__init__" else f"{INSTALLED_AS}.{path.stem}")
        for path in sorted(KERNELS.glob("*.py"))
    ]


def main(argv: list[str] | None = None) -> int:
    """Run mypy on the configured files plus the kernels; the exit status (0: no errors)."""
    os.chdir(ROOT)  # pyproject's `files` are relative to the repository
    sources, options = process_options(["--config-file", "pyproject.toml", *(sys.argv[1:] if argv is None else argv)])
    if any(Path(source.path or "").resolve().is_relative_to(KERNELS) for source in sources):
        raise SystemExit("tools/typecheck.py: leave kernels/ out of [tool.mypy] files; it is checked as vim.kernels")
    sources += kernel_sources()
    try:
        messages = build.build(sources, options).errors
    except CompileError as error:  # a file mypy cannot parse
        messages = error.messages
    for message in messages:
        print(message)
    errors = sum(": error: " in message for message in messages)
    files = len({message.split(":", 1)[0] for message in messages if ": error: " in message})
    if errors:
        print(f"Found {errors} errors in {files} files (checked {len(sources)} source files)")
        return 1
    print(f"Success: no issues found in {len(sources)} source files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
