"""One home for sweeps: a run, what an experiment supplies for its runs, and the executor
that trains them.

An experiment is a plan of runs. It describes each run as a `Run` (plain and picklable,
its id derived from the description alone), asks its run store (memorize/runs/store.py)
which runs are still to do, hands those to an executor with its `Workload`, and
summarizes the rows the store then holds. Where and how runs execute is the executor's
business: `LocalExecutor` trains them in this process, one at a time or, on the CPU,
several side by side (`--workers`, memorize/runs/workers.py); other executors
(an ensemble of same-shape runs, Ray workers) take the same runs and workload and
return the same rows, one per run, through `train_run`'s contract (memorize/runs/ray_executor.py
trains them as tasks of a Ray cluster).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch

from ..errors import ConfigError
from ..model import GPT, GPTConfig, training_flops_per_sequence
from ..outputs import content_digest
from ..runtime import Backends, cpu_threads_for, progress_bar, step_progress, use_cpu_threads
from ..schedule import RunOutcome, TrainConfig
from .store import JobStore, RunStore, provenance
from ..train import StopSignal, train_to_saturation
from .workers import Job, run_jobs, workers_for


@dataclass(frozen=True)
class Run:
    """Everything that shapes one training run's result."""

    name: str  # the readable part of the id
    model: GPTConfig
    n_sequences: int  # the dataset: which sequences is the workload's to say (a seeded stream, a pool's prefix)
    train: TrainConfig  # the schedule, with its precision and seed
    backends: Backends
    role: str = "sweep"  # which part of the experiment's plan ("capacity", "sweep", "check")
    size_factor: float | None = None  # n_sequences as a multiple of capacity, where planned so
    context: tuple = ()  # what else shapes the result, e.g. the reference model's id and the attack size

    @property
    def run_id(self) -> str:
        backends = {"attention": self.backends.attention, "logprob": self.backends.logprob}
        digest = content_digest([self.model.to_dict(), self.n_sequences, self.train.to_dict(), *self._context, backends])
        return f"{self.name}-{digest}"

    @property
    def legacy_run_id(self) -> str:
        """The id memk gave this run before the backends were part of it (rows of such folders
        still count where they record the same backends)."""
        return f"{self.name}-{content_digest([self.model.to_dict(), self.n_sequences, self.train.to_dict(), *self._context])}"

    @property
    def _context(self) -> tuple:
        # Until 2026-12 "bfloat16" named autocast over float32 weights: a folder's rows of then must
        # not pass for runs with bfloat16 weights, so those runs' ids say so.
        return (*self.context, "bfloat16 weights") if self.train.precision == "bfloat16" else self.context

    @property
    def label(self) -> str:
        """What a progress bar shows of the run."""
        return f"{self.model.name} N={self.n_sequences} {self.train.precision}"


class Workload(Protocol):
    """What an experiment supplies for its runs; an executor may pickle it to train runs elsewhere."""

    def training_data(self, run: Run) -> torch.Tensor:
        """The run's training sequences, (n_sequences, S) int64."""

    def stop_signal(self, run: Run, data: torch.Tensor) -> StopSignal:
        """What the training loop measures at each evaluation to decide when to stop."""

    def result(self, run: Run, model: GPT, outcome: RunOutcome, data: torch.Tensor) -> dict:
        """The run's row, less the provenance the store adds."""


def train_run(
    run: Run, workload: Workload, device: torch.device, checkpoint: Path | None,
    on_progress: Callable[[dict], None] | None = None,
) -> dict:
    """Train one run (or continue it from its checkpoint) and return its row."""
    use_cpu_threads(device, run.model, run.train.batch_size)
    data = workload.training_data(run).to(device)
    model, outcome = train_to_saturation(
        run.model, data, run.train, device,
        checkpoint_path=checkpoint,
        attention_backend=run.backends.attention,
        logprob_backend=run.backends.logprob,
        on_progress=on_progress,
        stop_signal=workload.stop_signal(run, data),
    )
    return {**workload.result(run, model, outcome, data), **provenance(run.backends, device)}


