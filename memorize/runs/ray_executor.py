"""The Ray executor: a sweep's runs as tasks of a Ray cluster (the GPUs of one machine, or many machines).

`RayExecutor` takes the runs an experiment hands any executor (memorize/runs/sweep.py) and submits
each run, or with --ensemble each ensemble plan (memorize/runs/packing.py, the packing the local
executors use), as one Ray task with declared resources: GPUs per task (a fraction lets small tasks share a GPU) and
CPUs per task (the worker's torch threads are pinned to match through MEMK_NUM_THREADS, so
tasks side by side do not oversubscribe the cores).

- The driver (the memk command) stays the only writer of the output folder: tasks return
  their rows, and the driver records each task's rows in runs.jsonl the moment it returns.
- Tasks checkpoint to the run store's checkpoints/ by absolute path. On a cluster the output
  folder must be on a filesystem every node mounts at the same path; where it is not, a run
  retried or resumed on another node finds no checkpoint and starts over (same result, later).
- A task whose worker dies, or that raises, is retried by Ray up to `max_retries` times; then
  its runs are recorded as failed with the error (RunStore.record_failure) and the sweep goes
  on. Errors a retry would only repeat (NOT_RETRIED: diverged training, a ConfigError) fail
  the run at once. Failed runs have no row, so running the same command again retries them.
- Where memk starts the Ray instance itself (no --ray-address), it does not outlive memk: a
  watchdog (memorize/runs/ray_watchdog.py) ends every process of it when memk ends, kill -9 included.

Ray is imported only when the executor is built: memk works without the `memk[ray]` extra.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .ensemble_executor import EnsembleTrainer, repack_fraction_for
from ..errors import ConfigError
from .ray_watchdog import MARKER
from .packing import EnsembleChoice, EnsemblePlan, Packer, packing_entries, read_ensemble
from ..runtime import THREADS_ENV
from .store import RunStore
from .sweep import Run, SweepProgress, Workload, train_run

INSTALL = 'pip install "memk[ray]"'
LOCAL = "local"  # --ray-address default: start a Ray instance on this machine for this command
DEFAULT_RETRIES = 2  # tries after the first, for a task whose worker died or that raised
CONNECT_TIMEOUT_S = 5.0  # Ray itself retries an address nobody answers at for minutes


def import_ray():
    """The ray module, or a ConfigError saying how to install it."""
    try:
        import ray
    except ImportError as e:
        raise ConfigError(f"--executor ray needs Ray, which is not installed; {INSTALL}") from e
    return ray


# ---------------------------------------------------------------------------------------
# Connecting: the address, and what the cluster holds


def check_address(address: str) -> None:
    """'local', 'auto', or a HOST:PORT (ray://HOST:PORT for Ray Client) that answers on its port."""
    if address in (LOCAL, "auto"):
        return
    host, colon, port = address.removeprefix("ray://").rpartition(":")
    if not colon or not host or not port.isdigit():
        raise ConfigError(f"--ray-address {address!r} is not HOST:PORT; give the head node's address "
                          "(`ray start --head` prints it), auto to join the cluster of this machine, or leave it out")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        reason = e.strerror or str(e) or type(e).__name__
        raise ConfigError(f"no Ray cluster answers at --ray-address {address!r} ({reason}); start one with "
                          "`ray start --head` there, or check the address") from e


def connect(ray, address: str) -> None:
    """Start a local Ray instance ('local') or join a running cluster; a program (or test) that
    has connected already keeps its connection."""
    check_address(address)
    if ray.is_initialized():
        return
    try:
        with ray_watchdog() if address == LOCAL else contextlib.nullcontext():
            ray.init(address=address, logging_level=logging.ERROR)  # its notices would break one-line errors
    except ConnectionError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"cannot join a Ray cluster at --ray-address {address!r}: {first} Start one with "
                          "`ray start --head`, or leave --ray-address out to start a local instance") from e


@contextlib.contextmanager
def ray_watchdog():
    """Around starting a local Ray instance: mark the processes it starts (ray_watchdog.MARKER in their
    environment) and start memorize/runs/ray_watchdog.py, which ends them when this process ends, however it
    ends: Ray's agents outlive a driver killed with kill -9. Linux only (elsewhere nothing is done)."""
    if not sys.platform.startswith("linux"):
        yield
        return
    mark = f"{os.getpid()}-{secrets.token_hex(4)}"
    read_end, write_end = os.pipe()  # not inherited by what this process starts: only it holds write_end
    subprocess.Popen([sys.executable, str(Path(__file__).with_name("ray_watchdog.py")), mark], stdin=read_end,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                     env={k: v for k, v in os.environ.items() if k != MARKER})
    os.close(read_end)
    _WATCHDOG_PIPES.append(write_end)  # open until this process ends
    os.environ[MARKER] = mark
    try:
        yield
    finally:
        del os.environ[MARKER]  # what this process starts later is not Ray's


