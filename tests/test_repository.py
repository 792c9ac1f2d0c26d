"""The repository stands alone: nothing in it sends a reader somewhere outside it."""

from __future__ import annotations

import re
import subprocess

from tests.daemon_harness import ROOT

# Notes and checkouts that only existed where aiod was first written.
OUTSIDE = re.compile(r"shared/notes|\.\./shared|/work/(shared|wt|main)\b")


def test_no_file_points_to_notes_outside_the_repository() -> None:
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    assert files
    me = "tests/test_repository.py"
    hits = []
    for name in files:
        if name == me:
            continue
        try:
            text = (ROOT / name).read_text(encoding="utf-8")
        except (UnicodeDecodeError, IsADirectoryError, FileNotFoundError):
            continue
        for i, line in enumerate(text.splitlines(), 1):
            if OUTSIDE.search(line):
                hits.append(f"{name}:{i}: {line.strip()}")
    assert hits == []


def test_benchmarks_import_only_names_aiod_has() -> None:
    """`make bench` is not in `make test`: a benchmark importing a name aiod no
    longer has would only fail on the day someone measures. Every
    ``from aiod... import`` in benchmarks/ (lazy ones included) must resolve."""
    import ast
    import importlib

    missing = []
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("aiod"):
                module = importlib.import_module(node.module or "")
                for alias in node.names:
                    if not hasattr(module, alias.name):
                        try:
                            importlib.import_module(f"{node.module}.{alias.name}")
                        except ImportError:
                            missing.append(f"{path.name}:{node.lineno}: "
                                           f"{node.module}.{alias.name}")
    assert missing == []
