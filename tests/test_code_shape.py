"""The shape the engine promises a newcomer (issue 11), checked on the source itself.

- no function in hvdft/ is longer than 90 lines, and `train()` is at most 60;
- nothing in hvdft/train.py nests deeper than 4 blocks;
- Horovod is imported and its optimizer protocol is driven only in hvdft/dist.py;
- the test hooks' variables appear only in hvdft/testhooks.py (and the launcher, which
  refuses to forward them);
- option defaults are written once: hvdft/cli.py restates none of TrainConfig's.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "hvdft"
SOURCES = sorted(PACKAGE.rglob("*.py"))


def functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def length(node: ast.AST) -> int:
    return node.end_lineno - node.lineno + 1


def test_no_function_is_longer_than_90_lines() -> None:
    long = [f"{p.relative_to(PACKAGE)}:{f.lineno} {f.name} ({length(f)} lines)"
            for p in SOURCES for f in functions(ast.parse(p.read_text())) if length(f) > 90]
    assert not long, long


def test_train_is_an_outline() -> None:
    tree = ast.parse((PACKAGE / "train.py").read_text())
    train = next(f for f in functions(tree) if f.name == "train")
    assert length(train) <= 60, length(train)


BLOCKS = (ast.For, ast.AsyncFor, ast.While, ast.If, ast.With, ast.AsyncWith, ast.Try, ast.Match)


def depth(node: ast.AST, level: int = 0) -> int:
    deepest = level
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            deepest = max(deepest, depth(child, 0))
        else:
            deepest = max(deepest, depth(child, level + isinstance(child, BLOCKS)))
    return deepest


def test_train_py_nests_at_most_4_blocks() -> None:
    tree = ast.parse((PACKAGE / "train.py").read_text())
    worst = max(depth(f) for f in functions(tree))
    assert worst <= 4, worst


def test_horovod_only_in_dist() -> None:
    for p in SOURCES:
        if p.name == "dist.py":
            continue
        text = p.read_text()
        assert not re.search(r"^\s*(import|from) horovod", text, re.M), p
        assert "synchronize" not in text, p


def test_hook_variables_only_in_testhooks_and_launcher() -> None:
    for p in SOURCES:
        if p.name in ("testhooks.py", "launch.py"):
            continue
        assert "HVDFT_FAULT" not in p.read_text() and "HVDFT_DEBUG_DIR" not in p.read_text(), p


def test_cli_restates_no_option_default() -> None:
    from dataclasses import fields

    from hvdft.config import TrainConfig

    cli = (PACKAGE / "cli.py").read_text()
    train_section = cli[cli.index("# ---- train") : cli.index("# ---- predict / eval")]
    for f in fields(TrainConfig):
        assert not re.search(rf'"{re.escape("--" + f.name.replace("_", "-"))}"', train_section), f.name
