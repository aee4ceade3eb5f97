"""memk.kernels.interfaces is the leaf every kernels module takes its shared types from, so no
module of memk.kernels imports one that imports it back (function-level imports included)."""

import ast
from pathlib import Path

import memk.kernels
from memk.kernels import backends, interfaces

KERNELS_DIR = Path(memk.kernels.__file__).parent


def _relative_imports(path: Path, modules: set[str]) -> set[str]:
    """The sibling modules a file imports anywhere in it (`from .x import`, `from . import x`)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found |= {alias.name for alias in node.names if alias.name in modules}
    return found


def test_the_package_exports_the_interfaces_objects():
    assert memk.kernels.BackendUnavailable is interfaces.BackendUnavailable
    assert memk.kernels.LogprobOps is interfaces.LogprobOps
    assert backends.PackedAttention is interfaces.PackedAttention


def test_interfaces_imports_only_torch_and_the_standard_library():
    imported = set()
    for node in ast.walk(ast.parse((KERNELS_DIR / "interfaces.py").read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add("." * node.level + (node.module or ""))
    assert imported <= {"__future__", "dataclasses", "typing", "torch"}, imported


def test_no_kernels_module_imports_one_that_imports_it_back():
    modules = {p.stem for p in KERNELS_DIR.glob("*.py")} - {"__init__"}
    graph = {m: _relative_imports(KERNELS_DIR / f"{m}.py", modules) for m in modules}

    def reachable(start: str) -> set[str]:
        seen, todo = set(), list(graph[start])
        while todo:
            module = todo.pop()
            if module not in seen:
                seen.add(module)
                todo += graph.get(module, ())
        return seen

    assert graph["interfaces"] == set()
    cycles = [m for m in modules if m in reachable(m)]
    assert not cycles, {m: graph[m] for m in cycles}
