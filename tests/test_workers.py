"""--workers: jobs side by side on threads of this process, each on one torch thread.

What must hold: jobs really overlap (a barrier only two concurrent jobs can pass), the
costliest start first, each trains on one thread and torch's count comes back after; a
failing job or Ctrl-C stops the others at their next step and is raised; the option's
bad values and conflicts are named. That runs side by side give the rows of runs trained
one at a time is checked in test_sweep.py (local executor) and test_ensemble_executor.py (ensembles);
which executor --workers gives with --executor, in test_launchers.py.
"""

import os
import signal
import threading
import time
from dataclasses import replace

import pytest
import torch

from memk.memorize.runs import workers as workers_module
from memk.memorize.errors import ConfigError
from memk.memorize.model import GPTConfig
from memk.memorize.runtime import Backends
from memk.memorize.schedule import TrainConfig
from memk.memorize.runs.sweep import Run, SweepProgress, training_flops
from memk.memorize.runs.workers import Job, Stopped, parse_workers, run_jobs, workers_for

CPU = torch.device("cpu")
TRAIN = TrainConfig(batch_size=64, max_steps=100)
TINY = Run("tiny", GPTConfig(1, 8, 1, 16, 8), 10, TRAIN, Backends("sdpa", "reference"))
LARGE = Run("large", GPTConfig(4, 512, 8, 2048, 64), 10, TRAIN, Backends("sdpa", "reference"))  # all cores by policy
WAIT_S = 20  # the longest a test job waits for another before it counts as a failure


@pytest.fixture
def no_pinned_threads(monkeypatch):
    for name in ("MEMK_NUM_THREADS", "OMP_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("text, expected", [("auto", "auto"), ("AUTO", "auto"), ("1", 1), (" 3 ", 3),
                                            ("\uff13", 3)])  # a full-width 3: a decimal digit, as int() reads it
def test_the_workers_option_reads_auto_or_a_count(text, expected):
    assert parse_workers(text) == expected


@pytest.mark.parametrize("text", ["0", "-1", "two", "1.5", "", "\u00b2", "2\u00b2", "\u2460", "1" * 5000])
def test_a_bad_workers_option_names_the_problem_and_the_fix(text):
    # "\u00b2" (superscript two) and "\u2460" (circled one) are digits to str.isdigit but not numbers to int();
    # 5,000 digits are more than int() converts: a ConfigError (one line from the CLI), never a ValueError.
    with pytest.raises(ConfigError, match="--workers must be auto or a whole number >= 1.*e.g. --workers 2"):
        parse_workers(text)


def test_auto_takes_a_worker_per_core_where_runs_take_one_thread_or_keep_every_core_busy(
        monkeypatch, no_pinned_threads):
    monkeypatch.setattr(workers_module, "cpu_cores", lambda: 4)
    assert workers_for("auto", CPU, [TINY, TINY], training_flops) == 4  # one thread a run anyway
    assert workers_for("auto", CPU, [TINY, LARGE], training_flops) == 1  # the large run would train alone on one
    assert workers_for("auto", CPU, [LARGE] * 4, training_flops) == 4  # four alike keep four cores busy
    assert workers_for("auto", CPU, [LARGE] * 3 + [TINY], training_flops) == 1  # ... three do not
    assert workers_for("auto", torch.device("cuda"), [TINY], training_flops) == 1  # runs share a GPU through --ensemble
    monkeypatch.setattr(workers_module, "cpu_cores", lambda: 2)
    assert workers_for("auto", CPU, [LARGE, LARGE, TINY], training_flops) == 2
    monkeypatch.setenv("MEMK_NUM_THREADS", "2")
    assert workers_for("auto", CPU, [TINY, TINY], training_flops) == 1  # the user asked for two threads a run
    monkeypatch.setenv("MEMK_NUM_THREADS", "1")
    assert workers_for("auto", CPU, [TINY, LARGE], training_flops) == 2  # ... or for one, whatever the size
    assert workers_for(3, CPU, [LARGE], training_flops) == 3  # a number is taken as given


def test_auto_balances_by_the_cost_it_is_given(monkeypatch, no_pinned_threads):
    monkeypatch.setattr(workers_module, "cpu_cores", lambda: 2)
    costs = {"a": 3.0, "b": 1.0, "c": 2.0}
    runs = [replace(LARGE, name=name) for name in costs]
    assert workers_for("auto", CPU, runs, lambda run: costs[run.name]) == 2  # 3 of 6: half
    costs["a"] = 3.1
    assert workers_for("auto", CPU, runs, lambda run: costs[run.name]) == 1  # over half: a core would wait


def test_workers_that_cannot_be_honoured_are_named(monkeypatch, no_pinned_threads):
    with pytest.raises(ConfigError, match="--workers 2 is for the CPU"):
        workers_for(2, torch.device("cuda"), [TINY], training_flops)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    with pytest.raises(ConfigError, match="MEMK_NUM_THREADS or OMP_NUM_THREADS asks for 2; unset it"):
        workers_for(2, CPU, [TINY], training_flops)


