"""memorize/experiments/dry_run.py: the plan --dry-run prints is the one the command executes, and
reading it touches nothing."""

import json
import re
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from memk.memorize.experiments import capacity, dry_run, generalization
from memk.memorize.experiments.knobs import CapacityKnobs, ExecutionKnobs, GeneralizationKnobs, TrainingKnobs
from memk.memorize.runs.ensemble_probe import ProbeLimits
from memk.memorize.runs.launchers import executor_from_options

MEMK = [sys.executable, "-m", "memk.cli"]
OUTSIDE = tempfile.gettempdir()  # `python -m` puts the working directory on sys.path
CPU = torch.device("cpu")
RUN_ID = re.compile(r"^    (\S+)  N=(\d+)  at most (\d+) steps$", re.M)
GROUP = re.compile(r"^  group \d+: .*, (\d+) runs?, (one at a time|an ensemble of (\d+) slots)", re.M)


def memk(*args):
    return subprocess.run([*MEMK, *args], capture_output=True, text=True, timeout=600, cwd=OUTSIDE)


def rows(out: Path) -> list[dict]:
    path = out / "runs.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def planned_ids(text: str) -> list[str]:
    return [m.group(1) for m in RUN_ID.finditer(text)]


# ---- the wall-clock arithmetic, against sums by hand


def test_runs_in_slots_take_the_step_costs_of_how_many_train_at_once():
    assert dry_run.wall_seconds([10, 10], 1, 1.0, 1.0) == 20.0  # one at a time
    assert dry_run.wall_seconds([10, 10], 2, 1.0, 1.5) == 15.0  # together: 10 steps of two members
    # 10 steps of two members, then the longer run's last 10 steps alone
    assert dry_run.wall_seconds([10, 20], 2, 1.0, 1.5) == 10 * 1.5 + 10 * 1.0
    # three runs in two slots: the third takes the slot the first frees
    assert dry_run.wall_seconds([10, 30, 10], 2, 1.0, 1.5) == 20 * 1.5 + 10 * 1.0


def test_jobs_go_to_the_worker_free_first_costliest_first():
    jobs = [(1.0, 1.0), (3.0, 3.0), (2.0, 2.0)]
    assert dry_run.jobs_wall_seconds(jobs, 1) == 6.0
    assert dry_run.jobs_wall_seconds(jobs, 2) == 3.0  # 3 | 2 then 1
    assert dry_run.jobs_wall_seconds(jobs, 3) == 3.0


@pytest.mark.parametrize("seconds, text", [(0, "0m00s"), (185, "3m05s"), (5 * 3600 + 20 * 60 + 10, "5h20m"),
                                           (4.2 * 86400, "4.2 days")])
def test_durations_read_as_minutes_hours_or_days(seconds, text):
    assert dry_run._minutes(seconds) == text


# ---- reading an output folder without touching it


def test_a_missing_or_damaged_folder_reads_as_nothing_finished_and_is_not_made(tmp_path):
    folder = tmp_path / "none"
    assert dry_run.finished_rows(folder) == [] and dry_run.recorded_packing(folder) == {}
    assert not folder.exists()
    folder.mkdir()
    (folder / "packing.json").write_text("{not json")
    assert dry_run.recorded_packing(folder) == {}


def test_the_runs_to_do_are_those_the_store_would_train():
    checked = capacity.validate(capacity.preset("smoke"))
    runs = capacity.plan(checked.experiment, checked.backends)
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "runs.jsonl").write_text(json.dumps({"run_id": runs[1].run_id, "x": 1}) + "\n" + "{cut sho")
        todo = dry_run.remaining_runs(runs, Path(folder), "capacity")
        assert todo == [r for r in runs if r is not runs[1]]
        assert sorted(p.name for p in Path(folder).iterdir()) == ["runs.jsonl"]  # no lock, nothing set aside
    assert dry_run.remaining_runs(runs, None, "capacity") == runs


# ---- the plan is the executor's


def smoke_runs():
    checked = capacity.validate(capacity.preset("smoke"))
    return capacity.plan(checked.experiment, checked.backends)


def test_the_groups_are_the_plans_of_the_executor_the_launcher_builds():
    runs, limits = smoke_runs(), ProbeLimits()
    for choice in (2, 1):
        shown = dry_run.planner(choice, CPU, 1, limits).plans(runs)
        executed = executor_from_options("local", CPU, choice, workers=1).plans(runs)
        assert [([r.run_id for r in p.runs], p.slots) for p in shown] == \
               [([r.run_id for r in p.runs], p.slots) for p in executed]
    off = dry_run.planner("off", CPU, 1, limits).plans(runs)  # shown by shape, each run alone
    assert [len(p.runs) for p in off] == [2, 2] and {p.slots for p in off} == {1}


