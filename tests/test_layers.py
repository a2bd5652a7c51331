"""The package's shape: the core imports nothing above it, no module imports itself back (deferred imports
included), and functions stay short enough to read."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "hiap_core"
STUDY_PACKAGES = ("hiap_core.train", "hiap_core.measure", "hiap_core.report")
MAX_FUNCTION_LINES = 60


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_names(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Every hiap_core module `tree` imports, at the top or inside a function, resolved to absolute names
    (`from .x import y` yields `pkg.x` and, when `pkg.x.y` is a module, that too)."""
    known, found = modules(), set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known}
    return {name for name in found if name in known}


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in modules().items():
        graph[name] = imported_names(ast.parse(path.read_text()), name, path.name == "__init__.py") - {name}
    return graph


def closure(graph: dict[str, set[str]], start: set[str]) -> set[str]:
    """`start`, what it imports transitively, and every package `__init__` on the way (Python runs them)."""
    seen, todo = set(), list(start)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parents = [".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)]
        todo += [m for m in graph.get(name, ()) | set(parents) if m in graph]
    return seen


def test_importing_the_core_pulls_in_no_study_module_matplotlib_or_pandas():
    code = (
        "import sys, hiap_core, importlib, pkgutil, hiap_core.core as core\n"
        "for m in pkgutil.iter_modules(core.__path__): importlib.import_module(f'hiap_core.core.{m.name}')\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith(('hiap_core', 'matplotlib', 'pandas', 'seaborn')))))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout.split()
    assert loaded and all(m == "hiap_core" or m.startswith("hiap_core.core") for m in loaded), loaded


def test_no_core_module_imports_the_study_layer_even_inside_a_function():
    graph = import_graph()
    for name, imports in graph.items():
        if name == "hiap_core" or name.startswith("hiap_core.core"):
            upward = {m for m in imports if m.startswith(STUDY_PACKAGES)}
            assert not upward, f"{name} imports {sorted(upward)} from the study layer"


def test_the_study_layers_import_in_one_direction():
    """core <- train <- measure <- report: a layer imports only the layers below it."""
    order = ["hiap_core.core", "hiap_core.train", "hiap_core.measure", "hiap_core.report"]
    graph = import_graph()
    for name, imports in graph.items():
        layer = next((i for i, p in enumerate(order) if name.startswith(p)), None)
        if layer is None:
            continue
        above = {m for m in imports if any(m.startswith(p) for p in order[layer + 1 :])}
        assert not above, f"{name} imports {sorted(above)} from a layer above it"


def test_no_import_cycles_anywhere_deferred_imports_included():
    graph = import_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for nxt in sorted(graph[name]):
            if state.get(nxt) == 1:
                pytest.fail(f"import cycle: {' -> '.join(path[path.index(nxt) :] if nxt in path else path)} -> {name} -> {nxt}")
            if nxt not in state:
                visit(nxt, path + [name])
        state[name] = 2

    for name in graph:
        if name not in state:
            visit(name, [])


def test_no_function_is_longer_than_sixty_lines():
    long = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
            ):
                long.append(f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not long, long
