"""The README and the pages of docs/ against the code: every command they show parses as its command parses it, every
config and file they name exists, every link resolves, every Python example compiles and names what exists.

Commands are checked without running them (most train for hours on data that is not here): ``vimkit fit``,
``validate``, ``test`` and ``predict`` lines through LightningCLI's own parser (``--print_config``: the config file, every
option and class name), ``vimkit export`` and ``vimkit extract`` lines through their argument parsers. The quickstarts
themselves run in tests/training (shortened) and in CI's README test command.
"""

from __future__ import annotations

import ast
import importlib
import re
import shlex
from pathlib import Path

import pytest
import timm

import vim.models  # noqa: F401  (registers the models the examples name)
from vim.cli import LIGHTNING_COMMANDS, run_lightning

from support.paths import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"\]\(([^)\s]+)\)")


def code_blocks(page: Path, language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(page.read_text()) if lang == language]


def vimkit_commands(page: Path) -> list[list[str]]:
    """The ``vimkit ...`` / ``python -m vim ...`` commands of a page's bash blocks, as argument lists (comments, line
    continuations and ``&&`` chains resolved)."""
    commands = []
    for block in code_blocks(page, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                words = shlex.split(part, comments=True)
                if words[:1] == ["vimkit"]:
                    commands.append(words[1:])
                elif words[:3] == ["python", "-m", "vim"]:
                    commands.append(words[3:])
    return commands


def ids(pages: list[Path]) -> list[str]:
    return [str(page.relative_to(REPO)) for page in pages]


def test_there_are_pages_and_commands():
    assert (REPO / "docs").is_dir() and len(PAGES) > 1
    assert sum(len(vimkit_commands(page)) for page in PAGES) > 20


@pytest.mark.parametrize("page", PAGES, ids=ids(PAGES))
def test_links_resolve(page: Path):
    for target in LINK.findall(page.read_text()):
        if target.startswith(("http://", "https://", "#", "mailto:")):
            continue
        path = (page.parent / target.split("#")[0]).resolve()
        assert path.exists(), f"{page.name}: link to {target} points at nothing"


@pytest.mark.parametrize("page", PAGES, ids=ids(PAGES))
def test_named_configs_and_tools_exist(page: Path):
    text = page.read_text()
    for path in set(re.findall(r"\b((?:configs|tools|benchmarks)/[\w./-]+\.(?:yaml|py|sh|md|json|png))\b", text)):
        assert (REPO / path).exists(), f"{page.name} names {path}, which does not exist"


@pytest.mark.parametrize("page", PAGES, ids=ids(PAGES))
def test_vimkit_commands_parse(page: Path, monkeypatch, capsys):
    """Each command as its own parser takes it (unknown options, bad choices and missing configs fail here)."""
    from vim.deploy.cli import command_parser as export_parser
    from vim.extraction.cli import command_parser as extract_parser

    monkeypatch.chdir(REPO)  # the pages' paths (configs/...) are relative to the repository
    for argv in vimkit_commands(page):
        if not argv or argv[0].startswith("-"):  # vimkit --help
            continue
        command, rest = argv[0], argv[1:]
        if command in LIGHTNING_COMMANDS:
            with pytest.raises(SystemExit) as exit_info:
                run_lightning([command, *rest, "--print_config"])
            assert exit_info.value.code in (0, None), f"{page.name}: vimkit {shlex.join(argv)}: {capsys.readouterr().err}"
        elif command == "export":
            export_parser()[0].parse_args(rest)
        elif command == "extract":
            extract_parser().parse_args(rest)
        else:
            pytest.fail(f"{page.name}: vimkit {command}: no such command")
        capsys.readouterr()


@pytest.mark.parametrize("page", PAGES, ids=ids(PAGES))
def test_python_examples_compile_and_name_what_exists(page: Path):
    """Each example is valid Python; what it imports from vim exists; the models it creates are registered."""
    for block in code_blocks(page, "python"):
        tree = ast.parse(block)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "vim":
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name) or importlib.util.find_spec(f"{node.module}.{alias.name}"), (
                        f"{page.name}: from {node.module} import {alias.name}"
                    )
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "vim":
                        importlib.import_module(alias.name)
        for name in re.findall(r"create_model\(\s*\"([\w.-]+)\"", block):
            assert timm.is_model(name.split(".")[0]), f"{page.name}: timm.create_model({name!r}) is not registered"
