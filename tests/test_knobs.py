"""memorize/experiments/knobs.py: each command-line knob declared once, typed, and read back typed."""

import subprocess
import sys
import tempfile
from dataclasses import fields

import pytest

from memk.memorize.experiments.knobs import (
    CapacityKnobs, ExecutionKnobs, GeneralizationKnobs, TrainingKnobs, declared, from_values,
)

COMMANDS = {"run-capacity": (CapacityKnobs, ExecutionKnobs),
            "run-generalization": (GeneralizationKnobs, ExecutionKnobs)}


def test_the_training_knobs_come_after_a_command_s_own_in_the_order_help_lists_them():
    names = [d.name for d in declared(CapacityKnobs)]
    assert names == ["models", "vocab_size", "seq_len", "sizes", "size_factors", "precision", "cooldown_steps", "seed",
                     "out", "device", "max_steps", "lr", "batch_size", "attention_backend", "logprob_backend"]
    training = [f.name for f in fields(TrainingKnobs)]
    assert [d.name for d in declared(GeneralizationKnobs)][-9:] == ["precision", "seed", "out", *training]


def test_a_knob_s_type_is_its_annotation_s():
    kinds = {d.name: d.kind for group in (CapacityKnobs, ExecutionKnobs) for d in declared(group)}
    assert kinds["max_steps"] is int and kinds["lr"] is float and kinds["gpus_per_task"] is float
    assert kinds["no_progress"] is bool and kinds["dry_run"] is bool  # flags without a value
    assert kinds["models"] is None and kinds["device"] is None  # text
    assert kinds["ensemble"] is None and kinds["workers"] is None  # 'auto', 'off' or a number: read by runs/


def test_flags_are_the_field_names_with_dashes_but_the_executor_s():
    for group in (CapacityKnobs, GeneralizationKnobs, ExecutionKnobs):
        for d in declared(group):
            expected = "--executor" if d.name == "executor_name" else "--" + d.name.replace("_", "-")
            assert d.flag.name == expected


def test_each_flag_is_declared_once_per_command_and_max_steps_once_in_all():
    for command, groups in COMMANDS.items():
        flags = [d.flag.name for group in groups for d in declared(group)]
        assert len(flags) == len(set(flags)), command
    holders = [cls.__name__ for cls in (CapacityKnobs, GeneralizationKnobs, ExecutionKnobs, TrainingKnobs)
               if any(f.name == "max_steps" for f in fields(cls))]
    assert holders == ["TrainingKnobs"]


def test_values_by_name_become_the_typed_knobs_nested_groups_included():
    values = {d.name: d.default for group in COMMANDS["run-capacity"] for d in declared(group)}
    values.update(models="1x8", max_steps=40, lr=0.5, ensemble="off", preset_name="smoke")  # and one that is no knob
    knobs = from_values(CapacityKnobs, values)
    assert knobs == CapacityKnobs(models="1x8", training=TrainingKnobs(max_steps=40, lr=0.5))
    execution = from_values(ExecutionKnobs, values)
    assert execution == ExecutionKnobs(ensemble="off") and execution.progress
    with pytest.raises(KeyError):  # a knob click did not give: a declaration and its option out of step
        from_values(CapacityKnobs, {"models": None})


def test_defaults_are_none_but_the_execution_s():
    assert all(d.default is None for d in declared(CapacityKnobs) + declared(GeneralizationKnobs))
    defaults = {d.name: (d.default, d.flag.show_default) for d in declared(ExecutionKnobs)}
    assert defaults["ensemble"] == ("auto", True) and defaults["workers"] == ("auto", True)
    assert defaults["executor_name"] == ("local", True) and defaults["no_progress"] == (False, False)


def test_the_knobs_import_no_torch():
    code = "import sys; import memk.memorize.experiments.knobs; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], cwd=tempfile.gettempdir()).returncode == 0