_WATCHDOG_PIPES: list[int] = []


def task_slots(ray, device: torch.device, gpus_per_task: float, cpus_per_task: int) -> int:
    """How many tasks the cluster runs at once; a ConfigError where it can run none."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if device.type == "cuda" and not any(n.get("GPU", 0) > 0 for n in nodes):
        raise ConfigError("--device cuda asked for, but the Ray cluster has no GPU; use --device cpu, "
                          "or join GPU machines to it (`ray start --address HEAD:PORT` on each)")

    def fits(node: dict) -> int:
        by_cpu = int(node.get("CPU", 0) // cpus_per_task)
        return by_cpu if gpus_per_task == 0 else min(by_cpu, int(node.get("GPU", 0) / gpus_per_task + 1e-9))

    slots = sum(fits(n) for n in nodes)
    if slots == 0:
        gpus = f" and {gpus_per_task:g} GPU" if gpus_per_task else ""
        raise ConfigError(f"no machine of the Ray cluster has {cpus_per_task} CPUs{gpus} for one task; "
                          "lower --cpus-per-task or --gpus-per-task")
    return slots


# ---------------------------------------------------------------------------------------
# One task, in a worker


@dataclass
class TaskStore:
    """The store a task's jobs train with (a store.JobStore): its runs' checkpoint paths (absolute, from
    the driver's RunStore). The rows it finishes go back to the driver, which records them."""

    checkpoints: dict[str, str]  # run_id -> checkpoint path
    rows: list[dict] = field(default_factory=list)

    def checkpoint_path(self, name: str) -> Path:
        path = Path(self.checkpoints[name])
        path.parent.mkdir(parents=True, exist_ok=True)  # a node that does not share the output folder
        return path

    def record(self, row: dict) -> None:
        self.rows.append({**row, "host": socket.gethostname()})


# Errors a retry would only repeat, at the cost of the whole run again: training that diverged
# (deterministic for a run), and runs that cannot run as asked (ConfigError, a full disk among them).
NOT_RETRIED = (FloatingPointError, ConfigError)


def train_task(plan: EnsemblePlan, workload: Workload, device_type: str, checkpoints: dict[str, str],
               threads: int) -> tuple[list[dict], str | None]:
    """Train a plan's runs in this worker: one at a time, or in its slots as an ensemble. Their rows,
    and the error that stopped the task where it is one of NOT_RETRIED (other errors raise: Ray retries)."""
    os.environ[THREADS_ENV] = str(threads)  # runtime.use_cpu_threads reads it: torch takes the task's CPUs
    device = torch.device(device_type)  # "cuda" is the GPU Ray gave this task (CUDA_VISIBLE_DEVICES)
    store = TaskStore(checkpoints)
    try:
        if plan.slots > 1:
            quiet = SweepProgress(total=0, done=0, desc="", enabled=False)
            EnsembleTrainer(plan, workload, store, quiet, device, repack_fraction_for(device)).train()
        else:
            for run in plan.runs:
                store.record(train_run(run, workload, device, store.checkpoint_path(run.run_id)))
    except NOT_RETRIED as e:
        return store.rows, describe_failure(e)
    return store.rows, None


def describe_failure(error: BaseException) -> str:
    """One line: the task's own exception where it raised one, else what Ray says (a dead worker)."""
    cause = getattr(error, "cause", None) or error
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[0] if text else ''}".rstrip(": ")[:500]


# ---------------------------------------------------------------------------------------
# The executor, in the driver


