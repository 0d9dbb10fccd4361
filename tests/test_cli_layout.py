"""The CLI's shape: one module per command group, every command listed, and the CLI only goes through pipelines/."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import leukolab
from leukolab.cli.main import COMMAND_MODULES, main

SRC = Path(leukolab.__file__).parent
#: what the root help lists, in order: commands first, then the groups (new groups may follow)
TOP_LEVEL = ["train", "evaluate", "predict", "stats", "demo", "embed", "probe", "convert", "report", "pretrain",
             "synth", "viz", "experiment"]
GROUPS = {"synth": ["wbc", "pool"], "viz": ["umap", "attention", "pca"], "experiment": ["label-efficiency"]}


def _listed(args: list[str], capsys: pytest.CaptureFixture[str]) -> list[str]:
    assert main([*args, "--help"]) == 0
    text = capsys.readouterr().out
    block = text[text.index("Commands"):]
    return re.findall(r"^│ (\S+)\s", block, flags=re.MULTILINE)


def _in_order(expected: list[str], listed: list[str]) -> bool:
    """``expected`` appear in ``listed`` in this order (other commands may be listed in between)."""
    rest = iter(listed)
    return all(name in rest for name in expected)


def test_help_lists_every_command_and_group_in_order(capsys: pytest.CaptureFixture[str]) -> None:
    listed = _listed([], capsys)
    assert _in_order(TOP_LEVEL, listed), listed
    assert not _in_order(["pretrain", "train"], listed)  # the check itself sees order
    for group, commands in GROUPS.items():
        listed = _listed([group], capsys)
        assert _in_order(commands, listed), (group, listed)


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {n for n in names if n.startswith("leukolab.")}


@pytest.mark.parametrize(
    ("where", "forbidden"),
    [
        ("cli", ("data", "models", "losses", "objectives", "training", "evaluation", "zoo")),
        ("models/tokens.py", ("training", "pipelines", "cli", "evaluation")),
        ("models/loading.py", ("training", "pipelines", "cli", "evaluation")),
        ("data/embed.py", ("models", "training", "pipelines", "cli", "evaluation")),
    ],
)
def test_no_upward_imports(where: str, forbidden: tuple[str, ...]) -> None:
    root = SRC / where
    files = sorted(root.glob("*.py")) if root.is_dir() else [root]
    assert files
    bad = {f"{f.relative_to(SRC)}: {name}" for f in files for name in _imports(f)
           if name.split(".")[1] in forbidden}
    assert not bad, sorted(bad)


def test_every_cli_module_is_registered() -> None:
    modules = {p.stem for p in (SRC / "cli").glob("*.py")} - {"__init__", "app", "main"}
    assert modules == set(COMMAND_MODULES)
