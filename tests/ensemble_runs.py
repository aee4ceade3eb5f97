"""What the ensemble tests share (test_ensemble.py, test_ensemble_executor.py, test_sweep.py): runs that
differ in everything a member owns, a workload that keeps each finished run's weights, each run trained
alone by train_to_saturation (float64, cached), and a progress that kills a run mid-way.

Not a test file: pyproject.toml's pytest settings put this folder on sys.path (pythonpath).
"""

import subprocess
import sys
import tempfile
from dataclasses import replace

import numpy as np
import pytest
import torch

from memk.memorize.data import uniform_random_sequences
from memk.memorize.model import GPTConfig
from memk.memorize.runtime import Backends
from memk.memorize.schedule import TrainConfig
from memk.memorize.runs.sweep import Run, SweepProgress
from memk.memorize.train import train_to_saturation, uniform_code_signal

CPU = torch.device("cpu")
MODEL = GPTConfig(1, 16, 2, 16, 8)
BACKENDS = Backends("sdpa", "fused")
TRAIN = TrainConfig(lr=1e-2, warmup_steps=5, batch_size=16, max_steps=60, cooldown_steps=10, min_steps=20,
                    eval_every=10, plateau_window=2, plateau_rel_tol=0.02)
# Members that differ in everything a member owns: dataset size (10 < batch: padded rows),
# seed, step cap and cool-down, learning rate, weight decay, gradient clip; one plateaus early.
RUNS = [
    Run("big", MODEL, 40, TRAIN, BACKENDS),
    Run("small", MODEL, 10, replace(TRAIN, seed=1, max_steps=30, cooldown_steps=5), BACKENDS),
    Run("decayed", MODEL, 24, replace(TRAIN, seed=2, lr=3e-2, weight_decay=0.1, grad_clip=0.5), BACKENDS),
    Run("tiny", MODEL, 3, replace(TRAIN, seed=3, lr=3e-2, min_steps=10), BACKENDS),
]
# Float64 results of the same code on the same machine differ only by the order of
# summations (bmm against mm, one norm over K members against K norms): 1e-16 relative
# per operation, grown by a few dozen optimizer steps.
PARAM_ATOL = 1e-9
BITS_RTOL = 1e-10


@pytest.fixture
def float64():
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # GPT and its init then build in float64, in both trainers
    yield
    torch.set_default_dtype(before)


class KeepingWorkload:
    """Uniform data; keeps each finished run's exported weights and outcome."""

    def __init__(self):
        self.models, self.outcomes = {}, {}

    def training_data(self, run):
        return uniform_random_sequences(run.n_sequences, run.model.vocab_size, run.model.seq_len, seed=run.train.seed)

    def stop_signal(self, run, data):
        return uniform_code_signal(data, run.train.precision)

    def result(self, run, model, outcome, data):
        self.models[run.name] = {k: v.clone() for k, v in model.state_dict().items()}
        self.outcomes[run.name] = outcome
        return {"run_id": run.run_id, "name": run.name, "memorized_bits": outcome.memorized_bits, "steps": outcome.steps}


def alone(run):
    """The run trained by train_to_saturation, as LocalExecutor trains it."""
    data = KeepingWorkload().training_data(run)
    model, outcome = train_to_saturation(run.model, data, run.train, CPU, attention_backend=run.backends.attention,
                                         logprob_backend=run.backends.logprob)
    return model.state_dict(), outcome


_alone_cache = {}


def alone_cached(run):
    # Float64 single-run results, shared by the tests of a session (they depend on the run only).
    if run.run_id not in _alone_cache:
        _alone_cache[run.run_id] = alone(run)
    return _alone_cache[run.run_id]


def assert_same_as_alone(workload, runs):
    for run in runs:
        weights, outcome = alone_cached(run)
        got = workload.outcomes[run.name]
        assert (got.steps, got.stop_reason) == (outcome.steps, outcome.stop_reason), run.name
        assert [s for s, _ in got.curve] == [s for s, _ in outcome.curve], run.name
        np.testing.assert_allclose([b for _, b in got.curve], [b for _, b in outcome.curve], rtol=BITS_RTOL, err_msg=run.name)
        assert got.final_loss == pytest.approx(outcome.final_loss, rel=BITS_RTOL)
        for name, w in weights.items():
            torch.testing.assert_close(workload.models[run.name][name], w, rtol=0, atol=PARAM_ATOL, msg=f"{run.name} {name}")


def quiet(total=0):
    return SweepProgress(total, 0, "test", enabled=False)


class Killed(Exception):
    pass


class KillingProgress(SweepProgress):
    """Raises Killed when a given run reaches a given step, as a kill -9 would stop the process there."""

    def __init__(self, run_name, step):
        super().__init__(0, 0, "test", enabled=False)
        self.run_name, self.step = run_name, step

    def run_started(self, run):
        _, close = super().run_started(run)

        def on_step(p):
            if run.name == self.run_name and p["step"] == self.step:
                raise Killed

        return on_step, close


# The command line, as a user runs it
MEMK = [sys.executable, "-m", "memk.cli"]
OUTSIDE = tempfile.gettempdir()  # `python -m` puts the working directory on sys.path


def memk(*args):
    return subprocess.run([*MEMK, *args], capture_output=True, text=True, timeout=600, cwd=OUTSIDE)
