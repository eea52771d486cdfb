"""Code health, checked on every ``make test``: lint and format (ruff), types (mypy --strict on
``ftmpi/``), no import cycle among ``ftmpi/`` modules, and no class over 400 lines.

The import graph counts every import, wherever it is written: at module level, inside functions
and inside ``if TYPE_CHECKING:`` blocks (a cycle hidden behind a deferred import is still a cycle
in the design), and ``importlib.import_module("ftmpi.…")`` with a literal name. A module that
imports a computed name (``importlib.import_module(table[name])``) is taken to import every
``ftmpi`` module its string constants name exactly.
"""

from __future__ import annotations

import ast
import itertools
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "ftmpi"
LINTED = ["ftmpi", "launch", "tests", "examples", "benchmarks"]
MAX_CLASS_LINES = 400


def _tool(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "NO_COLOR": "1"},
    )


def test_ruff_check() -> None:
    out = _tool("ruff", "check", "--no-cache", *LINTED)
    assert out.returncode == 0, out.stdout + out.stderr


def test_ruff_format() -> None:
    out = _tool("ruff", "format", "--check", "--no-cache", *LINTED)
    assert out.returncode == 0, out.stdout + out.stderr


def test_mypy_strict() -> None:
    # configuration (strict, files = ftmpi) in pyproject.toml [tool.mypy]
    out = _tool("mypy", "--no-incremental", "--cache-dir", os.devnull)
    assert out.returncode == 0, out.stdout + out.stderr


# --- import graph ---------------------------------------------------------------------------


def _modules() -> dict[str, Path]:
    """``ftmpi`` module name -> file, for every module of the package."""
    out: dict[str, Path] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module ``name`` refers to: itself, or the nearest enclosing module."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _imported(module: str, tree: ast.AST, modules: dict[str, Path]) -> Iterator[tuple[str, int]]:
    """(imported ftmpi module, line) for every import in ``tree``, wherever it is written."""
    package = module if modules[module].name == "__init__.py" else module.rpartition(".")[0]
    dynamic = False
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _resolve(alias.name, modules)
                if target:
                    yield target, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                target = _resolve(f"{base}.{alias.name}", modules)
                if target and target != base and target.startswith(base + "."):
                    yield target, node.lineno  # ``from ftmpi import wire``: the submodule
                elif base in modules:
                    yield base, node.lineno
        elif isinstance(node, ast.Call):
            func = node.func
            name = (
                func.attr
                if isinstance(func, ast.Attribute)
                else func.id
                if isinstance(func, ast.Name)
                else ""
            )
            if name in ("import_module", "__import__") and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    target = _resolve(arg.value, modules)
                    if target:
                        yield target, node.lineno
                else:
                    dynamic = True
    if dynamic:  # a computed name: any ftmpi module this file names may be the one
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and node.value in modules
                and node.value != module
            ):
                yield node.value, node.lineno


def import_graph() -> dict[str, dict[str, int]]:
    """module -> {imported module: first line importing it}, among ``ftmpi`` modules."""
    modules = _modules()
    graph: dict[str, dict[str, int]] = {}
    for module, path in modules.items():
        edges: dict[str, int] = {}
        for target, line in _imported(module, ast.parse(path.read_text(), str(path)), modules):
            if target != module:
                edges.setdefault(target, line)
        graph[module] = edges
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def _one_cycle(component: list[str], graph: dict[str, dict[str, int]]) -> list[str]:
    """A concrete cycle through the component's first module (breadth-first, shortest)."""
    members = set(component)
    start = component[0]
    paths = {start: [start]}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in graph[v]:
            if w == start:
                return [*paths[v], start]
            if w in members and w not in paths:
                paths[w] = [*paths[v], w]
                queue.append(w)
    return component


def describe(graph: dict[str, dict[str, int]]) -> str:
    lines = []
    for component in cycles(graph):
        path = _one_cycle(component, graph)
        hops = " -> ".join(f"{a} (line {graph[a][b]})" for a, b in itertools.pairwise(path))
        lines.append(f"cycle among {component}:\n    e.g. {hops} -> {path[-1]}")
        members = set(component)
        for a in component:
            inside = sorted((line, b) for b, line in graph[a].items() if b in members)
            lines += [f"    {a}:{line} imports {b}" for line, b in inside]
    return "\n".join(lines)


def test_cycle_checker_sees_hidden_imports(tmp_path: Path) -> None:
    """The checker itself: a function-level import, a TYPE_CHECKING import and an importlib
    literal each close a cycle."""
    sources = {
        "a": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.b import B\n",
        "b": "def f():\n    from pkg import c\n",
        "c": "import importlib\nX = importlib.import_module('pkg.a')\n",
        "d": (
            "import importlib\nT = {'x': 'pkg.e'}\n"
            "def g(n):\n    return importlib.import_module(T[n])\n"
        ),
        "e": "from . import d\n",
    }
    modules = {f"pkg.{k}": tmp_path / f"{k}.py" for k in sources}
    modules["pkg"] = tmp_path / "__init__.py"
    graph = {
        m: {t: line for t, line in _imported(m, ast.parse(sources[m[4:]]), modules) if t != m}
        for m in modules
        if m != "pkg"
    }
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.c"], ["pkg.d", "pkg.e"]]


def test_no_import_cycle() -> None:
    graph = import_graph()
    found = describe(graph)
    print(found)
    assert not found, "import cycles among ftmpi modules:\n" + found


# --- size -----------------------------------------------------------------------------------


def _classes() -> Iterator[tuple[str, int]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef):
                assert node.end_lineno is not None
                yield (
                    f"{path.relative_to(ROOT)}:{node.lineno} {node.name}",
                    (node.end_lineno - node.lineno + 1),
                )


@pytest.mark.parametrize("limit", [MAX_CLASS_LINES])
def test_no_class_over_limit(limit: int) -> None:
    big = [f"{name}: {n} lines" for name, n in _classes() if n > limit]
    assert not big, f"classes over {limit} lines:\n" + "\n".join(big)


def test_protocol_page_is_built_from_the_current_docstrings() -> None:
    """docs/protocol.md is the protocol modules' docstrings; a docstring edited without
    rebuilding the page fails here (rebuild: python scripts/protocol_doc.py)."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "protocol_doc.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