def test_each_command_validates_once(monkeypatch):
    calls = []
    validate = capacity.validate
    monkeypatch.setattr(capacity, "validate", lambda exp: calls.append(exp) or validate(exp))
    text = dry_run.capacity_command("smoke", CapacityKnobs(models="1x8x1", sizes="20"), ExecutionKnobs(ensemble="off"))
    assert len(calls) == 1 and "1 run to train on cpu" in text
    calls.clear()
    ran = []
    monkeypatch.setattr(capacity, "run_capacity",
                        lambda checked, *a: ran.append(checked) or {"precisions": {}, "failed_runs": []})
    result = capacity.run_command("smoke", CapacityKnobs(out=str(Path(OUTSIDE) / "never")),
                                  ExecutionKnobs(ensemble="off", workers=1))
    assert len(calls) == 1 and result.out == Path(OUTSIDE) / "never" and result.summary["failed_runs"] == []
    assert ran[0].experiment is calls[0]  # handed on validated: run_capacity does not validate it again

    gen_calls = []
    validate_gen = generalization.validate
    monkeypatch.setattr(generalization, "validate", lambda exp: gen_calls.append(exp) or validate_gen(exp))
    knobs = GeneralizationKnobs(source="markov", markov_sequences=600, heldout=64, models="1x8x1", check_models="",
                                sizes="20,40", training=TrainingKnobs(max_steps=20))
    with tempfile.TemporaryDirectory() as out:
        text = dry_run.generalization_command("smoke", replace(knobs, out=out), ExecutionKnobs(ensemble="off"))
    assert len(gen_calls) == 1 and "2 runs to train" in text and "exact (Markov chain)" in text


@pytest.mark.slow
def test_the_capacity_plan_is_what_trains_run_for_run_and_group_for_group(tmp_path, monkeypatch):
    knobs = CapacityKnobs(out=str(tmp_path / "out"), training=TrainingKnobs(max_steps=20))
    execution = ExecutionKnobs(ensemble=2, workers=1, no_progress=True)
    text = dry_run.capacity_command("smoke", knobs, execution)
    assert not (tmp_path / "out").exists()
    calls = []
    validate = capacity.validate
    monkeypatch.setattr(capacity, "validate", lambda exp: calls.append(exp) or validate(exp))
    capacity.run_command("smoke", knobs, execution)
    assert len(calls) == 1  # the command validates once, training included
    finished = rows(tmp_path / "out")
    assert sorted(planned_ids(text)) == sorted(r["run_id"] for r in finished)
    # the groups shown are the jobs the store recorded: their runs and slots
    packing = json.loads((tmp_path / "out" / "packing.json").read_text())
    jobs = {}
    for run_id, entry in packing.items():
        jobs.setdefault(entry["job"], []).append(entry["slots"])
    shown = [(int(m.group(1)), int(m.group(3) or 1)) for m in GROUP.finditer(text)]
    assert sorted(shown) == sorted((len(slots), slots[0]) for slots in jobs.values())


@pytest.mark.slow
@pytest.mark.parametrize("source", ["markov", "text"])
def test_the_generalization_plan_is_what_trains(tmp_path, source):
    # Markov: H(x | θ) is exact, so the plan holds before θ is trained; text: once --out holds θ trained.
    knobs = GeneralizationKnobs(source=source, models="1x8x1", check_models="1x16x2",
                                training=TrainingKnobs(max_steps=20), out=str(tmp_path / "out"))
    execution = ExecutionKnobs(ensemble="off", workers=1, no_progress=True)
    before = dry_run.generalization_command("smoke", knobs, execution)
    assert not (tmp_path / "out").exists()
    generalization.run_command("smoke", knobs, execution)
    trained = sorted(r["run_id"] for r in rows(tmp_path / "out"))
    after = dry_run.generalization_command("smoke", knobs, execution)
    assert "first, alone" not in after  # θ trained: nothing to train before the runs
    assert ("exact (Markov chain)" if source == "markov" else "the trained reference in --out") in after
    assert sorted(planned_ids(after)) == trained
    if source == "markov":
        assert "first, alone: reference" in before and sorted(planned_ids(before)) == trained


@pytest.mark.slow
def test_dry_run_into_a_finished_folder_plans_only_what_remains(tmp_path):
    out = tmp_path / "runs"
    result = memk("run-capacity", "--preset", "smoke", "--out", str(out), "--no-progress")
    assert result.returncode == 0, result.stderr
    finished = rows(out)
    assert len(finished) == 4

    def listing(folder: Path) -> dict[str, tuple[int, int]]:
        return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}

    before = listing(out)
    result = memk("run-capacity", "--preset", "smoke", "--out", str(out), "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "0 runs to train" in result.stdout and "4 of 4 runs finished" in result.stdout, result.stdout
    assert listing(out) == before  # read, not written: no lock file, no folder, nothing set aside

    # One run's row gone (the real command would train it again): that run alone is planned.
    (out / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in finished[1:]))
    result = memk("run-capacity", "--preset", "smoke", "--out", str(out), "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "1 run to train" in result.stdout and finished[0]["run_id"] in result.stdout, result.stdout
    assert not any(r["run_id"] in result.stdout for r in finished[1:])

    # A folder that does not exist: everything to train, and the dry run creates nothing.
    fresh = tmp_path / "fresh"
    result = memk("run-capacity", "--preset", "smoke", "--out", str(fresh), "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "4 runs to train" in result.stdout and not fresh.exists()
