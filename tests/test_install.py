"""memk is one namespace: the folders kernels/, memorize/, bench/, cli/ are never top-level packages."""

import sys
from pathlib import Path

import memk.bench
import memk.bench.cli  # noqa: F401
import memk.cli
import memk.cli.main  # noqa: F401  (imports most of memk)
import memk.kernels
import memk.memorize

REPO = Path(__file__).resolve().parent.parent
SUBPACKAGES = {"kernels": memk.kernels, "memorize": memk.memorize, "bench": memk.bench, "cli": memk.cli}


def test_subpackages_live_under_the_memk_namespace():
    for folder, module in SUBPACKAGES.items():
        assert module.__name__ == f"memk.{folder}"
        assert Path(module.__file__).parent.name == folder


def test_every_loaded_file_of_ours_is_loaded_once_and_as_memk():
    homes = {f"memk.{f}": Path(m.__file__).resolve().parent for f, m in SUBPACKAGES.items()}
    places = set(homes.values()) | {REPO / f for f in SUBPACKAGES}
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if not file:
            continue
        path = Path(file).resolve()
        home = next((p for p in places if p in path.parents), None)
        if home is None:
            continue
        # A file from kernels/, memorize/ or bench/ loaded under a bare name, or from a
        # second copy of the tree, would be a second copy of the same code.
        package = ".".join(name.split(".")[:2])
        assert package in homes, f"{name} loaded from {path}: not under the memk namespace"
        assert homes[package] in path.parents, f"{name} loaded from {path}, but {package} lives in {homes[package]}"


def test_native_sources_ship_with_the_package():
    from importlib.resources import files

    names = {p.name for p in files("memk.csrc").iterdir()}
    assert any(n.endswith(".cu") for n in names) and any(n.endswith(".cpp") for n in names)


def _import_graph() -> dict[str, set[str]]:
    """memk module -> the memk modules it imports, wherever in the file the import stands
    (imports inside functions count: they close cycles just the same when they run)."""
    import ast

    modules = {}
    for folder, package in SUBPACKAGES.items():
        for path in Path(package.__file__).parent.glob("*.py"):
            name = f"memk.{folder}" if path.stem == "__init__" else f"memk.{folder}.{path.stem}"
            modules[name] = path
    graph = {}
    for name, path in modules.items():
        package = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                candidates = [f"{base}.{a.name}" for a in node.names] + [base]
            else:
                continue
            for c in candidates:  # `from X import y` names module X.y where there is one, else X
                if c in modules:
                    targets.add(c)
                    break
        graph[name] = targets - {name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_module_imports_another_that_imports_it_back():
    assert _cycles(_import_graph()) == []


def test_packages_import_each_other_in_one_direction_only():
    # kernels knows nothing of experiments; memorize uses kernels through memk.kernels' public
    # names only; bench measures both; the command line sits above them all.
    allowed = {"kernels": set(), "memorize": {"kernels"}, "bench": {"kernels", "memorize"},
               "cli": {"kernels", "memorize", "bench"}}
    graph = _import_graph()
    for module, targets in graph.items():
        package = module.split(".")[1]
        for target in targets:
            other = target.split(".")[1]
            assert other == package or other in allowed[package], f"{module} imports {target}"
            if package == "memorize" and other == "kernels":
                assert target == "memk.kernels", f"{module} reaches into {target}; use memk.kernels' public names"


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