class SweepProgress:
    """One bar for the sweep (planned runs, finished ones counted in) and one per run's steps."""

    def __init__(self, total: int, done: int, desc: str, enabled: bool):
        self.enabled = enabled
        # In a log (stderr no terminal) the sweep writes a line as each run finishes, a run's steps every half minute.
        self.bar = progress_bar(total=total, initial=done, desc=desc, unit="run", each_update=True, disable=not enabled)

    def run_started(self, run: Run) -> tuple[Callable[[dict], None], Callable[[], None]]:
        """The run's step callback for the training loop, and what closes its bar."""
        self.bar.set_postfix_str(f"{run.role} {run.label}")
        steps = progress_bar(total=run.train.max_steps, desc=f"  {run.label}", unit="step", leave=False,
                             disable=not self.enabled)
        return step_progress(steps, run.train.max_steps), steps.close

    def run_finished(self) -> None:
        self.bar.update(1)

    def show(self, status: str) -> None:
        """A status beside the bar, for executors whose runs train elsewhere (e.g. the runs in flight)."""
        self.bar.set_postfix_str(status)

    def close(self) -> None:
        self.bar.close()


class Executor(Protocol):
    def execute(self, runs: list[Run], workload: Workload, store: RunStore, progress: SweepProgress) -> None:
        """Train every run; store.record(row) for each as it finishes."""


def batch_rows(run: Run) -> int:
    """Sequences in each of the run's batches: all of them where the dataset is smaller than a batch."""
    return min(run.n_sequences, run.train.batch_size)


def training_flops(run: Run) -> float:
    """The FLOPs of a run's training steps at its step cap: what orders jobs, costliest first."""
    return training_flops_per_sequence(run.model) * batch_rows(run) * run.train.max_steps


def run_job(run: Run, workload: Workload, store: JobStore, device: torch.device, threads: int | None = None) -> Job:
    """One run, trained alone, as a job (on `threads` CPU threads where given): its row recorded as it finishes."""
    def train(progress: SweepProgress) -> None:
        on_step, close_bar = progress.run_started(run)
        try:
            row = train_run(run, workload, device, store.checkpoint_path(run.run_id), on_step)
        finally:
            close_bar()
        store.record(row)
        progress.run_finished()

    return Job(run.label, training_flops(run), train, threads)


@dataclass
class LocalExecutor:
    """The runs in this process: one at a time, or `workers` at once on the CPU (memorize/runs/workers.py)."""

    device: torch.device
    workers: str | int = 1  # auto or a number (memorize/runs/workers.py)

    def execute(self, runs: list[Run], workload: Workload, store: RunStore, progress: SweepProgress) -> None:
        workers = workers_for(self.workers, self.device, runs, training_flops)
        recorded = store.packing()
        threads = {run.run_id: resumed_threads(recorded.get(run.run_id)) or alone_threads(run, self.device, workers)
                   for run in runs}
        store.record_packing({r.run_id: {"job": r.run_id, "slots": 1, "threads": threads[r.run_id]} for r in runs})
        run_jobs([run_job(run, workload, store, self.device, threads[run.run_id]) for run in runs], workers, progress)


def alone_threads(run: Run, device: torch.device, workers: int) -> int | None:
    """The CPU threads a run trained alone takes: one side by side, else the policy's for its size (None off the CPU)."""
    if device.type != "cpu":
        return None
    return 1 if workers > 1 else cpu_threads_for(run.model, run.train.batch_size)


def resumed_threads(entry: dict | None) -> int | None:
    """The threads a run recorded alone in the packing (RunStore.packing) started with: float32 rounding
    depends on them, so it resumes on as many; None where it trained in an ensemble or nothing is recorded."""
    if isinstance(entry, dict) and entry.get("slots") == 1 and isinstance(entry.get("threads"), int):
        return entry["threads"]
    return None


def require_rows(rows: list[dict], failures: list[dict]) -> None:
    """A ConfigError where every run failed (an executor that goes on past failures): nothing to summarize."""
    if failures and not rows:
        raise ConfigError(f"all {len(failures)} runs failed after retries (the first: {failures[0]['error']}); "
                          "failures.json lists them; fix the cause and run the same command again")
