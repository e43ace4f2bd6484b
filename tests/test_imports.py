"""No import circles among the pipeline's modules, counting imports inside functions and under
TYPE_CHECKING too (a lazy or typing-only import hides a circle; it does not remove it). An import
inside a function is there only to defer a heavy one, and a `deferred:` comment says so."""

import ast
import importlib
import io
import textwrap
import tokenize
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


def undeferred_imports(source: str) -> list[int]:
    """Lines of the imports inside functions that no comment containing "deferred" explains: on
    the import's own lines, or in the block of comment and import lines right above it (one
    comment may head a group of imports)."""
    tree = ast.parse(source)
    lines = source.splitlines()
    comments = {
        token.start[0]: token.string
        for token in tokenize.generate_tokens(io.StringIO(source).readline)
        if token.type == tokenize.COMMENT
    }
    imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    import_lines = {line for n in imports for line in range(n.lineno, (n.end_lineno or 0) + 1)}
    in_functions = {
        node
        for function in ast.walk(tree)
        if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef))
        for node in ast.walk(function)
        if isinstance(node, (ast.Import, ast.ImportFrom))
    }

    def explained(node: ast.Import | ast.ImportFrom) -> bool:
        own = range(node.lineno, (node.end_lineno or node.lineno) + 1)
        if any("deferred" in comments.get(line, "") for line in own):
            return True
        line = node.lineno - 1
        while line in import_lines or (line in comments and lines[line - 1].lstrip()[:1] == "#"):
            if "deferred" in comments.get(line, ""):
                return True
            line -= 1
        return False

    return sorted(node.lineno for node in in_functions if not explained(node))


def test_imports_inside_functions_say_what_they_defer():
    """Imports belong at the top of a module; one inside a function defers a heavy import (torch,
    mlflow, matplotlib...) for start-up time, or an optional one, and its comment says which."""
    found = [
        f"{path.relative_to(ROOT.parent)}:{line}"
        for path in sorted(ROOT.rglob("*.py"))
        for line in undeferred_imports(path.read_text())
    ]
    assert not found, f"move to the top, or say what each defers (# deferred: ...): {found}"


def test_an_import_inside_a_function_without_a_deferred_comment_is_found():
    source = textwrap.dedent(
        """\
        import json


        def explained():
            # deferred: torch takes seconds to import
            import torch
            from torch import nn

            import numpy  # deferred: stand-in for another heavy one
            return json, torch, nn, numpy


        def unexplained():
            import math  # a comment, but not the word

            # deferred: a blank line parts this comment from the import below

            import yaml

            def inner():
                from pathlib import Path

                return Path

            return math, yaml, inner
        """
    )
    assert undeferred_imports(source) == [14, 18, 21]
