import json
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from memk.memorize.experiments import capacity
from memk.memorize.bits import uniform_sequence_entropy_bits
from memk.memorize.data import uniform_random_sequences
from memk.memorize.errors import ConfigError
from memk.memorize.model import count_parameters
from memk.memorize.experiments.knobs import CapacityKnobs, TrainingKnobs
from memk.memorize.schedule import RunOutcome, TrainConfig
from memk.memorize.runtime import Backends


def test_fit_on_an_exact_line_recovers_alpha():
    params = [1e4, 2e4, 5e4, 1e5]
    fit = capacity.fit_alpha(params, [3.6 * p for p in params])
    assert fit["through_origin"]["alpha"] == pytest.approx(3.6)
    assert fit["through_origin"]["r2"] == pytest.approx(1.0)
    assert fit["through_origin"]["ci"] == pytest.approx([3.6, 3.6])
    assert fit["with_intercept"]["alpha"] == pytest.approx(3.6)
    assert fit["with_intercept"]["intercept"] == pytest.approx(0.0, abs=1e-6)


def test_fit_matches_textbook_formulas_on_noisy_points():
    rng = np.random.default_rng(0)
    x = np.array([2e3, 5e3, 1e4, 2e4, 4e4])
    y = 3.3 * x + 500 + rng.normal(0, 2e3, size=x.size)
    fit = capacity.fit_alpha(x, y)

    # Through the origin: α = Σxy/Σx², se² = SSR/(n-1)/Σx², t interval with n-1 dof.
    a = (x @ y) / (x @ x)
    se = np.sqrt(((y - a * x) ** 2).sum() / (len(x) - 1) / (x @ x))
    t = stats.t.ppf(0.975, len(x) - 1)
    assert fit["through_origin"]["alpha"] == pytest.approx(a)
    assert fit["through_origin"]["ci"] == pytest.approx([a - t * se, a + t * se])

    # With an intercept: the polyfit line, slope interval with n-2 dof.
    slope, intercept = np.polyfit(x, y, 1)
    resid = y - (slope * x + intercept)
    se = np.sqrt((resid**2).sum() / (len(x) - 2) / ((x - x.mean()) ** 2).sum())
    t = stats.t.ppf(0.975, len(x) - 2)
    w = fit["with_intercept"]
    assert w["alpha"] == pytest.approx(slope) and w["intercept"] == pytest.approx(intercept)
    assert w["ci"] == pytest.approx([slope - t * se, slope + t * se])
    assert w["r2"] == pytest.approx(1 - (resid**2).sum() / ((y - y.mean()) ** 2).sum())


def test_fit_with_too_few_models_gives_no_interval():
    fit = capacity.fit_alpha([1000.0], [3000.0])
    assert fit["through_origin"]["alpha"] == pytest.approx(3.0)
    assert fit["through_origin"]["ci"] is None
    assert fit["with_intercept"] is None
    assert capacity.fit_alpha([1e3, 2e3], [3e3, 7e3])["with_intercept"]["ci"] is None


@pytest.mark.parametrize("name", list(capacity.PRESETS))
def test_dataset_grid_brackets_the_expected_capacity_on_both_sides(name):
    exp = capacity.preset(name)
    for model in exp.models:
        expected = 3.6 * count_parameters(model)
        bits = [n * uniform_sequence_entropy_bits(model.vocab_size, model.seq_len) for n in capacity.dataset_sizes_for(model, exp)]
        assert min(bits) < expected < max(bits)


def test_paper_preset_is_the_papers_grid():
    exp = capacity.preset("paper")
    assert {m.vocab_size for m in exp.models} == {2048} and {m.seq_len for m in exp.models} == {64}
    assert {m.n_layer for m in exp.models} == {1, 2, 4, 8}
    assert min(m.d_model for m in exp.models) == 32 and max(m.d_model for m in exp.models) == 512
    assert exp.train.batch_size == 2048 and exp.precisions == ("bfloat16",)


