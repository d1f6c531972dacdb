"""The package's shape as laws: no import circle, the demo application above the library, and compiled
loops whose numba cache cannot go stale."""

from __future__ import annotations

import ast
from pathlib import Path

import momos

PACKAGE = Path(momos.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Every momos module and the momos modules it imports anywhere in its body (lazy imports included)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from momos.x import y` imports momos.x, and momos.x.y where that is a module
                targets = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            else:
                continue
            found.update(t for t in targets if t in modules and t != name)
        graph[name] = found
    return graph


def test_the_import_graph_has_no_circle() -> None:
    graph = _imports()
    # A package imports its own submodules to re-export them: not a dependency of theirs on the package.
    edges = {m: {t for t in targets if not m.startswith(f"{t}.")} for m, targets in graph.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges[module]):
            assert state.get(target) != 1, f"import circle: {' -> '.join([*path, module, target])}"
            if target not in state:
                visit(target, [*path, module])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [])


def test_the_library_never_imports_the_demo_application() -> None:
    for module, targets in _imports().items():
        if not module.startswith("momos.apps"):
            assert not any(t.startswith("momos.apps") for t in targets), f"{module} imports {targets}"


def test_compiled_loops_live_in_one_file_that_imports_no_other_momos_module() -> None:
    """numba's disk cache checks only the source file of a cached function: a loop that compiled in a function
    or constant of another file would keep running stale code after that file changed."""
    graph = _imports()
    assert graph["momos.search._compiled"] == set()
    for path in PACKAGE.rglob("*.py"):
        if _module_name(path) != "momos.search._compiled":
            assert "njit" not in path.read_text(), f"{path.name} compiles numba code outside momos.search._compiled"
