"""The launcher (memorize/runs/launchers.py): which executor each combination of --executor, --ensemble,
--workers and Ray's options gives, and each combination that cannot apply a ConfigError (one line and
exit status 2 from the command)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from memk.memorize.errors import ConfigError
from memk.memorize.runs import launchers
from memk.memorize.runs.ensemble_executor import EnsembleExecutor
from memk.memorize.runs.launchers import executor_for, executor_from_options
from memk.memorize.runs.packing import EnsembleChoice, read_ensemble
from memk.memorize.runs.sweep import LocalExecutor

sys.path.append(str(Path(__file__).parent))  # for ensemble_runs.py: pytest's importlib mode puts no test folder on sys.path
from ensemble_runs import MEMK, OUTSIDE, memk  # noqa: E402

CPU = torch.device("cpu")


@pytest.fixture
def no_pinned_threads(monkeypatch):
    for name in ("MEMK_NUM_THREADS", "OMP_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("ensemble, workers, expected", [
    ("off", 1, LocalExecutor(CPU, 1)),
    ("off", "auto", LocalExecutor(CPU, "auto")),
    ("auto", 2, EnsembleExecutor(CPU, choose_faster=True, workers=2)),
    ("4", "auto", EnsembleExecutor(CPU, max_members=4, workers="auto")),
    (1, 1, EnsembleExecutor(CPU, max_members=1, workers=1)),  # K = 1: still the ensemble executor's packing
    (EnsembleChoice(max_members=3), 2, EnsembleExecutor(CPU, max_members=3, workers=2)),  # read already
])
def test_local_gives_the_local_executor_for_off_and_the_ensemble_executor_else(no_pinned_threads, ensemble, workers,
                                                                               expected):
    assert executor_from_options("local", CPU, ensemble, workers=workers) == expected
    assert executor_for(ensemble, CPU, workers) == expected


def test_the_ensemble_executor_packs_as_the_choice_reads():
    for option in ("auto", "4"):
        assert executor_for(option, CPU).packer.choice == read_ensemble(option)


@pytest.mark.parametrize("ensemble, cpus_per_task, expected_cpus", [("off", None, 1), ("2", 3, 3),
                                                                    (EnsembleChoice(choose_faster=True), None, 1)])
def test_ray_gives_the_ray_executor_with_the_choice_read_and_one_cpu_a_task_by_default(monkeypatch, ensemble,
                                                                                    cpus_per_task, expected_cpus):
    calls = []
    monkeypatch.setattr(launchers, "ray_executor", lambda *args: calls.append(args) or "ray")
    assert executor_from_options("ray", CPU, ensemble, "auto", None, cpus_per_task) == "ray"
    assert calls == [(CPU, "auto", None, expected_cpus, read_ensemble(ensemble))]


@pytest.mark.parametrize("options, message", [
    ({"ray_address": "auto"}, "--ray-address is for --executor ray; add --executor ray or leave it out"),
    ({"gpus_per_task": 0.5, "cpus_per_task": 2}, "--gpus-per-task, --cpus-per-task is for --executor ray"),
])
def test_ray_options_with_the_local_executor_are_named(options, message):
    with pytest.raises(ConfigError, match=message):
        executor_from_options("local", CPU, "off", **options)


def test_workers_that_cannot_be_honoured_are_named_before_anything_is_built(monkeypatch, no_pinned_threads):
    with pytest.raises(ConfigError, match="--workers 2 is for the CPU"):
        executor_from_options("local", torch.device("cuda"), "auto", workers=2)
    monkeypatch.setenv("MEMK_NUM_THREADS", "2")
    with pytest.raises(ConfigError, match="asks for 2; unset it, or use --workers 1"):
        executor_from_options("local", CPU, "off", workers=2)


def test_workers_with_ray_is_named(no_pinned_threads):
    with pytest.raises(ConfigError, match="--workers is for --executor local"):  # before Ray is imported
        executor_from_options("ray", CPU, "off", workers=2)


def test_a_bad_ensemble_value_is_named():
    with pytest.raises(ConfigError, match="--ensemble must be auto, off or a whole number of members >= 1, got 'lots'"):
        executor_from_options("local", CPU, "lots", workers=1)


# ---------------------------------------------------------------------------------------
# The command line, as a user runs it


@pytest.mark.parametrize("command, value", [("run-capacity", "0"), ("run-generalization", "many")])
def test_a_bad_ensemble_value_is_one_line_and_exit_2(tmp_path, command, value):
    result = memk(command, "--preset", "smoke", "--out", str(tmp_path), "--ensemble", value)
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert "--ensemble must be auto, off or a whole number of members" in lines[0]
    assert not (tmp_path / "runs.jsonl").exists()


@pytest.mark.parametrize("command", ["run-capacity", "run-generalization"])
@pytest.mark.parametrize("value, env, message", [
    ("0", {}, "--workers must be auto or a whole number >= 1"),
    ("2", {"MEMK_NUM_THREADS": "2"}, "asks for 2; unset it, or use --workers 1"),
])
def test_a_bad_workers_value_is_one_line_and_exit_2_before_anything_is_written(tmp_path, command, value, env,
                                                                               message):
    out = tmp_path / "out"
    result = subprocess.run([*MEMK, command, "--preset", "smoke", "--out", str(out), "--workers", value],
                            capture_output=True, text=True, timeout=600, cwd=OUTSIDE, env={**os.environ, **env})
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]
    assert not out.exists()