BACKENDS = Backends("sdpa", "reference")
DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_plan_is_every_precision_model_and_size_once_with_ids_that_follow_what_shapes_the_result():
    exp = replace(capacity.preset("smoke"), precisions=("float32", "bfloat16"))
    runs = capacity.plan(exp, BACKENDS)
    expected = [(p, m, n) for p in exp.precisions for m in exp.models for n in capacity.dataset_sizes_for(m, exp)]
    assert [(r.train.precision, r.model, r.n_sequences) for r in runs] == expected
    assert len({r.run_id for r in runs}) == len(runs)
    assert runs == capacity.plan(exp, BACKENDS) and [r.run_id for r in runs] == [r.run_id for r in capacity.plan(exp, BACKENDS)]
    stepped = replace(exp, train=exp.train.with_step_cap(99))
    assert not {r.run_id for r in runs} & {r.run_id for r in capacity.plan(stepped, BACKENDS)}
    reseeded = replace(exp, seed=1)
    assert not {r.run_id for r in runs} & {r.run_id for r in capacity.plan(reseeded, BACKENDS)}


def test_legacy_run_ids_are_those_earlier_output_folders_hold():
    # runs.jsonl of `memk run-capacity --preset smoke` before the backends entered run ids (with the
    # smoke recipe of then): the same ids, so folders written then resume where their rows record the
    # same backends, and TrainConfig fields added since (saturation_gain) leave them unchanged.
    then = TrainConfig(lr=1e-2, warmup_steps=5, batch_size=32, max_steps=30, cooldown_steps=6, min_steps=10, eval_every=10)
    ids = [r.legacy_run_id for r in capacity.plan(replace(capacity.preset("smoke"), train=then), BACKENDS)]
    assert ids == [
        "L1-d8-h1-V16-S8-N69-float32-seed0-64f241e9",
        "L1-d8-h1-V16-S8-N278-float32-seed0-85b4644d",
        "L1-d16-h2-V16-S8-N238-float32-seed0-e65ae31b",
        "L1-d16-h2-V16-S8-N950-float32-seed0-cf4b09b5",
    ]


def test_uniform_workload_trains_on_the_seeded_stream():
    run = capacity.plan(capacity.preset("smoke"), BACKENDS)[1]
    data = capacity.UniformWorkload().training_data(run)
    assert data.shape == (run.n_sequences, run.model.seq_len)
    assert torch.equal(data, uniform_random_sequences(run.n_sequences, 16, 8, seed=0))


def _row(name, params, n, dataset_bits, mem, precision="float32"):
    # A row as memk wrote them before the saturation verdict (no saturation_gain, an empty curve).
    return dict(
        run_id=f"{name}-{n}-{precision}", model_name=name, model={}, parameters=params, n_sequences=n,
        precision=precision, seed=0, dataset_bits=dataset_bits, memorized_bits=mem, memorized_bits_final=mem,
        fraction_memorized=mem / dataset_bits, model_bits_per_sequence=1.0, steps=1, stop_reason="plateau",
        final_loss=0.1, train_seconds=1.0, bits_curve=[], train_config={},
    )


def test_summary_takes_the_plateau_as_capacity_and_fits_per_precision():
    rows = [
        _row("a", 100, 1, 200, 190), _row("a", 100, 2, 400, 350), _row("a", 100, 4, 800, 360), _row("a", 100, 8, 1600, 340),
        _row("b", 200, 2, 400, 395), _row("b", 200, 4, 800, 700), _row("b", 200, 8, 1600, 720),
        _row("a", 100, 4, 800, 300, precision="bfloat16"),
    ]
    summary = capacity.summarize(rows)
    models = {m["model_name"]: m for m in summary["precisions"]["float32"]["models"]}
    assert models["a"]["capacity_bits"] == 360 and models["a"]["capacity_at_n_sequences"] == 4
    assert models["b"]["capacity_bits"] == 720 and models["a"]["plateau_seen"] and models["b"]["plateau_seen"]
    assert summary["precisions"]["float32"]["fit"]["through_origin"]["alpha"] == pytest.approx(3.6)
    assert summary["precisions"]["bfloat16"]["models"][0]["capacity_bits"] == 300
    assert "α through origin: 3.600" in capacity.format_table(summary)