@dataclass
class RayExecutor:
    """Runs packed by its `packer` (memorize/runs/packing.py), placed as Ray tasks, one a plan; build it
    with `ray_executor`, which connects."""

    device: torch.device
    gpus_per_task: float
    cpus_per_task: int
    ensemble: EnsembleChoice | str | int = "off"  # --ensemble: which runs share a task (read into an EnsembleChoice)
    max_retries: int = DEFAULT_RETRIES
    slots: int = 1  # tasks the cluster runs at once, when it was connected

    def __post_init__(self):
        self.ensemble = read_ensemble(self.ensemble)

    @property
    def packer(self) -> Packer:
        # The memory free is measured in the driver: its machine stands for the workers'. Tasks side by
        # side share a GPU's (or a machine's) memory: each plans for its share.
        share = self.gpus_per_task if self.device.type == "cuda" else self.cpus_per_task / os.cpu_count()
        return Packer(self.device, self.ensemble, memory_share=min(1.0, share))

    def plans(self, runs: list[Run], recorded: dict[str, dict] | None = None) -> list[EnsemblePlan]:
        """One plan a task: a run alone, or an ensemble of runs where --ensemble groups them (runs
        the `recorded` packing holds as it planned them)."""
        plans = []
        for plan in self.packer.plans(runs, recorded=recorded):
            plans.extend([plan] if plan.slots > 1 else [EnsemblePlan([run], 1) for run in plan.runs])
        return plans

    def execute(self, runs: list[Run], workload: Workload, store: RunStore, progress: SweepProgress) -> None:
        if not runs:
            return
        ray = import_ray()
        task = ray.remote(train_task).options(
            num_cpus=self.cpus_per_task, num_gpus=self.gpus_per_task,
            max_retries=self.max_retries, retry_exceptions=True,
        )
        shared = ray.put(workload)  # once into the object store, not once per task
        pending = {}
        plans = self.plans(runs, recorded=store.packing())
        # Threads are the task's CPUs (train_task): only which runs share an ensemble is recorded.
        store.record_packing({k: v for plan in plans
                              for k, v in packing_entries(plan, {r.run_id: None for r in plan.runs}).items()})
        for plan in plans:
            checkpoints = {r.run_id: str(store.checkpoint_path(r.run_id).absolute()) for r in plan.runs}
            pending[task.remote(plan, shared, self.device.type, checkpoints, self.cpus_per_task)] = plan
        failed = 0

        def status() -> str:
            # Ray starts tasks about in the order they were submitted: the first `slots` pending ones run.
            running = list(pending.values())[: self.slots]
            return (f"{sum(len(p.runs) for p in running)} runs in flight, {len(pending) - len(running)} tasks queued"
                    + (f", {failed} runs failed" if failed else ""))

        progress.show(status())
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            plan = pending.pop(ref)
            try:
                (rows, error), attempts = ray.get(ref), 1
            except ray.exceptions.RayError as e:  # retries spent: note the runs, go on with the rest
                rows, error, attempts = [], describe_failure(e), self.max_retries + 1
            finished = {row["run_id"] for row in rows}
            unfinished = [run for run in plan.runs if run.run_id not in finished] if error else []
            failed += len(unfinished)
            progress.show(status())
            for row in rows:
                store.record(row)
                progress.run_finished()
            for run in unfinished:
                store.record_failure(run, error, attempts)
                progress.run_finished()


def ray_executor(device: torch.device, address: str | None = None, gpus_per_task: float | None = None,
                 cpus_per_task: int = 1, ensemble: EnsembleChoice | str | int = "off",
                 max_retries: int = DEFAULT_RETRIES) -> RayExecutor:
    """Check the options, connect to Ray (a local instance unless an address is given), check the
    cluster can run a task, and return the executor."""
    if gpus_per_task is None:
        gpus_per_task = 1.0 if device.type == "cuda" else 0.0
    if device.type == "cuda" and not 0 < gpus_per_task:
        raise ConfigError(f"--gpus-per-task must be above 0 on CUDA, got {gpus_per_task:g}; e.g. 1, or 0.25 "
                          "for four tasks to a GPU")
    if device.type == "cpu" and gpus_per_task:
        raise ConfigError("--gpus-per-task needs --device cuda; leave it out to train on the CPU")
    if gpus_per_task > 1:  # a run trains on one GPU: more would sit idle
        raise ConfigError(f"--gpus-per-task must be at most 1 (a run trains on one GPU), got {gpus_per_task:g}")
    if cpus_per_task < 1:
        raise ConfigError(f"--cpus-per-task must be a whole number >= 1, got {cpus_per_task}")
    ray = import_ray()
    connect(ray, address or LOCAL)
    slots = task_slots(ray, device, gpus_per_task, cpus_per_task)
    return RayExecutor(device, gpus_per_task, cpus_per_task, ensemble, max_retries, slots)
