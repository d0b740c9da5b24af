"""The layout tells the architecture: no import cycles in api/, and no upward imports."""

from __future__ import annotations

import ast
from pathlib import Path

API = Path(__file__).resolve().parent.parent / "api"


def _module(path: Path) -> str:
    parts = path.relative_to(API.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Project modules imported anywhere in the file, lazy imports in functions included (a lazy
    import hides a cycle, it does not remove it); only TYPE_CHECKING blocks are left out."""
    tree = ast.parse(path.read_text())
    skipped = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
               and "TYPE_CHECKING" in ast.unparse(block.test) for n in ast.walk(block)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        found.update(name for name in names if name in modules)
    return found


def graph() -> dict[str, set[str]]:
    files = {_module(p): p for p in API.rglob("*.py") if "migrations" not in p.parts}
    modules = set(files)
    return {name: _imports(path, modules) - {name} for name, path in files.items()}


def test_no_import_cycles():
    edges = graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                cycles.append(stack[stack.index(target):] + [target] if target in stack else [node, target])
            elif target not in state:
                visit(target, [*stack, target])
        state[node] = 2

    for start in sorted(edges):
        if start not in state:
            visit(start, [start])
    # api/__init__ (create_app) is the package root: every module "imports" it, so it is left out.
    cycles = [c for c in cycles if "api" not in c]
    assert not cycles, cycles


def test_no_upward_imports():
    edges = graph()
    assert edges["api.exceptions"] == set()  # the bottom module
    assert edges["api.config"] == set()
    for module, targets in edges.items():
        if module.startswith("api.utils"):
            assert not {t for t in targets if t.startswith(("api.services", "api.routes", "api.context"))}, module
        if module.startswith(("api.services", "api.detector")):
            assert not {t for t in targets if t.startswith(("api.routes", "api.context", "flask"))}, module
        if module == "api.auth":
            assert not {t for t in targets if t.startswith(("api.routes", "api.context"))}, module
    assert "api.weights" not in edges  # sanity: the graph is of this package
    assert "api.detector.factory" not in edges["api.detector.model"] | edges["api.detector.weights"]
