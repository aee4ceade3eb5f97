"""The ensemble executor (memorize/runs/ensemble_executor.py): the packer's plans trained as jobs, alone
or side by side, each member ending as the same run trained alone (float64), under a memory cap, killed
and resumed (in its recorded packing: to the last digit in float32), and the smoke preset as the
local executor gives it.
"""

import json
from dataclasses import replace

import pytest
import torch

from memk.memorize.runs.ensemble_executor import EnsembleExecutor
from memk.memorize.runs.packing import member_bytes
from memk.memorize.runs.store import RunStore
from memk.memorize.runs.sweep import LocalExecutor, Run

from ensemble_runs import (BACKENDS, CPU, MODEL, RUNS, TRAIN, KeepingWorkload, Killed, KillingProgress,  # noqa: F401,F811
                           assert_same_as_alone, float64, memk, quiet)


@pytest.mark.slow
def test_a_memory_cap_splits_a_group_into_fewer_slots_that_refill(tmp_path, float64):
    runs = RUNS + [Run("fifth", MODEL, 17, replace(TRAIN, seed=5, max_steps=40, cooldown_steps=10), BACKENDS)]
    budget = int(2.5 * member_bytes(runs[0]))  # room for two members
    executor = EnsembleExecutor(CPU, memory_budget=budget)
    plans = executor.plans(runs)  # "tiny" (3 rows a batch against 16) trains apart from the others
    assert [([r.name for r in p.runs], p.slots, p.memory_capped) for p in plans] == [
        (["big", "small", "decayed", "fifth"], 2, True), (["tiny"], 1, False)]
    workload = KeepingWorkload()
    with RunStore(tmp_path, "capacity") as store:
        executor.execute(runs, workload, store, quiet(len(runs)))
        assert len(store.rows_of(runs)) == len(runs)
    assert executor.trained == [{"runs": 4, "slots": 2, "most_members": 2}]
    assert_same_as_alone(workload, runs)


@pytest.mark.slow
@pytest.mark.parametrize("resume_with", ["ensemble", "local"])
def test_an_ensemble_killed_mid_run_resumes_to_the_uninterrupted_result(tmp_path, float64, resume_with):
    workload = KeepingWorkload()
    with RunStore(tmp_path, "capacity") as store:
        with pytest.raises(Killed):  # at step 55 of "big", "small" (30 steps) is recorded; "tiny" trains later, apart
            EnsembleExecutor(CPU, max_members=4).execute(RUNS, workload, store, KillingProgress("big", 55))
        finished_before = list(store.rows)
    assert [r["name"] for r in finished_before] == ["small"]
    saved = {p.stem: torch.load(p, weights_only=False)["step"] for p in (tmp_path / "checkpoints").glob("*.pt")}
    assert sorted(saved.values()) == [50, 50]  # big and decayed, each at its last evaluation

    executor = EnsembleExecutor(CPU, max_members=4) if resume_with == "ensemble" else LocalExecutor(CPU)
    with RunStore(tmp_path, "capacity") as store:
        todo = store.todo(RUNS)
        assert sorted(r.name for r in todo) == ["big", "decayed", "tiny"]
        executor.execute(todo, workload, store, quiet(len(RUNS)))
        rows = store.rows  # in the order they were recorded
    assert rows[:1] == finished_before  # finished members kept as they were, not retrained
    assert len(rows) == len(RUNS) and not list((tmp_path / "checkpoints").glob("*.pt"))
    assert_same_as_alone(workload, RUNS)


