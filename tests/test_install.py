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
        home = Path(package.__file__).parent
        for path in home.rglob("*.py"):  # with memorize's rooms (memorize/runs/ ...)
            parts = [folder, *path.relative_to(home).with_suffix("").parts]
            name = "memk." + ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
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


def test_memorize_rooms_import_each_other_in_one_direction_only():
    # The foundation (memorize/*.py) knows no room; runs/ knows no experiment; experiments/ no audit.
    order = ["foundation", "runs", "experiments", "audit"]

    def room(module: str) -> str:
        parts = module.split(".")
        return parts[2] if len(parts) > 3 and parts[2] in order else "foundation"

    graph = _import_graph()
    rooms = {module for module in graph if module.startswith("memk.memorize.") and room(module) != "foundation"}
    assert {room(m) for m in rooms} == set(order[1:])  # the graph sees inside the rooms
    for module, targets in graph.items():
        if not module.startswith("memk.memorize"):
            continue
        for target in targets:
            if target.startswith("memk.memorize"):
                assert order.index(room(target)) <= order.index(room(module)), f"{module} imports {target}"


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


# --- The repository root on sys.path -------------------------------------------------------------
# `python -c`, `python -m`, `python -` and an interactive `python` started in the repository root put
# the root on sys.path, where the folder kernels/ answers `import kernels`: the name of Hugging Face's
# package, which transformers imports at load. memk's kernels/__init__.py, imported under that bare
# name, hands over to Hugging Face's package (or says it is not installed).

import importlib.metadata
import importlib.util
import os
import subprocess
import sysconfig

import pytest


def _hub_kernels_init() -> Path | None:
    """The __init__.py of Hugging Face's installed `kernels` package; None where it is not installed."""
    try:
        dist = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return None
    return Path(dist.locate_file("kernels/__init__.py")).resolve()


