"""The probe that --ensemble auto decides by and --dry-run estimates from (memorize/runs/ensemble_probe.py):
its cap on a dry run's probe step, and the extrapolation from fewer rows to the batch's."""

from dataclasses import replace

import pytest
import torch

from memk.memorize.experiments import capacity
from memk.memorize.experiments.dry_run import capacity_estimate
from memk.memorize.runs.ensemble_probe import DRY_RUN_PROBE, ProbeLimits, extrapolate, probe_rows, probe_step_seconds
from memk.memorize.model import GPTConfig
from memk.memorize.runtime import Backends
from memk.memorize.schedule import TrainConfig
from memk.memorize.runs.sweep import Run, training_flops

PAPER_8x512 = GPTConfig(8, 512, 16, 2048, 64)
PAPER_TRAIN = TrainConfig(batch_size=2048, max_steps=1_000_000)


def paper_run(model: GPTConfig = PAPER_8x512, n_sequences: int = 100_000) -> Run:
    return Run("paper", model, n_sequences, PAPER_TRAIN, Backends("sdpa", "fused"))


def step_flops(run: Run, rows: int, members: int) -> float:
    """One step of `members` runs at `rows` rows each, by the sweep's own count (sweep.training_flops)."""
    one_step = replace(run, n_sequences=rows, train=replace(run.train, batch_size=rows, max_steps=1))
    return members * training_flops(one_step)


def test_a_step_linear_in_its_rows_is_extrapolated_exactly():
    fixed, per_row = 0.004, 0.0005  # seconds: launches and the optimizer, and each row's work
    at = lambda rows: fixed + per_row * rows  # noqa: E731
    for some, rows in ((2, 2048), (37, 2048), (5, 6)):
        assert extrapolate(at(1), at(some), some, rows) == pytest.approx(at(rows), rel=1e-12)


def test_noise_that_makes_more_rows_look_faster_never_extrapolates_below_one_row():
    assert extrapolate(0.010, 0.009, 8, 2048) == 0.010


@pytest.mark.parametrize("members", [1, 3, 16])
@pytest.mark.parametrize("cap", [1e10, 2e12])
def test_the_probe_rows_are_the_most_that_keep_a_step_within_the_cap(members, cap):
    run = paper_run()
    rows = probe_rows(run, members, cap)
    if step_flops(run, 2048, members) <= cap:
        assert rows is None
        return
    assert 2 <= rows < 2048
    if rows > 2:  # two rows are the least a slope is taken from, whatever they cost
        assert step_flops(run, rows, members) <= cap < step_flops(run, rows + 1, members)


def test_small_steps_and_no_cap_are_probed_at_the_batch_rows():
    small = paper_run(GPTConfig(1, 8, 1, 64, 32), n_sequences=64)
    assert probe_rows(small, 4, 1e10) is None
    assert probe_rows(paper_run(), 4, None) is None
    # a dataset smaller than a batch: its rows are what counts
    assert probe_rows(paper_run(n_sequences=2), 64, 1.0) is None


def test_a_capped_probe_times_both_sides_and_the_dry_run_says_it_extrapolated(monkeypatch):
    run = Run("r", GPTConfig(1, 16, 2, 64, 16), 48, TrainConfig(batch_size=48), Backends("sdpa", "reference"))
    cap = step_flops(run, 6, 2) * (1 + 1e-9)  # 6 of 48 rows for two members (and no rounding below 6)
    assert probe_rows(run, 2, cap) == 6
    alone, together = probe_step_seconds(run, 2, torch.device("cpu"), limits=ProbeLimits(0.05, cap))
    assert 0 < alone < 10 and 0 < together < 10

    monkeypatch.setitem(DRY_RUN_PROBE, "cpu", ProbeLimits(0.05, 1.0))  # every probe capped: two rows
    exp = capacity.experiment_from_options("smoke")
    text = capacity_estimate(exp, "auto").text
    groups = text.count("  group ")
    assert groups >= 1 and text.count("steps timed at 1 and 2 of the batch's") == groups
