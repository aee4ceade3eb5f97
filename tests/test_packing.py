"""Packing (memorize/runs/packing.py): which runs share an ensemble, in how many slots (K, the memory
budget, --ensemble auto's probe), the packing a rerun resumes, and the --ensemble option read once."""

import sys
from dataclasses import replace
from pathlib import Path

import pytest

from memk.memorize.errors import ConfigError
from memk.memorize.model import GPTConfig
from memk.memorize.runs.ensemble_executor import EnsembleExecutor
from memk.memorize.runs.packing import (MEMORY_FRACTION, EnsembleChoice, EnsemblePlan, Packer, member_bytes,
                                        packing_entries, parse_ensemble, plan_ensembles, read_ensemble,
                                        recorded_plans)
from memk.memorize.runtime import Backends
from memk.memorize.runs.sweep import Run

sys.path.append(str(Path(__file__).parent))  # for ensemble_runs.py: pytest's importlib mode puts no test folder on sys.path
from ensemble_runs import BACKENDS, CPU, MODEL, RUNS, TRAIN  # noqa: E402


def test_runs_group_by_shape_precision_batch_backends_and_batch_rows_and_k_caps_the_slots():
    base = Run("a", MODEL, 10, TRAIN, BACKENDS)
    others = [
        replace(base, name="b", n_sequences=20, train=replace(TRAIN, seed=4, lr=0.1)),  # same group: per-member things
        replace(base, name="c", model=GPTConfig(1, 8, 1, 16, 8)),
        replace(base, name="d", train=replace(TRAIN, precision="bfloat16-autocast")),
        replace(base, name="e", train=replace(TRAIN, batch_size=32)),
        replace(base, name="f", backends=Backends("reference", "fused")),
        replace(base, name="g", n_sequences=30),
        replace(base, name="h", n_sequences=7),  # 7 rows a batch: less than half of a's 10, b's and g's 16
        replace(base, name="i", n_sequences=4),
        # bfloat16 weights: EnsembleGPT stacks float32 weights only, so each trains alone, planned first
        replace(base, name="j", train=replace(TRAIN, precision="bfloat16")),
        replace(base, name="k", n_sequences=20, train=replace(TRAIN, precision="bfloat16")),
    ]
    plans = plan_ensembles([base, *others], max_members=2, memory_budget=None)
    assert [[r.name for r in p.runs] for p in plans] == [["j"], ["k"], ["a", "b", "g"], ["h", "i"], ["c"], ["d"], ["e"], ["f"]]
    assert [p.slots for p in plans] == [1, 1, 2, 2, 1, 1, 1, 1]
    assert plan_ensembles([base, *others], max_members=None, memory_budget=None)[2].slots == 3


@pytest.mark.parametrize("member_step, stacked", [(0.85, True), (0.95, False), (1.2, False)])
def test_auto_stacks_a_group_only_where_its_member_step_is_clearly_faster(monkeypatch, member_step, stacked):
    import memk.memorize.runs.packing as packing

    runs = RUNS[:3]
    monkeypatch.setattr(packing, "probe_step_seconds", lambda run, k, device, limits: (1.0, k * member_step))
    plans = EnsembleExecutor(CPU, choose_faster=True).plans(runs)
    assert [p.slots for p in plans] == [3 if stacked else 1]
    assert plans[0].probe == (3, 1.0, 3 * member_step)  # what --dry-run prints


def test_jobs_side_by_side_share_the_memory_budget():
    runs = RUNS[:3]  # one ensemble key, one batch-rows bucket
    executor = EnsembleExecutor(CPU, memory_budget=int(4.5 * member_bytes(runs[0])))
    assert [(p.slots, p.memory_capped) for p in executor.plans(runs)] == [(3, False)]
    assert [(p.slots, p.memory_capped) for p in executor.plans(runs, workers=2)] == [(2, True)]  # 2.25 members each


