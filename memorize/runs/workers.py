"""Several jobs training at once in this process, on the CPU: `--workers`.

A job is what an executor trains in one go: a run (LocalExecutor) or an ensemble of runs
(EnsembleExecutor). A training step of the small models of memk's presets is a few
hundred operations each too short to split across cores: a second torch thread gains
about 1.2x there, while two runs side by side on one thread each keep both cores busy
(1.7x, bench/results/ray-vs-local-2core.json; 1.4x for the generalization preset's
V-2048 runs, which memk's policy gives two threads alone,
bench/results/generalization-default-wall-2core.json). So `run_jobs` trains up to `workers` jobs
at once on Python threads of this process, torch pinned to one thread each (its
operations release the GIL). One-thread jobs cannot make the other core's OpenMP threads
spin, so a busy machine slows them down and no more.

What makes jobs safe side by side: RunStore records rows under a lock; a run's first
weights come from train.seeded_gpt, which holds the lock of torch's global generator;
grad mode and autocast are per thread in torch; everything else a job touches is its
own. A job that fails, or Ctrl-C, stops the others at their next training step (their
checkpoints keep what they did up to their last evaluation) and the error is raised.
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import ConfigError
from ..runtime import cpu_cores, cpu_threads_for, cpu_threads_pinned, pinned_cpu_threads


def parse_workers(value: str) -> str | int:
    """'auto' or a number of workers >= 1; anything else is a ConfigError."""
    text = str(value).strip().lower()
    if text == "auto":
        return text
    try:
        # isdecimal, not isdigit: superscripts and circled digits ("²", "①") are digits to isdigit
        # but no number to int(); and int() refuses more than 4,300 digits.
        count = int(text) if text.isdecimal() else 0
    except ValueError:
        count = 0
    if count < 1:
        raise ConfigError(f"--workers must be auto or a whole number >= 1, got {value!r}; e.g. --workers 2, "
                          "or --workers 1 to train one job at a time")
    return count


def workers_for(choice: str | int, device: torch.device, runs: list, cost: Callable[[object], float]) -> int:
    """How many jobs train at once. auto: on the CPU, one per core where every run trains on one
    thread anyway (memk's thread policy for small steps, or MEMK_NUM_THREADS=1), or where the runs
    keep every core busy: none holds more than 1/cores of their `cost` (training FLOPs), so no core
    waits long on a last run that trains alone; one otherwise, and on CUDA."""
    check_workers(choice, device)
    if choice != "auto":
        return choice
    pinned = pinned_cpu_threads()
    if device.type != "cpu" or (pinned or 1) > 1 or not runs:
        return 1
    cores = cpu_cores()
    if all(cpu_threads_for(run.model, run.train.batch_size) == 1 for run in runs):
        return cores
    costs = [cost(run) for run in runs]
    return cores if max(costs) * cores <= sum(costs) else 1


def check_workers(choice: str | int, device: torch.device) -> None:
    """A ConfigError where a number of workers cannot be honoured here (checked before anything is written)."""
    if choice == "auto":
        return
    pinned = pinned_cpu_threads()
    if choice > 1 and device.type != "cpu":
        raise ConfigError(f"--workers {choice} is for the CPU: on {device.type} runs share the device through "
                          "--ensemble; leave --workers out")
    if choice > 1 and pinned is not None and pinned > 1:
        raise ConfigError(f"--workers {choice} trains each job on one thread, but MEMK_NUM_THREADS or "
                          f"OMP_NUM_THREADS asks for {pinned}; unset it, or use --workers 1")


@dataclass
class Job:
    """Work an executor hands over: `train(progress)` trains it and records its rows in the store."""

    label: str
    cost: float  # an estimate of its work (training FLOPs at the step caps): the costliest start first
    train: Callable[[object], None]
    # The torch threads it trains with on the CPU (None: the thread policy's count for its size, or one
    # side by side). A resumed job keeps the count it started with: threads change float32 rounding.
    threads: int | None = None


class Stopped(Exception):
    """Raised in a job's training loop (through its step callback) when another job failed or Ctrl-C came."""


class StoppableProgress:
    """A SweepProgress (memorize/runs/sweep.py) shared by the workers: calls under one lock, and each
    run's step callback raises Stopped once `stop` is set."""

    def __init__(self, progress, stop: threading.Event):
        self.progress, self.stop, self.lock = progress, stop, threading.Lock()

    def run_started(self, run):
        with self.lock:
            on_step, close_bar = self.progress.run_started(run)

        def step(p: dict) -> None:
            if self.stop.is_set():
                raise Stopped()
            with self.lock:
                on_step(p)

        def close() -> None:
            with self.lock:
                close_bar()

        return step, close

    def run_finished(self) -> None:
        with self.lock:
            self.progress.run_finished()

    def show(self, status: str) -> None:
        with self.lock:
            self.progress.show(status)


def run_jobs(jobs: list[Job], workers: int, progress) -> None:
    """Train every job: in order where workers is 1; else the costliest first, `workers` at once, each
    on one torch thread (jobs that must take more train first, one at a time). A job's `threads`, where
    set, pins its count. The first error of a job (or Ctrl-C) stops the others and is raised."""
    alone, side_by_side = list(jobs), []
    if workers > 1:  # torch's thread count is the process's: a job that must take more than one trains alone
        side_by_side = [job for job in jobs if (job.threads or 1) == 1]
        alone = [job for job in jobs if (job.threads or 1) > 1]
        if len(side_by_side) == 1:
            alone, side_by_side = alone + side_by_side, []
    for job in alone:
        with cpu_threads_pinned(job.threads) if job.threads else contextlib.nullcontext():
            job.train(progress)
    if not side_by_side:
        return
    jobs = side_by_side
    queue = deque(sorted(jobs, key=lambda job: -job.cost))
    stop, taking, errors = threading.Event(), threading.Lock(), []
    shared = StoppableProgress(progress, stop)

    entered = [threading.Event() for _ in range(min(workers, len(jobs)))]
    exited = [threading.Event() for _ in entered]

    def worker(i: int) -> None:
        entered[i].set()  # before looking at stop: see the main thread's wait below
        try:
            while not stop.is_set():
                with taking:
                    if not queue:
                        return
                    job = queue.popleft()
                try:
                    job.train(shared)
                except Stopped:
                    return
                except BaseException as e:  # noqa: BLE001 -- handed to the main thread, which raises it
                    errors.append(e)
                    stop.set()
                    return
        finally:
            exited[i].set()

    with cpu_threads_pinned(1):
        threads = [threading.Thread(target=worker, args=(i,), name=f"memk-worker-{i}", daemon=True)
                   for i in range(len(exited))]
        try:
            for thread in threads:
                thread.start()
            for done in exited:  # not Thread.join: on Python 3.11 a join cut by Ctrl-C marks a running thread stopped
                while not done.wait(0.2):
                    pass
        except BaseException:  # Ctrl-C, even while the workers start: they stop at their next step
            stop.set()
            # A worker that has not entered yet sees stop when it does, and takes no job.
            for came, done in zip(entered, exited):
                if came.is_set():
                    done.wait()
            raise
        for thread in threads:
            thread.join()
    if errors:
        raise errors[0]
