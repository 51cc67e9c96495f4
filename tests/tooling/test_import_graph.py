"""The package's static import graph has no cycle, and importing nblosses stays light.

Every ``import`` / ``from ... import`` statement of every module under ``nblosses/`` counts,
function-level (lazy) ones included: a lazy import still ties the two modules together, it
only hides the circle from the interpreter. Edges from a module into the ``__init__`` of a
package that contains it are left out (``from .. import collect_kernels`` in a subpackage is
how a package hands its pieces down, not a dependency of the parent on the child).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import nblosses

PACKAGE = Path(nblosses.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _targets(module: str, is_package: bool, node: ast.AST, known: set[str]) -> set[str]:
    """The nblosses modules an import statement names (submodules resolved when they exist)."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name.split(".")[0] == "nblosses"}
    assert isinstance(node, ast.ImportFrom)
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[:len(base) - (node.level - 1)]
        origin = ".".join(base + ([node.module] if node.module else []))
    else:
        origin = node.module or ""
    if origin.split(".")[0] != "nblosses":
        return set()
    out = set()
    for alias in node.names:
        candidate = f"{origin}.{alias.name}"
        out.add(candidate if candidate in known else origin)
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the nblosses modules it imports (all statements, lazy ones included)."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    known = set(files)
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        is_package = path.name == "__init__.py"
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges |= _targets(module, is_package, node, known)
        # An edge into the __init__ of a package containing this module is the package
        # handing down its pieces, not a dependency of the parent on the child.
        graph[module] = {t for t in edges
                         if t != module and not module.startswith(t + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of modules (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def test_the_checker_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    graph = import_graph()
    assert "nblosses.functional" in graph and "nblosses._dispatch" in graph["nblosses.functional"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_importing_nblosses_imports_no_heavy_library():
    code = ("import sys, nblosses, nblosses.functional, nblosses.nn; "
            "print(' '.join(m for m in ('cupy', 'torch', 'jax', 'dask', 'scipy', "
            "'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120).stdout.strip()
    assert out == "", f"import nblosses also imports: {out}"
