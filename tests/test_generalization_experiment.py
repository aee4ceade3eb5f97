"""memorize/experiments/generalization_experiment.py: run-generalization's presets with the command
line's knobs applied, and the checks made before any data is read."""

import json
import re
from dataclasses import replace

import pytest
import torch

from memk.memorize.errors import ConfigError
from memk.memorize.experiments import generalization_experiment as gx
from memk.memorize.experiments.knobs import GeneralizationKnobs, TrainingKnobs


def test_no_knobs_is_the_preset():
    for name in gx.PRESETS:
        assert gx.experiment_from_options(name) == gx.preset(name)


def test_markov_asked_of_a_text_preset_takes_the_markov_preset_s_chain_and_reshapes_the_models():
    exp = gx.experiment_from_options("smoke", GeneralizationKnobs(source="markov"))
    chain = gx.preset("markov").source
    assert (exp.source.kind, exp.source.vocab_size, exp.source.markov_branching) == \
           ("markov", chain.vocab_size, chain.markov_branching)
    assert {(m.vocab_size, m.seq_len) for m in exp.models + exp.check_models} == {(chain.vocab_size, 16)}


def test_knobs_land_in_their_fields():
    knobs = GeneralizationKnobs(text="corpus.txt", models="1x16x2", check_models="", reference_model="1x32",
                                sizes="20,40", heldout=32, alpha=3.0, precision="bfloat16", seed=5,
                                training=TrainingKnobs(max_steps=80, lr=0.02, batch_size=16, device="cpu"))
    exp = gx.experiment_from_options("default", knobs)
    assert exp.source.kind == "text" and exp.source.text_path == "corpus.txt"
    assert [m.name for m in exp.models] == ["L1-d16-h2-V2048-S64"] and exp.check_models == ()
    assert exp.reference_model.name == "L1-d32-h1-V2048-S64"
    assert exp.dataset_sizes == (20, 40) and (exp.n_heldout, exp.n_attack) == (32, 32)  # the attack within held-out
    assert (exp.alpha, exp.alpha_source, exp.precision, exp.seed, exp.device) == (3.0, "--alpha", "bfloat16", 5, "cpu")
    assert (exp.train.max_steps, exp.train.lr, exp.train.batch_size) == (80, 0.02, 16)
    # θ takes the sweep's step cap, and keeps its own rate and batch
    reference = gx.preset("default").reference_train
    assert exp.reference_train == reference.with_step_cap(80)
    assert exp.reference_train_config().precision == "bfloat16"


def test_alpha_is_read_from_a_capacity_summary_for_the_precision(tmp_path):
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"precisions": {"float32": {"fit": {"through_origin": {"alpha": 2.5}}}}}))
    exp = gx.experiment_from_options("smoke", GeneralizationKnobs(capacity_summary=str(summary)))
    assert exp.alpha == 2.5 and exp.alpha_source == f"fit in {summary}"
    with pytest.raises(ConfigError, match=re.escape("holds no bfloat16 α fit")):
        gx.experiment_from_options("smoke", GeneralizationKnobs(capacity_summary=str(summary), precision="bfloat16"))


@pytest.mark.parametrize("knobs, message", [
    (GeneralizationKnobs(alpha=2.0, capacity_summary="s.json"), "give either --alpha or --capacity-summary, not both"),
    (GeneralizationKnobs(reference_model="1x8,1x16"), "--reference-model takes one model, got '1x8,1x16'"),
    (GeneralizationKnobs(check_size_factors="1,x"), "cannot read check size factors '1,x'"),
    (GeneralizationKnobs(training=TrainingKnobs(max_steps=0)), "--max-steps must be >= 1"),
])
def test_unreadable_knobs_are_refused_as_the_experiment_is_made(knobs, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        gx.experiment_from_options("smoke", knobs)


@pytest.mark.parametrize("changes, message", [
    (dict(n_attack=0), "the attack needs at least 1 member and 1 non-member, got 0"),
    (dict(alpha=float("inf")), "alpha (bits per parameter) must be a positive finite number, got inf"),
    (dict(check_models=gx.preset("smoke").check_models * 2), "is named twice; give each model once"),
    (dict(n_heldout=1), "the held-out split needs at least 2 sequences"),
])
def test_validate_refuses_what_cannot_run(changes, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        gx.validate(replace(gx.preset("smoke"), **changes))


def test_a_model_off_the_data_s_shape_is_refused():
    smoke = gx.preset("smoke")
    other = replace(smoke.models[0], vocab_size=64)
    with pytest.raises(ConfigError, match="does not match the data"):
        gx.validate(replace(smoke, models=(other,)))


def test_validate_gives_the_experiment_with_its_device_and_backends():
    exp = replace(gx.preset("smoke"), device="cpu", attention_backend="sdpa", logprob_backend="reference")
    checked = gx.validate(exp)
    assert checked.experiment is exp and checked.device == torch.device("cpu")
    assert tuple(checked.backends) == ("sdpa", "reference")
