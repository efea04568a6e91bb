"""The layout's rules: serving never loads training or benchmark code, scheduler/ has no import
cycles and never imports server/, the wheel installs server and scheduler only."""

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