def _in_root(args: list[str], cwd: Path = REPO, stdin: str | None = None, timeout: float = 300):
    """`python ARGS` as a user would run it in the repository root (the root first on sys.path)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    env.setdefault("MEMK_NUM_THREADS", "1")
    return subprocess.run([sys.executable, *args], cwd=cwd, input=stdin, capture_output=True, text=True,
                          env=env, timeout=timeout)


needs_transformers = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                        reason="transformers is not installed")
needs_hub_kernels = pytest.mark.skipif(_hub_kernels_init() is None,
                                       reason="Hugging Face's kernels package is not installed")

TRANSFORMERS_AT_LOAD = "import transformers\nfrom transformers import GPT2LMHeadModel\nprint('loaded', GPT2LMHeadModel.__name__)\n"


@needs_transformers
@pytest.mark.parametrize("how", ["-c", "stdin"])
def test_transformers_loads_in_the_repository_root(how):
    # GPT2LMHeadModel imports transformers.integrations.hub_kernels, which does `from kernels import ...`.
    args, stdin = (["-c", TRANSFORMERS_AT_LOAD], None) if how == "-c" else (["-"], TRANSFORMERS_AT_LOAD)
    done = _in_root(args, stdin=stdin)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "loaded GPT2LMHeadModel"


@needs_hub_kernels
def test_import_kernels_in_the_repository_root_is_hugging_faces():
    code = (
        "import importlib.util, sys\n"
        "import kernels\n"
        "from kernels import get_kernel\n"
        "import memk.kernels\n"
        "print(kernels.__file__)\n"
        "print(importlib.util.find_spec('kernels').origin)\n"
        "print(sys.modules['kernels'] is kernels, memk.kernels.__name__, memk.kernels.__file__)\n"
        "print(hasattr(kernels, 'logprob_ops'), callable(memk.kernels.logprob_ops), callable(get_kernel))\n"
        "print(sorted({m.split('.')[0] for m, v in sys.modules.items() if getattr(v, '__file__', None)\n"
        "              and m.split('.')[0] in ('kernels', 'memorize', 'bench', 'cli')\n"
        "              and __import__('pathlib').Path(v.__file__).resolve().is_relative_to(sys.argv[1])\n"
        # a virtual environment inside the repository (CI's .venv) holds Hugging Face's kernels: not ours
        "              and not __import__('pathlib').Path(v.__file__).resolve().is_relative_to(\n"
        "                  __import__('pathlib').Path(sys.prefix).resolve())}))\n"
    )
    done = _in_root(["-c", code, str(REPO)])
    assert done.returncode == 0, done.stderr
    hub, spec_origin, same_memk, attrs, bare_ours = done.stdout.splitlines()
    assert Path(hub).resolve() == _hub_kernels_init()
    assert Path(spec_origin).resolve() == _hub_kernels_init()
    # memk.kernels is memk's own, from the repository (editable install) or site-packages (CI's)
    import memk.kernels

    assert same_memk == f"True memk.kernels {memk.kernels.__file__}"
    assert attrs == "False True True"
    assert bare_ours == "[]"  # nothing of memk's loaded under a bare top-level name


@needs_transformers
@needs_hub_kernels
def test_transformers_finds_and_uses_hugging_faces_kernels_in_the_repository_root(tmp_path):
    code = (
        "import kernels\n"
        "from transformers.utils.import_utils import is_kernels_available\n"
        "from transformers.integrations import hub_kernels\n"
        "print(is_kernels_available(), hub_kernels.CUDAProperties is kernels.CUDAProperties)\n"
    )
    outside = _in_root(["-c", code], cwd=tmp_path)
    inside = _in_root(["-c", code])
    assert outside.returncode == 0, outside.stderr
    assert inside.returncode == 0, inside.stderr
    assert inside.stdout == outside.stdout == "True True\n"


def _site_packages_without_hub_kernels(folder: Path) -> Path:
    """A copy of the site-packages that holds Hugging Face's kernels (links), without it: as if it were
    not installed: `python -S` (no site-packages) with `site.addsitedir(<this folder>)` before anything else."""
    hub = _hub_kernels_init()
    site = hub.parent.parent if hub is not None else Path(sysconfig.get_paths()["purelib"])
    folder.mkdir()
    for entry in site.iterdir():
        if entry.name == "kernels" or (entry.name.startswith("kernels-") and entry.name.endswith(".dist-info")):
            continue
        (folder / entry.name).symlink_to(entry)
    return folder


def test_without_hugging_faces_kernels_import_kernels_in_the_root_is_a_module_not_found(tmp_path):
    site = _site_packages_without_hub_kernels(tmp_path / "site")
    code = (
        f"import site, sys; site.addsitedir({str(site)!r})\n"
        "import importlib.metadata\n"
        "try:\n"
        "    importlib.metadata.version('kernels')\n"
        "except importlib.metadata.PackageNotFoundError:\n"
        "    print('no kernels distribution')\n"
        "for attempt in range(2):\n"
        "    try:\n"
        "        import kernels\n"
        "    except ModuleNotFoundError as e:\n"
        "        print(type(e).__name__, e.name, 'memk.kernels' in str(e))\n"
        "    else:\n"
        "        print('imported', kernels.__file__)\n"
        "import memk.kernels\n"
        "print(memk.kernels.__name__, callable(memk.kernels.logprob_ops))\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'kernels'))\n"
    )
    done = _in_root(["-S", "-c", code])
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "no kernels distribution",
        "ModuleNotFoundError kernels True",
        "ModuleNotFoundError kernels True",
        "memk.kernels True",
        "[]",
    ]


@needs_transformers
def test_without_hugging_faces_kernels_transformers_loads_in_the_root_and_finds_no_kernels(tmp_path):
    site = _site_packages_without_hub_kernels(tmp_path / "site")
    code = (
        f"import site, sys; site.addsitedir({str(site)!r})\n"
        + TRANSFORMERS_AT_LOAD +
        "import importlib.util\n"
        "from transformers.utils.import_utils import is_kernels_available\n"
        "print(is_kernels_available(), importlib.util.find_spec('kernels'))\n"
        "try:\n"
        "    import kernels\n"
        "except ModuleNotFoundError as e:\n"
        "    print(type(e).__name__, e.name)\n"
    )
    outside = _in_root(["-S", "-c", code], cwd=tmp_path)
    inside = _in_root(["-S", "-c", code])
    assert outside.returncode == 0, outside.stderr
    assert inside.returncode == 0, inside.stderr
    assert inside.stdout == outside.stdout == "loaded GPT2LMHeadModel\nFalse None\nModuleNotFoundError kernels\n"


@needs_transformers
@pytest.mark.slow
def test_readmes_audit_example_runs_in_the_repository_root(tmp_path):
    # The audit's worked example (README links it: docs/audit.md), from the root (about 20 s on one CPU core).
    assert "python -m memk.bench.audit_demo --out audit-demo" in (REPO / "docs" / "audit.md").read_text()
    out = tmp_path / "audit-demo"
    done = _in_root(["-m", "memk.bench.audit_demo", "--out", str(out)], timeout=900)
    assert done.returncode == 0, done.stderr
    for name in ("base", "finetuned"):
        assert (out / name / "config.json").is_file() and (out / name / "tokenizer.json").is_file()
    assert len((out / "members.txt").read_text().splitlines()) == 32
    assert len((out / "non_members.txt").read_text().splitlines()) == 32
    assert f"memk audit --model {out / 'finetuned'} --reference {out / 'base'}" in done.stdout
