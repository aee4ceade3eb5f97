"""Every memk bench case as a pytest-benchmark test (tests/benchmarks/conftest.py has the options).

Not named test_*.py, so a plain `pytest` does not time every case; run it by name:
`pytest tests/benchmarks/bench_cases.py --benchmark-only`.
"""

import pytest

from memk.bench import run, timing
from memk.bench.case import Skip
from memk.bench.common import synced

_inputs = run.InputCache()  # consecutive cases share their group's inputs, as in `memk bench`


def test_case(benchmark, memk_case, memk_device):
    inputs = _inputs.get(memk_case.group, memk_device)
    try:
        runner, check = run.prepare(memk_case, inputs, memk_device)
    except Skip as exc:
        pytest.skip(str(exc))
    except run.Refused as exc:
        pytest.fail(str(exc))  # a wrong answer gets no timing
    group, variant = memk_case.group, memk_case.variant
    env = timing.environment(memk_device)
    benchmark.group = group.key
    benchmark.name = variant.name
    benchmark.extra_info.update(
        suite=group.suite, family=group.family, variant=variant.name, role=variant.role,
        compare_to=list(variant.compare_to), dtype=memk_case.dtype, params=group.params,
        sweep={"axis": group.sweep_axis, "value": group.sweep_value}, work=group.work, work_unit=group.work_unit,
        check=run.check_json(check),
        device_name=env["device_name"], torch=env["torch"], triton=env["triton"], cuda=env["cuda"],
        torch_threads=env["torch_threads"], date=env["date"],
    )
    call = synced(runner.call, memk_device)
    try:
        benchmark(call)
        runner.reset()
        benchmark.extra_info["memory"] = timing.peak_memory(call, memk_device)
    finally:
        runner.close()
