"""The sweep layer: a Run's id and pickling, and the local executor training runs into a store."""

import math
import pickle
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from memk.memorize.data import uniform_random_sequences
from memk.memorize.model import GPTConfig
from memk.memorize.runtime import Backends, cpu_threads_pinned
from memk.memorize.schedule import TrainConfig
from memk.memorize.runs.store import RunStore
from memk.memorize.runs.sweep import LocalExecutor, Run, SweepProgress, train_run
from memk.memorize.train import train_to_saturation, uniform_code_signal

sys.path.append(str(Path(__file__).parent))  # for ensemble_runs.py: pytest's importlib mode puts no test folder on sys.path
from ensemble_runs import CPU, RUNS, KeepingWorkload, Killed, KillingProgress, quiet  # noqa: E402

MODEL = GPTConfig(1, 8, 1, 16, 8)
TRAIN = TrainConfig(lr=1e-2, warmup_steps=2, batch_size=8, max_steps=20, cooldown_steps=4, min_steps=10, eval_every=5)
BACKENDS = Backends("sdpa", "reference")


def run(n=12, **changes):
    return replace(Run("tiny", MODEL, n, TRAIN, BACKENDS, role="capacity"), **changes)


def test_the_id_follows_what_shapes_the_result_and_only_that():
    base = run()
    assert base.run_id.startswith("tiny-") and base.run_id == run().run_id
    for changed in (run(n=13), run(model=GPTConfig(1, 8, 2, 16, 8)), run(train=replace(TRAIN, seed=1)),
                    run(train=replace(TRAIN, lr=2e-2)), run(context=("reference-1",)),
                    run(backends=Backends("sdpa", "fused")), run(backends=Backends("reference", "reference"))):
        assert changed.run_id != base.run_id
    assert run(size_factor=0.5).run_id == base.run_id  # a label of the size, not the size


def test_a_run_pickles_to_an_equal_run():
    r = run(context=("ref", 64), size_factor=2.0)
    back = pickle.loads(pickle.dumps(r))
    assert back == r and back.run_id == r.run_id


class CountingWorkload:
    """Uniform data; counts what the executor asks for."""

    def __init__(self):
        self.trained = []

    def training_data(self, r):
        return uniform_random_sequences(r.n_sequences, r.model.vocab_size, r.model.seq_len, seed=r.train.seed)

    def stop_signal(self, r, data):
        return uniform_code_signal(data, r.train.precision)

    def result(self, r, model, outcome, data):
        self.trained.append(r.run_id)
        return {"run_id": r.run_id, "memorized_bits": outcome.memorized_bits, "steps": outcome.steps}


def test_the_local_executor_trains_what_is_left_and_records_each_row(tmp_path):
    runs = [run(n=6), run(n=12), run(n=24)]
    workload = CountingWorkload()
    with RunStore(tmp_path, "capacity") as store:
        LocalExecutor(torch.device("cpu")).execute(runs[:1], workload, store, SweepProgress(3, 0, "t", enabled=False))
    with RunStore(tmp_path, "capacity") as store:
        todo = store.todo(runs)
        LocalExecutor(torch.device("cpu")).execute(todo, workload, store, SweepProgress(3, 1, "t", enabled=False))
        rows = store.rows_of(runs)
    assert workload.trained == [r.run_id for r in runs]  # each run trained once
    assert [r["run_id"] for r in rows] == [r.run_id for r in runs]
    assert all(r["device"] == "cpu" and r["logprob_backend"] == "reference" for r in rows)
    assert not list((tmp_path / "checkpoints").glob("*.pt"))
    # The row is what training the run by hand gives.
    data = CountingWorkload().training_data(runs[1])
    with cpu_threads_pinned(rows[1]["torch_threads"]):  # float32 rounding depends on the thread count
        _, outcome = train_to_saturation(MODEL, data, TRAIN, torch.device("cpu"), attention_backend="sdpa",
                                         logprob_backend="reference")
    assert rows[1]["memorized_bits"] == pytest.approx(outcome.memorized_bits, rel=1e-9)
    assert rows[1]["steps"] == outcome.steps


def test_train_run_continues_a_run_from_its_checkpoint(tmp_path):
    r = run(n=12)
    straight = train_run(r, CountingWorkload(), torch.device("cpu"), None)

    class Killed(Exception):
        pass

    def kill_at_12(p):
        if p["step"] == 12:
            raise Killed

    checkpoint = tmp_path / "run.pt"
    with pytest.raises(Killed):
        train_run(r, CountingWorkload(), torch.device("cpu"), checkpoint, on_progress=kill_at_12)
    assert torch.load(checkpoint, weights_only=False)["step"] == 10
    resumed = train_run(r, CountingWorkload(), torch.device("cpu"), checkpoint)
    assert resumed["steps"] == straight["steps"]
    assert math.isclose(resumed["memorized_bits"], straight["memorized_bits"], rel_tol=1e-6)


