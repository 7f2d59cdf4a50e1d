"""lowbit's import structure: the functions named after their packages, and no import cycles."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import lowbit

ROOT = Path(lowbit.__file__).parent


def test_named_functions_stay_functions_after_importing_their_packages():
    """``import lowbit.export`` loads nothing that rebinds ``lowbit.export`` (the import
    system binds a package to its parent only when it first loads it)."""
    code = ("import sys, types, lowbit.export, lowbit.distill, lowbit.footprint\n"
            "import lowbit\n"
            "for name in ('export', 'distill', 'footprint'):\n"
            "    f = getattr(lowbit, name)\n"
            "    assert type(f) is types.FunctionType, (name, f)\n"
            "    assert type(sys.modules['lowbit.' + name]) is types.ModuleType, name\n"
            "from lowbit.export import ExportOptions, export\n"
            "from lowbit.distill import distill\n"
            "from lowbit.footprint import footprint\n"
            "assert (export, distill, footprint) == "
            "(lowbit.export, lowbit.distill, lowbit.footprint)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str, modules: set[str]) -> set[str]:
    """The lowbit modules that ``path`` (module ``name``) imports anywhere, functions included;
    ``from package import module`` counts the module, ``from module import name`` the module."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            base = f"{base}.{node.module}" if node.level and node.module else \
                base if node.level else node.module
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                      for a in node.names}
    return {m for m in found if m in modules and m != name}


def _graph() -> dict[str, set[str]]:
    paths = {_module_name(p): p for p in ROOT.rglob("*.py")}
    return {name: _imports(path, name, set(paths)) for name, path in paths.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    """No module of lowbit imports, even inside a function, a module that imports it back
    (a package's ``__init__`` counts as the package)."""
    graph = _graph()
    assert "lowbit._checkpoint" in graph["lowbit.models"] or \
        "lowbit._checkpoint" in graph["lowbit"]  # the parser sees function-level imports
    assert _cycles(graph) == []


def test_no_private_imports_across_subpackages():
    """A subpackage reaches another only through its public names (its ``__init__``):
    ``lowbit.export`` may import ``lowbit.quant``, never ``lowbit.quant._kernels``. The
    top-level private modules (``lowbit._ops``, ``lowbit._backend``, ...) are shared."""
    def package(module: str) -> str:
        return ".".join(module.split(".")[:2])

    bad = [(m, i) for m, imported in _graph().items() for i in imported
           if i.count(".") >= 2 and i.split(".")[2].startswith("_")
           and package(i) != package(m)]
    assert bad == []
