"""The shape of vm/: imports point one way (no cycle, no layer importing a higher one),
and no function grows past 60 lines.  Read from the source, so it also sees the
imports hidden inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
#: lower layers never import higher ones; a package's modules may import each other
#: (acyclically).  core <- kernel <- machine; core <- suites; workflows, then the test
#: command's plan (vm.ci) on top.
LAYERS = {
    "vm.errors": 0, "vm.runner": 1, "vm.settings": 1,
    "vm.kernel": 2, "vm.suites": 2, "vm.machine": 3,
    "vm.pipeline": 5, "vm.bisect": 4, "vm.ci": 6, "tasks": 7,
}
#: the developer's loop (invoke series, issue 13) is a workflow built on vm.pipeline
LAYERS["vm.devloop"] = 5.5
#: `invoke bench` (issue 13): pure tables and parsers, the measurements, the run
LAYERS.update({"vm.bench": 5.6, "vm.benchrun": 5.7, "vm.benchcmp": 5.8, "vm.benchsuite": 5.8,
               "vm.benchmain": 5.9})
#: `invoke ci` in lanes: the scheduler under the plan, the child that runs one shard above it
LAYERS.update({"vm.lanes": 5.95, "vm.lanechild": 6.5})
MAX_FUNCTION_LINES = 60


def _sources() -> dict[str, Path]:
    found = {"tasks": ROOT / "tasks.py"}
    for path in sorted((ROOT / "vm").rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        found[name] = path
    return found


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The vm modules ``path`` imports, anywhere in the file."""
    deps: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "vm":
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                deps.add(sub if sub in known else node.module)
        elif isinstance(node, ast.Import):
            deps |= {a.name for a in node.names if a.name in known}
    return {d for d in deps if d in known and d != "vm"}


def graph() -> dict[str, set[str]]:
    sources = _sources()
    known = set(sources)
    return {name: imports_of(path, known) - {name} for name, path in sources.items()}


def layer(module: str) -> int:
    for prefix, rank in sorted(LAYERS.items(), key=lambda kv: -len(kv[0])):
        if module == prefix or module.startswith(prefix + "."):
            return rank
    raise AssertionError(f"{module} is in no layer: add its package to LAYERS in {__file__}")


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every import cycle, each as the path that closes it (depth-first search)."""
    found, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(edges.get(node, ())):
            if state.get(dep) == "open":
                found.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_vm():
    assert cycles(graph()) == []


def test_imports_point_down_the_layers():
    upward = [f"{mod} (layer {layer(mod)}) imports {dep} (layer {layer(dep)})"
              for mod, deps in graph().items() for dep in sorted(deps)
              if layer(dep) > layer(mod) or (layer(dep) == layer(mod) and dep.split(".")[:2] != mod.split(".")[:2])]
    assert upward == []


def test_the_layer_check_sees_imports_inside_functions(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from vm.machine import guest\n    from vm import errors\n")
    assert imports_of(src, {"vm.machine.guest", "vm.errors", "vm.machine"}) == {"vm.machine.guest", "vm.errors"}


def test_no_function_over_60_lines():
    long = []
    for name, path in _sources().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    assert long == []
