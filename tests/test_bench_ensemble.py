"""The train suite's ensemble cases (bench/suite_ensemble.py): both variants pass their float64
check, a member given another's weights is refused, work is counted in model-steps, and a
group too big for the memory free is skipped with the reason."""

import pytest
import torch

from memk.bench import run
from memk.bench import suite_ensemble as E

CPU = torch.device("cpu")


def _groups(**kwargs):
    return E.ensemble_groups(CPU, ["float32"], quick=True, configs=E.paper_configs([32]), batches=[4], **kwargs)


@pytest.fixture(scope="module")
def results():
    return run.run_groups(_groups(members=[3]), CPU, run.RunOptions(max_time=0.01))["results"]


def test_ensemble_and_one_at_a_time_both_match_the_float64_reference(results):
    by_variant = {r["variant"]: r for r in results}
    for name in (E.ONE_AT_A_TIME, E.ENSEMBLE):
        assert by_variant[name]["status"] == "ok", by_variant[name]["reason"]
        assert all(c["error"] <= c["tolerance"] for c in by_variant[name]["check"].values())
    for compiled in (E.ENSEMBLE_COMPILED, E.ENSEMBLE_GRAPHED):
        assert by_variant[compiled]["status"] == "skipped"  # --quick, and CUDA only
    assert by_variant[E.ENSEMBLE]["compare_to"] == [E.ONE_AT_A_TIME]


def test_throughput_counts_model_steps(results):
    for r in results:
        if r["status"] == "ok":
            assert r["throughput"]["unit"] == "model-steps/s"
            assert r["throughput"]["value"] == pytest.approx(3 / r["time"]["median_s"])
            assert r["sweep"] == {"axis": "members", "value": 3}


def test_a_member_with_another_members_weights_is_refused():
    (group,) = _groups(members=[3])
    inputs = group.make_inputs(CPU)
    ensemble = next(v for v in group.variants if v.name == E.ENSEMBLE)
    runner = ensemble.build(inputs, CPU)
    assert all(err <= tol for err, tol in group.check(inputs, runner.outputs()).values())
    inputs["states"][-1], inputs["states"][0] = inputs["states"][0], inputs["states"][-1]
    inputs.pop("float64")  # the reference recomputed for the swapped weights: the ensemble no longer matches it
    check = group.check(inputs, runner.outputs())
    assert not all(err <= tol for err, tol in check.values())


def test_a_group_too_big_for_the_memory_free_is_skipped_with_the_reason(monkeypatch):
    monkeypatch.setattr(E, "_free_bytes", lambda device: 1024)
    results = run.run_groups(_groups(members=[2]), CPU, run.RunOptions(max_time=0.01))["results"]
    assert {r["status"] for r in results} == {"skipped"}
    assert all("GiB" in r["reason"] and "free" in r["reason"] for r in results)


def test_default_sizes_cover_the_issue_grid_on_cuda():
    configs, batches, members = E.default_ensemble_sizes(torch.device("cuda"), quick=False)
    assert [c[1] for c in configs] == [32, 64, 128] and all(c[0] == 1 for c in configs)
    assert batches == [64, 512, 2048] and members[0] == 1 and members[-1] == 64
