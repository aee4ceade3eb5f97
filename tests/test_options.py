"""memorize/experiments/options.py: what the command line gives an experiment, against known answers
and the exact messages a user reads."""

import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from memk.memorize.errors import ConfigError
from memk.memorize.experiments.knobs import TrainingKnobs
from memk.memorize.experiments.options import (
    Checked, check_experiment, choose_sizes, output_folder, override_common, override_training, parse_models,
    parse_numbers, pick_preset, reshape_models,
)
from memk.memorize.model import GPTConfig
from memk.memorize.runtime import Backends
from memk.memorize.schedule import TrainConfig


def test_models_are_layers_by_width_with_heads_given_or_one_per_32_dimensions():
    assert parse_models("1x32, 2X64x4,3x8", 16, 8) == (
        GPTConfig(n_layer=1, d_model=32, n_head=1, vocab_size=16, seq_len=8),
        GPTConfig(n_layer=2, d_model=64, n_head=4, vocab_size=16, seq_len=8),
        GPTConfig(n_layer=3, d_model=8, n_head=1, vocab_size=16, seq_len=8),  # 8 // 32 = 0: at least one head
    )
    assert parse_models("1x128", 16, 8)[0].n_head == 4


@pytest.mark.parametrize("spec, message", [
    ("1x", "cannot read model '1x': write LAYERSxD_MODEL or LAYERSxD_MODELxHEADS, e.g. 2x64x2"),
    ("2by64", "cannot read model '2by64': write LAYERSxD_MODEL"),
    ("1x2x3x4", "cannot read model '1x2x3x4'"),
    ("1x30x4", "model '1x30x4': "),  # GPTConfig's own reason follows (d_model divisible by n_head)
])
def test_an_unreadable_model_is_a_config_error_naming_it_and_the_form(spec, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_models(spec, 16, 8)


def test_reshape_keeps_the_shapes_and_changes_vocabulary_and_length():
    models = parse_models("1x8x1,2x16x2", 16, 8)
    reshaped = reshape_models(models, 64, 32)
    assert [(m.n_layer, m.d_model, m.n_head) for m in reshaped] == [(1, 8, 1), (2, 16, 2)]
    assert {(m.vocab_size, m.seq_len) for m in reshaped} == {(64, 32)}


def test_numbers_are_comma_separated_and_blanks_skipped():
    assert parse_numbers("10, 20,,40,", int, "dataset sizes") == (10, 20, 40)
    assert parse_numbers("0.5,2", float, "size factors") == (0.5, 2.0)
    with pytest.raises(ConfigError, match=re.escape(
            "cannot read dataset sizes '10,x': give comma-separated numbers, e.g. 10,20,40")):
        parse_numbers("10,x", int, "dataset sizes")


def test_sizes_or_factors_become_the_experiments_fields_never_both():
    assert choose_sizes(None, None) == {}
    assert choose_sizes("50,100", None) == {"dataset_sizes": (50, 100)}
    assert choose_sizes(None, "0.5,2") == {"size_factors": (0.5, 2.0)}
    with pytest.raises(ConfigError, match=re.escape(
            "give either --sizes (sequences) or --size-factors (multiples of capacity), not both")):
        choose_sizes("50", "1")


BASE = TrainConfig(lr=1e-2, warmup_steps=100, batch_size=64, max_steps=3000, cooldown_steps=600, min_steps=500)


def test_a_new_step_cap_keeps_the_cooldown_share_and_min_steps_within_it():
    capped = override_training(BASE, TrainingKnobs(max_steps=100))
    assert (capped.max_steps, capped.cooldown_steps, capped.min_steps) == (100, 20, 100)  # 600/3000 of 100
    assert override_training(BASE, TrainingKnobs(max_steps=100), cooldown_steps=7).cooldown_steps == 7
    assert override_training(BASE, TrainingKnobs(), cooldown_steps=7) == replace(BASE, cooldown_steps=7)
    changed = override_training(BASE, TrainingKnobs(lr=0.5, batch_size=8))
    assert (changed.lr, changed.batch_size, changed.max_steps) == (0.5, 8, 3000)
    assert override_training(BASE, TrainingKnobs()) == BASE  # nothing given: the preset's schedule
    assert override_training(BASE, TrainingKnobs(device="cpu", attention_backend="sdpa")) == BASE  # not schedule knobs


@pytest.mark.parametrize("knobs, cooldown, message", [
    (TrainingKnobs(max_steps=0), None, "--max-steps must be >= 1 (the step cap, cool-down included), got 0"),
    (TrainingKnobs(max_steps=-1), 5, "--max-steps must be >= 1 (the step cap, cool-down included), got -1"),
    (TrainingKnobs(lr=0.0), None, "--lr must be a positive finite number, got 0.0"),
    (TrainingKnobs(lr=float("nan")), None, "--lr must be a positive finite number, got nan"),
    (TrainingKnobs(max_steps=50), 80, "cooldown_steps must lie in [0, max_steps=50], got 80"),
    (TrainingKnobs(batch_size=0), None, "batch_size must be >= 1, got 0"),
])
def test_a_bad_schedule_knob_is_a_config_error_with_its_message(knobs, cooldown, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        override_training(BASE, knobs, cooldown)


def test_the_common_knobs_are_set_only_where_given():
    assert override_common({}, TrainingKnobs(), None) == {}
    assert override_common({"x": 1}, TrainingKnobs(device="cpu", logprob_backend="reference"), 3) == {
        "x": 1, "device": "cpu", "seed": 3, "logprob_backend": "reference"}


def test_the_output_folder_is_the_default_or_the_one_given_never_an_empty_one():
    assert output_folder(None, Path("runs/capacity-smoke")) == Path("runs/capacity-smoke")
    assert output_folder("x/y", Path("runs/z")) == Path("x/y")
    with pytest.raises(ConfigError, match=re.escape(
            "--out is empty; give the folder to write to (or leave --out out for the default)")):
        output_folder("  ", Path("runs/z"))


def test_an_unknown_preset_names_the_choices():
    presets = {"default": lambda: "d", "smoke": lambda: "s"}
    assert pick_preset(presets, "smoke") == "s"
    with pytest.raises(ConfigError, match=re.escape("unknown preset 'huge'; choose one of default, smoke")):
        pick_preset(presets, "huge")


MODELS = parse_models("1x8x1,1x16x2", 16, 8)
GOOD = dict(models=MODELS, precisions=("float32",), dataset_sizes=None, size_factors={"size factors": (0.5, 2.0)},
            seed=0, device="cpu", attention_backend="auto", logprob_backend="auto")


def test_a_good_experiment_passes_and_gives_its_device():
    assert check_experiment(**GOOD) == torch.device("cpu")
    # explicit sizes replace the factors: those are not checked then
    assert check_experiment(**{**GOOD, "dataset_sizes": (5,), "size_factors": {"size factors": ()}}).type == "cpu"


@pytest.mark.parametrize("changes, message", [
    (dict(models=()), "no models to train: give at least one with --models"),
    (dict(models=MODELS + MODELS[:1]), "model L1-d8-h1-V16-S8 is named twice; give each model once"),
    (dict(models=parse_models("1x8x1", 16, 1)), "seq_len must be >= 2 (the first token is context, the rest are "
                                                "coded), got 1"),
    (dict(models=parse_models("1x8x1", 1, 8)), "vocab size must be >= 2: with 1 token a sequence carries no bits"),
    (dict(seed=-1), "--seed must lie in [0, 2^32), got -1"),
    (dict(seed=2**32), "--seed must lie in [0, 2^32), got 4294967296"),
    (dict(precisions=("float16",)), "unknown precision 'float16'; choose from float32, bfloat16, bfloat16-autocast"),
    (dict(dataset_sizes=(3, 0)), "dataset sizes must be >= 1 sequence, got [3, 0]"),
    (dict(dataset_sizes=()), "dataset sizes must be >= 1 sequence, got []"),
    (dict(size_factors={"check size factors": (1.0, float("inf"))}),
     "check size factors must be positive finite numbers, got [1.0, inf]"),
    (dict(device="tpu"), "unknown device 'tpu': use cpu, cuda or cuda:N"),
    (dict(device="meta"), "device 'meta' is not supported: use cpu or cuda"),
    (dict(attention_backend="fast"), "unknown attention backend 'fast'; choose auto or one of"),
])
def test_each_check_is_a_config_error_naming_the_problem_and_the_fix(changes, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_experiment(**{**GOOD, **changes})


def test_checked_resolves_the_backends_auto_leaves_for_the_device():
    class Exp:
        attention_backend, logprob_backend = "sdpa", "reference"

    checked = Checked.of(Exp(), torch.device("cpu"))
    assert checked.backends == Backends("sdpa", "reference") and checked.device == torch.device("cpu")
    Exp.attention_backend = Exp.logprob_backend = "auto"
    auto = Checked.of(Exp(), torch.device("cpu")).backends
    assert "auto" not in auto  # a registered backend of each kind, the device's best


def test_bfloat16_on_a_cpu_without_its_instructions_is_said_once_at_the_check(monkeypatch, capsys):
    from memk.memorize import precision

    checks = dict(models=(GPTConfig(n_layer=1, d_model=8, n_head=1, vocab_size=16, seq_len=8),), dataset_sizes=(4,),
                  size_factors={}, seed=0, device="cpu", attention_backend="auto", logprob_backend="auto")
    monkeypatch.setattr(precision, "cpu_has_bfloat16", lambda cpuinfo=None: False)
    check_experiment(precisions=("float32", "bfloat16"), **checks)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("memk: warning: this CPU has no bfloat16 instructions")
    check_experiment(precisions=("float32",), **checks)  # float32 only: nothing to say
    monkeypatch.setattr(precision, "cpu_has_bfloat16", lambda cpuinfo=None: True)
    check_experiment(precisions=("bfloat16",), **checks)  # the CPU has them
    assert capsys.readouterr().err == ""