def quiet():
    return SweepProgress(0, 0, "test", enabled=False)


def test_jobs_run_side_by_side_costliest_first_each_on_one_thread():
    both_running = threading.Barrier(2, timeout=WAIT_S)  # passes only if two jobs run at once
    started, threads = [], {}
    before = torch.get_num_threads()

    def job(name, cost, wait):
        def train(progress):
            started.append(name)
            threads[name] = torch.get_num_threads()
            if wait:
                both_running.wait()
        return Job(name, cost, train)

    run_jobs([job("cheap", 1.0, False), job("costly", 3.0, True), job("middle", 2.0, True)], 2, quiet())
    assert set(started[:2]) == {"costly", "middle"} and started[2] == "cheap"
    assert threads == {"cheap": 1, "costly": 1, "middle": 1}
    assert torch.get_num_threads() == before


def test_one_worker_trains_the_jobs_in_their_order_in_this_thread():
    seen = []
    jobs = [Job(name, cost, lambda progress, name=name: seen.append((name, threading.current_thread())))
            for name, cost in (("a", 1.0), ("b", 3.0), ("c", 2.0))]
    run_jobs(jobs, 1, quiet())
    assert seen == [(name, threading.main_thread()) for name in "abc"]


def steps_until_stopped(progress, stopped: list, name: str) -> None:
    """A job's training loop: a step callback every few ms until the executor stops it."""
    on_step, close = progress.run_started(TINY)
    deadline = time.monotonic() + WAIT_S
    try:
        while time.monotonic() < deadline:
            on_step({"step": 1, "loss": 1.0, "bits": 0.0})
            time.sleep(0.005)
    except Stopped:
        stopped.append(name)
        raise
    finally:
        close()


def test_a_failing_job_stops_the_others_at_their_next_step_and_its_error_is_raised():
    stopped, other_running = [], threading.Event()

    def other(progress):
        other_running.set()
        steps_until_stopped(progress, stopped, "other")

    def failing(progress):
        assert other_running.wait(WAIT_S)
        raise ValueError("diverged")

    t = time.monotonic()
    with pytest.raises(ValueError, match="diverged"):
        run_jobs([Job("other", 2.0, other), Job("failing", 1.0, failing), Job("never", 0.5, lambda p: stopped.append("ran"))],
                 2, quiet())
    assert stopped == ["other"] and time.monotonic() - t < WAIT_S  # stopped, not run to its end; the third never started


def test_ctrl_c_stops_every_job_and_is_raised(sigint_raises):
    stopped, running = [], threading.Barrier(2, timeout=WAIT_S)

    def interrupting(progress):
        running.wait()
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C; the workers block SIGINT, so the main thread takes it
        steps_until_stopped(progress, stopped, "interrupting")

    def other(progress):
        running.wait()
        steps_until_stopped(progress, stopped, "other")

    with pytest.raises(KeyboardInterrupt):
        run_jobs([Job("interrupting", 1.0, interrupting), Job("other", 1.0, other)], 2, quiet())
    assert sorted(stopped) == ["interrupting", "other"]
    assert [t for t in threading.enumerate() if t.name.startswith("memk-worker")] == []  # none left running


def test_the_dry_run_schedules_jobs_as_the_workers_take_them():
    from memk.memorize.experiments.dry_run import jobs_wall_seconds, wall_seconds

    jobs = [(1.0, 5.0), (3.0, 10.0), (2.0, 6.0)]  # (cost, seconds)
    assert jobs_wall_seconds(jobs, 1) == 21.0
    assert jobs_wall_seconds(jobs, 2) == 11.0  # 10 | 6 then 5
    assert jobs_wall_seconds(jobs, 5) == 10.0
    # One group in 2 slots: runs of 100, 50 and 50 steps; a step costs 1 s alone, 1.5 s for two.
    # Steps 0-50: two members (75 s); 50-100: two members (75 s); nothing after.
    assert wall_seconds([100, 50, 50], 2, 1.0, 1.5) == 150.0
    assert wall_seconds([100, 50], 1, 1.0, 1.0) == 150.0


@pytest.mark.slow
def test_the_wall_clock_script_runs_the_four_ways_and_side_by_side_keeps_the_rows(tmp_path):
    import json
    import subprocess
    import sys
    import tempfile

    out = tmp_path / "wall.json"
    done = subprocess.run([sys.executable, "-m", "memk.bench.preset_wall", "--smoke", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=tempfile.gettempdir())
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert list(report["runs"]) == ["one at a time", "ensembles", "side by side", "default"]
    assert report["same_rows_as_one_at_a_time"]["side by side"] is True  # one thread a run either way
    assert "--workers 1" in report["runs"]["one at a time"]["command"]
