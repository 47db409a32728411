"""The architecture as a test: imports point down the layers, and every module fits in a reader's head.

Layers, top to bottom (../shared/DESIGN.md, "Layout"):

    fedmoe/                          the CLI, the front door; nobody imports it
    server/   client/                the operator and the member; never each other
    protos/   aggregation/ privacy/  what both sides share (aggregation may use privacy)
    model/                           imports nothing of the project

The imports are read from the source (ast), lazy imports inside functions included.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package -> the project's packages it may import (besides itself)
ALLOWED: dict[str, set[str]] = {
    "fedmoe": {"server", "client", "protos", "aggregation", "privacy", "model"},
    "server": {"protos", "aggregation", "privacy", "model"},
    "client": {"protos", "aggregation", "privacy", "model"},
    "protos": set(),
    "aggregation": {"privacy", "model"},
    "privacy": {"model"},
    "model": set(),
}
MAX_LINES = 400
MAX_FUNCTION_LINES = 100  # a function longer than this hides stages that want names
GENERATED = ("_pb2.py", "_pb2_grpc.py")


def modules() -> list[Path]:
    return sorted(p for package in ALLOWED for p in (ROOT / package).rglob("*.py"))


def imported_packages(path: Path) -> set[tuple[int, str]]:
    """(line, top-level package) of every absolute import in the module."""
    found: set[tuple[int, str]] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update((node.lineno, alias.name.split(".")[0]) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add((node.lineno, node.module.split(".")[0]))
    return found


def test_every_package_is_known() -> None:
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert packages - {"tests", "bench"} == set(ALLOWED), "a new top-level package needs its place in ALLOWED"


def test_imports_point_down_the_layers() -> None:
    wrong = []
    for path in modules():
        package = path.relative_to(ROOT).parts[0]
        for line, target in sorted(imported_packages(path)):
            if target in ALLOWED and target != package and target not in ALLOWED[package]:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {target}/")
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_no_module_is_longer_than_a_reader_can_hold() -> None:
    long = [
        f"{path.relative_to(ROOT)}: {n} lines"
        for path in modules()
        if not path.name.endswith(GENERATED) and (n := len(path.read_text().splitlines())) > MAX_LINES
    ]
    assert not long, f"modules over {MAX_LINES} lines:\n" + "\n".join(long)


def test_no_function_hides_its_stages() -> None:
    long = [
        f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {n} lines"
        for path in modules()
        if not path.name.endswith(GENERATED)
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and (n := node.end_lineno - node.lineno + 1) > MAX_FUNCTION_LINES  # type: ignore[operator]
    ]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)


@pytest.mark.parametrize("source, expected", [
    ("import model.io\nfrom server import rounds\n", {(1, "model"), (2, "server")}),
    ("def f():\n    from client.node import Node\n", {(2, "client")}),
    ("from . import sibling\nimport os\n", {(2, "os")}),
])
def test_imports_are_read_including_lazy_ones(tmp_path: Path, source: str, expected: set) -> None:
    path = tmp_path / "m.py"
    path.write_text(source)
    assert imported_packages(path) == expected
