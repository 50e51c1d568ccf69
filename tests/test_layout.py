"""The house's shape: no import cycle among pagating's modules, no import up the declared floors, and rooms of a
readable size (a module ≤ 500 lines, a function ≤ 60). Read from the source with `ast`, inner imports included:
an import inside a function is still a dependency."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "pagating"

# Floors, lowest first (DESIGN.md "Package layout"). A module may import its own floor or lower ones; a name
# matches the longest prefix listed.
FLOORS: list[tuple[str, ...]] = [
    ("pagating", "pagating.names", "pagating.disk", "pagating.server_auth", "pagating.gpu"),
    ("pagating.config",),
    ("pagating.alpha", "pagating.units", "pagating.flops", "pagating.runtime", "pagating.grid", "pagating.identity",
     "pagating.report.stats"),  # statistics only: the sweep ranks its configs with the report's own rule
    ("pagating.model",),
    ("pagating.data", "pagating.cost"),
    ("pagating.tracking",),
    ("pagating.run", "pagating.publish", "pagating.server"),
    ("pagating.trainer", "pagating.train", "pagating.sweep_worker"),
    ("pagating.sweep",),
    ("pagating.report",),
    ("pagating.cloud",),
    ("pagating.quickstart", "pagating.mlproject", "pagating.cli"),
]
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def floor_of(name: str) -> int:
    best, floor = -1, None
    for i, names in enumerate(FLOORS):
        for prefix in names:
            inside = name.startswith(prefix + ".") and prefix != "pagating"  # the package root is its own room
            if (name == prefix or inside) and len(prefix) > best:
                best, floor = len(prefix), i
    assert floor is not None, f"{name} is on no floor: add it to FLOORS in tests/test_layout.py"
    return floor


def imports_of(name: str) -> set[str]:
    """The pagating modules `name` imports (an `from pagating.x import y` that names a submodule counts as it)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in MODULES and t != name and t != "pagating"}
    return found


GRAPH = {name: imports_of(name) for name in MODULES}


def test_every_module_is_on_a_floor_and_imports_only_its_floor_or_below():
    upward = [f"{a} (floor {floor_of(a)}) imports {b} (floor {floor_of(b)})"
              for a, deps in GRAPH.items() for b in deps if floor_of(b) > floor_of(a)]
    assert not upward, "\n".join(upward)


def test_no_import_cycle():
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for name in sorted(GRAPH):
        if name not in state and (cycle := visit(name)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_the_checks_see_a_cycle_and_an_upward_import():
    """The two checks above read real imports: the known edges are there (so a broken parser cannot pass)."""
    assert "pagating.config" in GRAPH["pagating.model"]
    assert floor_of("pagating.cli") > floor_of("pagating.config") > floor_of("pagating.names")


def test_modules_and_functions_stay_small():
    big = [f"{MODULES[n].relative_to(PKG.parent)}: {len(MODULES[n].read_text().splitlines())} lines"
           for n in MODULES if len(MODULES[n].read_text().splitlines()) > MAX_MODULE_LINES]
    long = []
    for path in MODULES.values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PKG.parent)}:{node.lineno} {node.name}: {length} lines")
    assert not big and not long, "\n".join(big + long)
