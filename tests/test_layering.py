"""Layering of the package, read from the source: no import circles, no oversized modules.

A circle (config -> parallel -> model -> config) makes import order matter and hides which layer depends
on which; imports inside functions count, since they only postpone the circle to run time.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "moe_train"
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    """Dotted module name -> file; a package's __init__.py is the package's own module."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imported(name: str, path: Path, known: set[str]) -> set[str]:
    """Modules of the package that `name` imports anywhere in its file (functions included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    wanted: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            wanted += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: climb level-1 packages above this module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            # `from a import b`: b is a submodule or a name defined in a; either way a is imported
            wanted += [base, *(f"{base}.{alias.name}" for alias in node.names)]
    found = set()
    for target in wanted:
        while target and target not in known:  # a name inside a module: the module holding it
            target = target.rpartition(".")[0]
        # an edge into a package holding this module is its __init__ re-exporting its children (or
        # `from . import sibling`): not a circle of design
        if target and target != name and not name.startswith(target + "."):
            found.add(target)
    return found


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Kosaraju: finish order, then the
    transposed graph), without recursion."""
    order: list[str] = []
    seen: set[str] = set()
    for root in graph:
        if root in seen:
            continue
        seen.add(root)
        stack = [(root, iter(sorted(graph[root])))]
        while stack:
            node, todo = stack[-1]
            nxt = next((w for w in todo if w not in seen), None)
            if nxt is None:
                order.append(node)
                stack.pop()
            else:
                seen.add(nxt)
                stack.append((nxt, iter(sorted(graph[nxt]))))
    reverse: dict[str, set[str]] = {v: set() for v in graph}
    for v, targets in graph.items():
        for w in targets:
            reverse[w].add(v)
    assigned: set[str] = set()
    out = []
    for root in reversed(order):
        if root in assigned:
            continue
        component, frontier = [], [root]
        assigned.add(root)
        while frontier:
            v = frontier.pop()
            component.append(v)
            for w in reverse[v] - assigned:
                assigned.add(w)
                frontier.append(w)
        if len(component) > 1:
            out.append(sorted(component))
    return sorted(out)


def test_circle_finder_finds_circles() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert _circles(graph) == [["a", "b", "c"]]


def test_no_import_circles() -> None:
    modules = _modules()
    known = set(modules)
    graph = {name: _imported(name, path, known) for name, path in modules.items()}
    parallel = {m for m in known if m.startswith("moe_train.parallel")}
    for name in ("moe_train.config", "moe_train.config.schema", "moe_train.config.rules"):
        assert graph[name].isdisjoint(parallel), f"{name} imports nothing from parallel/"
    assert _circles(graph) == []


def test_no_module_over_500_lines() -> None:
    sizes = {
        str(p.relative_to(PACKAGE.parent)): len(p.read_text(encoding="utf-8").splitlines())
        for p in PACKAGE.rglob("*.py")
    }
    assert {p: n for p, n in sizes.items() if n > MAX_LINES} == {}
