"""The house's shape (docs/architecture.md): the import layers in pyproject.toml, held by import-linter, and
functions and classes short enough to read in one sitting."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from harness import REPO

MAX_FUNCTION_LINES = 60
MAX_CLASS_LINES = 150  # docstrings included: a class this long does more than one job (issue 29)


def test_imports_follow_the_layers():
    lint = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(lint), "--no-cache"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    assert "0 broken" in proc.stdout


def _longer_than(kinds: tuple[type, ...], limit: int) -> list[str]:
    """The definitions of ``kinds`` in the package over ``limit`` lines, as 'path:line name (n lines)'."""
    long = []
    for path in sorted((REPO / "fmnist_onnx").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, kinds):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
    return long


def test_no_function_is_longer_than_a_screen():
    long = _longer_than((ast.FunctionDef, ast.AsyncFunctionDef), MAX_FUNCTION_LINES)
    assert not long, "\n".join(long)


def test_no_class_is_longer_than_150_lines():
    long = _longer_than((ast.ClassDef,), MAX_CLASS_LINES)
    assert not long, "\n".join(long)
