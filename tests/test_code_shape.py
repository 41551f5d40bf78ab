"""The code stays readable by its shape: in engine/ and appliance/, no function over 60 lines and no file over 450
(engine/kernels/ is exempt: a kernel file holds the kernel, its launcher and its torch reference together)."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
MAX_FUNCTION_LINES = 60
MAX_FILE_LINES = 450
FILES = sorted(p for package in ("engine", "appliance") for p in (ROOT / package).rglob("*.py")
               if not p.is_relative_to(ROOT / "engine" / "kernels"))


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_functions_and_files_stay_short(path):
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_FILE_LINES
    long = [f"{node.name} (line {node.lineno}): {node.end_lineno - node.lineno + 1} lines"
            for node in ast.walk(ast.parse(text)) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long