def test_the_packing_a_rerun_resumes_is_what_the_first_run_planned():
    plan = EnsemblePlan(RUNS[:3], slots=3)
    recorded = packing_entries(plan, {RUNS[0].run_id: 2})
    recorded.update(packing_entries(EnsemblePlan(RUNS[3:], 1), {RUNS[3].run_id: 1}))
    recorded["junk"] = {"slots": "many"}
    fresh = Run("fresh", MODEL, 12, replace(TRAIN, seed=7), BACKENDS)
    # "big" finished: the rest of its ensemble resumes in the same slots, job and threads.
    plans, rest = recorded_plans([RUNS[1], fresh, RUNS[2], RUNS[3]], recorded)
    assert rest == [fresh]
    assert [([r.name for r in p.runs], p.slots, p.threads, p.job) for p in plans] == [
        (["small", "decayed"], 3, 2, RUNS[0].run_id), (["tiny"], 1, 1, RUNS[3].run_id)]


# ---------------------------------------------------------------------------------------
# The --ensemble option


@pytest.mark.parametrize("text, expected", [("auto", "auto"), ("OFF", "off"), ("8", 8), (" 1 ", 1)])
def test_the_ensemble_option_reads_auto_off_or_a_count(text, expected):
    assert parse_ensemble(text) == expected


@pytest.mark.parametrize("text", ["0", "-3", "2.5", "lots", "", "+4"])
def test_a_bad_ensemble_option_names_the_problem_and_the_fix(text):
    with pytest.raises(ConfigError, match="--ensemble must be auto, off or a whole number"):
        parse_ensemble(text)

@pytest.mark.parametrize("text, expected", [
    ("auto", EnsembleChoice(choose_faster=True)), ("OFF", EnsembleChoice(off=True)), ("8", EnsembleChoice(max_members=8)),
    (" 1 ", EnsembleChoice(max_members=1)), (3, EnsembleChoice(max_members=3)),
])
def test_the_ensemble_option_is_read_once_into_a_choice_that_reads_as_it_was_written(text, expected):
    choice = read_ensemble(text)
    assert choice == expected and read_ensemble(choice) is choice  # a choice read again is the same choice
    assert str(choice) == str(parse_ensemble(text))  # what --dry-run prints after --ensemble


@pytest.mark.parametrize("text", ["0", "-3", "2.5", "lots", "", "+4"])
def test_a_bad_ensemble_option_is_a_config_error_when_read(text):
    with pytest.raises(ConfigError, match="--ensemble must be auto, off or a whole number.*e.g. --ensemble 8"):
        read_ensemble(text)


def test_off_packs_each_run_alone_whatever_the_packing_recorded():
    plan = EnsemblePlan(RUNS[:3], slots=3)
    recorded = packing_entries(plan, {RUNS[0].run_id: 1})
    plans = Packer(CPU, read_ensemble("off")).plans(RUNS, recorded=recorded)
    assert [([r.name for r in p.runs], p.slots, p.threads, p.job) for p in plans] == [
        ([r.name], 1, None, None) for r in RUNS]


def test_the_memory_budget_is_the_free_memory_share_split_among_the_workers(monkeypatch):
    import memk.memorize.runs.packing as packing

    runs = RUNS[:3]  # one ensemble key, one batch-rows bucket
    one = member_bytes(runs[0])
    # MEMORY_FRACTION of the free memory holds 4.5 members: a share of 1/2 holds 2, and two workers 1 each.
    monkeypatch.setattr(packing, "free_memory_bytes", lambda device: int(4.5 * one / MEMORY_FRACTION))
    slots = lambda packer, workers=1: [(p.slots, p.memory_capped) for p in packer.plans(runs, workers)]  # noqa: E731
    stacked = EnsembleChoice(max_members=None)  # as many as memory holds
    assert slots(Packer(CPU, stacked)) == [(3, False)]
    assert slots(Packer(CPU, stacked, memory_share=0.5)) == [(2, True)]
    assert slots(Packer(CPU, stacked), workers=2) == [(2, True)]
    assert slots(Packer(CPU, stacked, memory_share=0.5), workers=2) == [(1, True)]
    assert slots(Packer(CPU, stacked, memory_budget=int(1.5 * one), memory_share=0.01)) == [(1, True)]  # a given budget
