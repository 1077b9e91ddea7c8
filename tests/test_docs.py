"""Every `file::name` the method walk-through cites must exist, so the audit page cannot drift from the code."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def defined_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):  # `SWITCHES: dict[...] = ...`
            names.add(node.target.id)
    return names


def test_method_walkthrough_references_exist():
    text = (ROOT / "docs" / "method.md").read_text()
    refs = re.findall(r"`([\w/]+\.py)::(\w+)`", text)
    assert len(refs) >= 25
    missing = [f"{f}::{n}" for f, n in refs if n not in defined_names(ROOT / f)]
    assert not missing, f"docs/method.md cites names that do not exist: {missing}"
