"""pytest-benchmark front end: `pytest tests/benchmarks/bench_cases.py --benchmark-only` runs memk bench's cases.

The cases come from memk.bench.cases (one definition, shared with `memk bench`); each is built
and checked against float64 before pytest-benchmark times it. Options (given after the file):
--memk-quick, --memk-suite NAME (repeatable), --memk-device cpu|cuda, --memk-dtype NAME (repeatable),
--memk-preset default|acceptance.
"""

import pytest

from memk.bench import cases as C
from memk.bench.common import resolve_device


def pytest_addoption(parser):
    group = parser.getgroup("memk-bench", "memk benchmark cases")
    group.addoption("--memk-quick", action="store_true", help="the small sizes of `memk bench --quick`")
    group.addoption("--memk-suite", action="append", choices=C.SUITES, help="suite to run (repeatable; default all)")
    group.addoption("--memk-device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    group.addoption("--memk-dtype", action="append", choices=C.DTYPE_NAMES, help="dtype (repeatable; default per suite)")
    group.addoption("--memk-preset", choices=tuple(C.PRESETS), default="default", help="which cases (as memk bench --preset)")


def _device(config):
    return resolve_device(config.getoption("--memk-device"))


@pytest.fixture(scope="session")
def memk_device(request):
    return _device(request.config)


def pytest_generate_tests(metafunc):
    if "memk_case" not in metafunc.fixturenames:
        return
    config = metafunc.config
    groups = C.groups_for(
        config.getoption("--memk-suite") or list(C.SUITES),
        _device(config),
        config.getoption("--memk-dtype"),
        quick=config.getoption("--memk-quick"),
        preset=config.getoption("--memk-preset"),
    )
    cases = C.cases_for(groups)
    metafunc.parametrize("memk_case", cases, ids=[c.id for c in cases])
