"""The package's shape: one-way imports, and what ``import vim`` gives a timm user."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _absolute(module: str | None, level: int, package: str) -> str:
    """The absolute name of ``from <level dots><module> import ...`` inside ``package``."""
    if level == 0:
        return module or ""
    parts = package.split(".")
    base = parts[: len(parts) - (level - 1)]
    return ".".join([*base, module] if module else base)


def _imported_modules(folder: Path, package: str) -> dict[str, set[str]]:
    """Absolute module names imported by each .py file below ``folder``, installed as ``package``; relative
    imports resolved (``from ..training import x`` in ``vim/models/x.py`` is ``vim.training``)."""
    found = {}
    for path in sorted(folder.rglob("*.py")):
        parents = path.relative_to(folder).parent.parts
        here = ".".join([package, *parents])  # the package the file is in
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                module = _absolute(node.module, node.level, here)
                names.add(module)
                # from . import x / from vim import deploy: x may be a module of the package
                names.update(f"{module}.{alias.name}" for alias in node.names)
        found[str(path.relative_to(ROOT))] = names
    return found


def test_relative_imports_are_resolved():
    assert _absolute("scan_layout", 1, "vim.kernels") == "vim.kernels.scan_layout"
    assert _absolute("training", 2, "vim.models") == "vim.training"
    assert _absolute(None, 2, "vim.kernels") == "vim"


def test_kernels_import_nothing_from_vim():
    offenders = {
        f: n
        for f, n in _imported_modules(ROOT / "kernels", "vim.kernels").items()
        if any(m == "vim" or (m.startswith("vim.") and not m.startswith("vim.kernels")) for m in n)
    }
    assert not offenders


@pytest.mark.parametrize("package", ["models", "dense"])
def test_models_know_nothing_of_lightning(package):
    offenders = {
        f: n
        for f, n in _imported_modules(ROOT / "vim" / package, f"vim.{package}").items()
        if any(m.startswith(("lightning", "pytorch_lightning", "vim.training", "vim.data", "vim.cli")) for m in n)
    }
    assert not offenders


@pytest.mark.parametrize(
    "name, params",
    [("vim_tiny_patch16_224", 7_148_008), ("vim_small_patch16_stride8_224", 26_001_256)],
)
def test_import_vim_registers_models_without_lightning_or_video_readers(name, params):
    code = (
        "import sys, timm, torch, vim\n"
        "assert 'lightning' not in sys.modules and 'av' not in sys.modules, sorted(sys.modules)\n"
        f"m = timm.create_model({name!r}, device='meta')\n"
        "print(sum(p.numel() for p in m.parameters()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(out.stdout.split()[-1]) == params


def test_vimkit_export_imports_no_lightning():
    """vim.deploy and its command (``vimkit export``) build models without Lightning: exporting is not training."""
    code = (
        "import sys, vim.deploy, vim.deploy.cli\n"
        "assert 'lightning' not in sys.modules and 'pytorch_lightning' not in sys.modules, sorted(sys.modules)\n"
        "assert vim.deploy.export_model is vim.deploy.cli.export_model\n"
    )
    subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)


def test_vim_extract_is_the_extraction_function():
    import vim
    from vim.extraction import extract, main  # noqa: F401  (binds the submodule on the package)

    assert vim.extract is extract


def _module_graph() -> dict[str, set[str]]:
    """Each module of ``vim`` and ``vim.kernels`` (a package by its own name) -> the modules of ours it imports, at the
    top or inside a function (a deferred import that closes a cycle is still a cycle), its own parent packages aside."""
    modules = {}
    for folder, package in ((ROOT / "vim", "vim"), (ROOT / "kernels", "vim.kernels")):
        for file, names in _imported_modules(folder, package).items():
            parts = Path(file).relative_to(folder.relative_to(ROOT)).with_suffix("").parts
            modules[".".join([package, *(parts[:-1] if parts[-1] == "__init__" else parts)])] = names
    return {
        module: {name for name in names if name in modules and name != module and not module.startswith(f"{name}.")}
        for module, names in modules.items()
    }


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of ``graph`` with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for imported in sorted(graph[module]):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = [stack.pop()]
            while component[-1] != module:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return found


def test_cycle_finder_sees_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    assert _cycles(_module_graph()) == []
