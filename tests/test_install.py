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
