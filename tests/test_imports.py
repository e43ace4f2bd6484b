"""No import circles among the pipeline's modules, counting imports inside functions and under
TYPE_CHECKING too (a lazy or typing-only import hides a circle; it does not remove it)."""

import ast
import importlib
import types
from pathlib import Path

import pipeline

ROOT = Path(pipeline.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def targets(module: str, node: ast.ImportFrom) -> set[str]:
    """The pipeline modules a `from X import a, b` needs: X, and each name's home module."""
    base = node.module or ""
    if node.level:
        package = module.rsplit(".", node.level)[0]
        base = f"{package}.{base}" if base else package
    if not base.startswith("pipeline"):
        return set()
    found = {base}
    imported = importlib.import_module(base)
    for alias in node.names:
        value = getattr(imported, alias.name, None)
        if value is None:
            found.add(f"{base}.{alias.name}")  # a submodule
        elif isinstance(value, types.ModuleType):
            found.add(value.__name__)
        elif getattr(value, "__module__", "").startswith("pipeline"):
            found.add(value.__module__)
    return found


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in sorted(ROOT.rglob("*.py")):
        module = module_name(path)
        tree = ast.parse(path.read_text())
        edges: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name.startswith("pipeline")}
            elif isinstance(node, ast.ImportFrom):
                edges |= targets(module, node)
        graph[module] = {e for e in edges if e != module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_the_pipeline_has_no_import_circles():
    graph = import_graph()
    assert "pipeline.model.gpt" in graph and "pipeline.train.loop" in graph
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
