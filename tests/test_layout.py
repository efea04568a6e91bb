"""The layout's rules: serving never loads training or benchmark code, scheduler/ has no import
cycles and never imports server/, its packages stand on floors (none imports one above it), the wheel
installs server and scheduler only."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent


def _imports(path: Path) -> set[str]:
    """Modules a file imports at module level (imports inside functions, or under TYPE_CHECKING,
    run only when called)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _module_graph(top: str) -> dict[str, set[str]]:
    files = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
             for p in (ROOT / top).rglob("*.py")}
    return {name: _imports(path) for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the graph (only edges between its nodes count), or None."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        for dep in sorted(graph[node] & graph.keys() - {node}):
            if dep in path:
                return path[path.index(dep):] + [dep]
            if dep not in done and (cycle := visit(dep, path + [dep])):
                return cycle
        done.add(node)
        return None

    return next((c for node in sorted(graph) if node not in done and (c := visit(node, [node]))), None)


def test_scheduler_has_no_import_cycles_and_never_imports_server_or_bench():
    graph = _module_graph("scheduler")
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
    outside = {name: sorted(m for m in deps if m.split(".")[0] in ("server", "bench")) for name, deps in graph.items()}
    assert not {name: deps for name, deps in outside.items() if deps}


# scheduler/'s packages and top-level modules, lowest first. A module may import its own floor and those below;
# within the middle the order is a chain too.
FLOORS = [
    ("tensors", "phases", "config", "device_defaults", "core"),  # ground: options, state, public types
    ("structured",),
    ("sampling",),
    ("io",),
    ("worker",),
    ("speculative",),
    ("loop",),  # the engine, the step, admission: drives everything
    ("llm",),
    ("distill",),  # makes drafts; nothing serving imports it
]


def upward_imports(root: Path) -> list[str]:
    """Every import (inside functions and TYPE_CHECKING too) of a scheduler module on a floor above the
    importer's, as 'file:line imports module'."""
    floor = {name: level for level, names in enumerate(FLOORS) for name in names}
    bad = []
    for path in sorted((root / "scheduler").rglob("*.py")):
        own = path.relative_to(root / "scheduler").with_suffix("").parts[0]
        if own == "__init__":
            continue
        assert own in floor, f"scheduler/{own} stands on no floor: add it to FLOORS"
        for node in ast.walk(ast.parse(path.read_text())):
            assert not (isinstance(node, ast.ImportFrom) and node.level), f"{path}: a relative import"
            if isinstance(node, ast.ImportFrom) and node.module == "scheduler":
                names = [f"scheduler.{alias.name}" for alias in node.names]
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            else:
                continue
            for name in (n for n in names if n and n.startswith("scheduler.")):
                if floor[name.split(".")[1]] > floor[own]:
                    bad.append(f"{path.relative_to(root)}:{node.lineno} imports {name}")
    return bad


def test_no_scheduler_package_imports_one_on_a_floor_above_its_own():
    assert upward_imports(ROOT) == []


def test_the_floor_check_finds_an_upward_import(tmp_path):
    (tmp_path / "scheduler" / "core").mkdir(parents=True)
    (tmp_path / "scheduler" / "core" / "state.py").write_text("if x:\n    from scheduler.loop.engine import Engine\n")
    assert upward_imports(tmp_path) == ["scheduler/core/state.py:2 imports scheduler.loop.engine"]


def test_the_cycle_check_finds_cycles():
    assert find_cycle({"a": {"b", "os"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"b"}}) is None


def test_serving_loads_no_training_or_benchmark_code():
    code = ("import sys, server.app, server.cli, scheduler\n"
            "from scheduler import Engine\n"
            "from tests.conftest import tiny_config\n"
            "Engine(model=tiny_config(), load_format='dummy', speculative='ngram', kv_cache_bytes=1 << 20)\n"
            "print(' '.join(m for m in sys.modules if m.startswith(('scheduler.distill', 'bench'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [], f"serving imported: {out.stdout}"


def test_the_wheel_installs_server_and_scheduler_only():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["packages"]["find"]["include"] == ["scheduler*", "server*"]
    data = setuptools["package-data"]["scheduler.speculative"]
    assert all(list((ROOT / "scheduler/speculative").glob(pattern)) for pattern in data)