def _knobs(**options) -> CapacityKnobs:
    """The knobs of these command-line values by name, the training ones in their group."""
    training = {k: options.pop(k) for k in [f.name for f in fields(TrainingKnobs)] if k in options}
    return CapacityKnobs(**options, training=TrainingKnobs(**training))


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(models="1x30x4"), "divisible"),
        (dict(sizes="0,5"), ">= 1"),
        (dict(models="2by64"), "LAYERSxD_MODEL"),
        (dict(preset_name="huge"), "unknown preset"),
        (dict(max_steps=0), "--max-steps must be >= 1"),
        (dict(max_steps=-1), "--max-steps must be >= 1"),  # not blamed on the cool-down
        (dict(sizes="10,20", size_factors="1,2"), "either --sizes .* or --size-factors"),
        (dict(size_factors="1,inf"), "size factors must be positive finite numbers"),
        (dict(vocab_size=1), "vocab size must be >= 2"),
        (dict(seed=-1), r"--seed must lie in \[0, 2\^32\)"),
        (dict(seed=2**64), r"--seed must lie in \[0, 2\^32\)"),
        (dict(lr=float("inf")), "--lr must be a positive finite number"),
        (dict(lr=0.0), "--lr must be a positive finite number"),
        (dict(models="1x8x1,1x16,1x8x1"), "L1-d8-h1-V16-S8 is named twice"),
        (dict(max_steps=50, cooldown_steps=80), "cooldown_steps"),
        (dict(attention_backend="fast"), "unknown attention backend"),
    ],
)
def test_bad_options_are_config_errors(options, message):
    options = {"preset_name": "smoke", **options}
    preset_name = options.pop("preset_name")
    with pytest.raises(ConfigError, match=message):
        capacity.validate(capacity.experiment_from_options(preset_name, _knobs(**options)))


def test_the_knobs_override_the_preset_and_nothing_else():
    smoke = capacity.preset("smoke")
    assert capacity.experiment_from_options("smoke") == smoke
    exp = capacity.experiment_from_options("smoke", _knobs(models="2x16", vocab_size=32, sizes="7,3", precision="both",
                                                           max_steps=60, lr=0.5, seed=4, device="cpu"))
    assert [(m.n_layer, m.d_model, m.vocab_size, m.seq_len) for m in exp.models] == [(2, 16, 32, 8)]
    assert exp.dataset_sizes == (7, 3) and exp.precisions == ("float32", "bfloat16")
    assert (exp.train.max_steps, exp.train.cooldown_steps, exp.train.lr) == (60, 12, 0.5)  # the cool-down's share kept
    assert (exp.seed, exp.device, exp.size_factors, exp.attention_backend) == (4, "cpu", smoke.size_factors, "auto")
    checked = capacity.validate(exp)
    assert checked.experiment is exp and checked.device == torch.device("cpu")


# ---- the typed row


def test_a_row_of_runs_jsonl_reads_as_a_capacity_row_and_writes_back_key_for_key():
    stored = json.loads((DOCS / "default-run" / "runs.jsonl").read_text().splitlines()[0])
    row = capacity.CapacityRow.from_dict(stored)
    written = row.to_dict()
    assert list(written) == [f.name for f in fields(capacity.CapacityRow)]
    assert written == {k: stored[k] for k in written}  # the stored row's keys in its order, then provenance
    assert list(stored)[: len(written)] == list(written)


def test_a_row_of_earlier_memk_gets_its_saturation_verdict_from_its_curve():
    curve = [[100, 50.0], [200, 100.0], [400, 101.0]]  # the last doubling gained 1%: saturated
    row = capacity.CapacityRow.from_dict({**_row("a", 100, 4, 800, 101.0), "bits_curve": curve})
    assert row.saturation_gain == pytest.approx(0.01) and row.saturated
    assert capacity.CapacityRow.from_dict(_row("a", 100, 4, 800, 1.0)).saturation_gain is None  # no curve: no verdict


def test_the_workload_s_row_is_a_capacity_row_in_its_key_order():
    run = capacity.plan(capacity.preset("smoke"), BACKENDS)[0]
    outcome = RunOutcome(steps=30, stop_reason="step_cap", memorized_bits=80.0, memorized_bits_final=79.0,
                         model_bits_per_sequence=12.5, final_loss=2.0, curve=[(10, 40.0), (20, 70.0), (30, 80.0)],
                         train_seconds=1.5, saturation_gain=0.6)
    row = capacity.UniformWorkload().result(run, None, outcome, None)
    assert list(row) == [f.name for f in fields(capacity.CapacityRow)]
    bits = run.n_sequences * 7 * 4  # (S-1)·log2 V with S = 8, V = 16
    assert row["dataset_bits"] == bits and row["fraction_memorized"] == 80.0 / bits
    assert (row["saturated"], row["seed"], row["precision"]) == (False, 0, "float32")
    assert capacity.CapacityRow.from_dict(row).to_dict() == row