def test_runs_side_by_side_give_exactly_the_rows_of_runs_one_at_a_time(tmp_path, monkeypatch):
    # Every run on one thread either way (the tiny model's policy, pinned here): the same
    # arithmetic in the same order, so the same bits to the last digit, and the same init
    # although the runs seed torch's global generator from two threads at once.
    monkeypatch.setenv("MEMK_NUM_THREADS", "1")
    runs = [run(n=6), run(n=12, train=replace(TRAIN, seed=1)), run(n=24, train=replace(TRAIN, seed=2)),
            run(n=9, model=GPTConfig(1, 16, 2, 16, 8))]
    rows = {}
    for workers in (1, 2):
        with RunStore(tmp_path / str(workers), "capacity") as store:
            LocalExecutor(torch.device("cpu"), workers).execute(runs, CountingWorkload(), store,
                                                                SweepProgress(4, 0, "t", enabled=False))
            rows[workers] = store.rows_of(runs)
    assert [r["run_id"] for r in rows[2]] == [r.run_id for r in runs]  # plan order, whichever finished first
    untimed = lambda rows: [{k: v for k, v in r.items() if k != "finished_at"} for r in rows]  # noqa: E731
    assert untimed(rows[2]) == untimed(rows[1])


def test_ctrl_c_side_by_side_keeps_finished_rows_and_a_rerun_ends_as_an_uninterrupted_sweep(tmp_path, sigint_raises):
    import os
    import signal
    import time

    runs = [run(n=6), run(n=12, train=replace(TRAIN, seed=1)), run(n=24, train=replace(TRAIN, seed=2))]

    class CtrlCAt(SweepProgress):
        """Ctrl-C (KeyboardInterrupt in the main thread) when the n=24 run reaches step 12."""

        def run_started(self, r):
            on_step, close = super().run_started(r)

            def step(p):
                if r.n_sequences == 24 and p["step"] == 12:
                    os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: the main thread takes it (workers block it)
                    time.sleep(1.0)  # the main thread notices within its 0.2 s waits and stops the workers
                on_step(p)

            return step, close

    cpu = torch.device("cpu")
    with RunStore(tmp_path / "straight", "capacity") as store:
        LocalExecutor(cpu, 2).execute(runs, CountingWorkload(), store, SweepProgress(3, 0, "t", enabled=False))
        straight = store.rows_of(runs)
    with RunStore(tmp_path / "cut", "capacity") as store:
        with pytest.raises(KeyboardInterrupt):
            LocalExecutor(cpu, 2).execute(runs, CountingWorkload(), store, CtrlCAt(3, 0, "t", enabled=False))
        kept = list(store.rows)
    assert runs[2].run_id not in [r["run_id"] for r in kept]  # stopped mid-run: its checkpoint holds step 10
    assert torch.load(tmp_path / "cut" / "checkpoints" / f"{runs[2].run_id}.pt", weights_only=False)["step"] == 10
    with RunStore(tmp_path / "cut", "capacity") as store:
        todo = store.todo(runs)
        assert len(todo) == len(runs) - len(kept)
        LocalExecutor(cpu, 2).execute(todo, CountingWorkload(), store, SweepProgress(3, 0, "t", enabled=False))
        resumed = store.rows_of(runs)
    assert [r for r in resumed if r in kept] == kept  # finished rows kept as they were
    for a, b in zip(resumed, straight):
        assert (a["run_id"], a["steps"]) == (b["run_id"], b["steps"])
        assert math.isclose(a["memorized_bits"], b["memorized_bits"], rel_tol=1e-6)


def test_a_run_resumes_on_the_threads_it_started_with(tmp_path, monkeypatch):
    # Side by side, runs train on one thread each; a rerun with one run left would give it every core
    # (here: the policy made to say 2). Float32 rounding depends on the thread count: it keeps 1.
    import memk.memorize.runtime as runtime

    runs = RUNS[:2]
    killed = KeepingWorkload()
    with RunStore(tmp_path, "capacity") as store:
        with pytest.raises(Killed):
            LocalExecutor(CPU, workers=2).execute(runs, killed, store, KillingProgress("big", 55))
    monkeypatch.setattr(runtime, "ONE_THREAD_BELOW_FLOPS", 0.0)
    monkeypatch.setattr(runtime, "cpu_cores", lambda: 2)
    monkeypatch.delenv("MEMK_NUM_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    with RunStore(tmp_path, "capacity") as store:
        todo = store.todo(runs)  # "big", and "small" where the kill stopped it first
        assert "big" in [r.name for r in todo]
        LocalExecutor(CPU, workers="auto").execute(todo, killed, store, quiet(len(runs)))
        row = store.row_of(runs[0])
    assert row["torch_threads"] == 1
    whole = KeepingWorkload()
    with RunStore(tmp_path / "whole", "capacity") as store:
        with runtime.cpu_threads_pinned(1):
            LocalExecutor(CPU).execute(runs[:1], whole, store, quiet(1))
    assert all(torch.equal(killed.models["big"][k], w) for k, w in whole.models["big"].items())