def test_a_killed_ensemble_resumes_in_its_packing_to_the_last_digit_in_float32(tmp_path, monkeypatch):
    # Float32 rounds differently alone and in an ensemble; --ensemble auto's probe, taken again by the
    # rerun, can decide the other way (a group at 0.9x is on the edge). The rerun must train each
    # unfinished run as the first run packed it: then it ends where the uninterrupted sweep ends, bit for bit.
    import memk.memorize.runs.packing as packing

    def probe_says(stack):
        monkeypatch.setattr(packing, "probe_step_seconds",
                            lambda run, k, device, limits: (1.0, k * (0.5 if stack else 1.5)))

    probe_says(stack=True)
    uninterrupted = KeepingWorkload()
    with RunStore(tmp_path / "whole", "capacity") as store:
        EnsembleExecutor(CPU, choose_faster=True).execute(RUNS, uninterrupted, store, quiet(len(RUNS)))
        whole = {r["run_id"]: r for r in store.rows}
    assert {r["trained_as"] for r in whole.values()} == {"ensemble of 3", "alone"}  # tiny trains apart (3 rows)

    resumed = KeepingWorkload()
    with RunStore(tmp_path / "killed", "capacity") as store:
        with pytest.raises(Killed):
            EnsembleExecutor(CPU, choose_faster=True).execute(RUNS, resumed, store, KillingProgress("big", 55))
    probe_says(stack=False)  # the rerun's probe would now train the group one run at a time
    with RunStore(tmp_path / "killed", "capacity") as store:
        todo = store.todo(RUNS)
        assert sorted(r.name for r in todo) == ["big", "decayed", "tiny"]
        EnsembleExecutor(CPU, choose_faster=True).execute(todo, resumed, store, quiet(len(RUNS)))
        rows = {r["run_id"]: r for r in store.rows}
    assert rows.keys() == whole.keys()
    for run_id, row in rows.items():
        assert row["memorized_bits"] == whole[run_id]["memorized_bits"], row["name"]
        assert row["trained_as"] == whole[run_id]["trained_as"], row["name"]
    for name, weights in uninterrupted.models.items():
        assert all(torch.equal(resumed.models[name][k], w) for k, w in weights.items()), name


@pytest.mark.slow
def test_ensembles_side_by_side_end_as_the_runs_trained_alone(tmp_path, float64):
    # Two workers: the ensemble of big, small and decayed on one thread, tiny (apart: 3 rows
    # a batch) on the other, each member's weights seeded while the other trains.
    workload = KeepingWorkload()
    executor = EnsembleExecutor(CPU, max_members=4, workers=2)
    with RunStore(tmp_path, "capacity") as store:
        executor.execute(RUNS, workload, store, quiet(len(RUNS)))
        assert [r["name"] for r in store.rows_of(RUNS)] == [r.name for r in RUNS]
    assert executor.trained == [{"runs": 3, "slots": 3, "most_members": 3}]
    assert_same_as_alone(workload, RUNS)


@pytest.mark.slow
def test_side_by_side_a_killed_ensemble_stops_the_other_worker_and_resumes(tmp_path, float64):
    workload = KeepingWorkload()
    with RunStore(tmp_path, "capacity") as store:
        with pytest.raises(Killed):
            EnsembleExecutor(CPU, max_members=4, workers=2).execute(RUNS, workload, store, KillingProgress("big", 55))
        finished_before = list(store.rows)
    assert "small" in [r["name"] for r in finished_before]  # what finished before the kill is kept
    with RunStore(tmp_path, "capacity") as store:
        todo = store.todo(RUNS)
        assert "big" in [r.name for r in todo] and len(todo) == len(RUNS) - len(finished_before)
        EnsembleExecutor(CPU, max_members=4, workers=2).execute(todo, workload, store, quiet(len(RUNS)))
        rows = store.rows
    assert rows[:len(finished_before)] == finished_before and len(rows) == len(RUNS)
    assert_same_as_alone(workload, RUNS)


# ---------------------------------------------------------------------------------------
# The command line, as a user runs it


@pytest.mark.slow
def test_the_smoke_preset_through_the_ensemble_matches_the_local_executor(tmp_path):
    summaries = {}
    for mode in ("off", "4"):
        out = tmp_path / mode
        result = memk("run-capacity", "--preset", "smoke", "--out", str(out), "--no-progress", "--ensemble", mode)
        assert result.returncode == 0, result.stderr
        summaries[mode] = json.loads((out / "summary.json").read_text())["precisions"]["float32"]
    # Float32: the ensemble's batched products sum in another order than nn.Linear's, so the
    # two executors agree to float32 rounding grown over 30 steps, not bit for bit.
    local, ensemble = summaries["off"], summaries["4"]
    for a, b in zip(local["models"], ensemble["models"]):
        assert a["model_name"] == b["model_name"] and a["capacity_at_n_sequences"] == b["capacity_at_n_sequences"]
        assert b["capacity_bits"] == pytest.approx(a["capacity_bits"], rel=1e-3)
        for p, q in zip(a["points"], b["points"]):
            assert (p["steps"], p["stop_reason"]) == (q["steps"], q["stop_reason"])
            assert q["memorized_bits"] == pytest.approx(p["memorized_bits"], rel=1e-3)
    assert ensemble["fit"]["through_origin"]["alpha"] == pytest.approx(local["fit"]["through_origin"]["alpha"], rel=1e-3)
