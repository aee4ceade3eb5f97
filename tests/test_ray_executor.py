"""The Ray executor (memorize/runs/ray_executor.py) on a local Ray instance of two CPUs, started once:
the rows and summaries of the local executor, a killed worker retried, a killed driver resumed,
a task that keeps failing reported, and each bad input one line with exit status 2."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from memk.cli.main import main, report_failures
from memk.memorize.experiments import capacity, generalization
from memk.memorize.experiments.capacity import UniformWorkload
from memk.memorize.errors import ConfigError
from memk.memorize.runs import packing
from memk.memorize.runs.ensemble_executor import EnsembleExecutor
from memk.memorize.runs.packing import MEMORY_FRACTION, member_bytes
from memk.memorize.runs.ray_executor import RayExecutor, ray_executor
from memk.memorize.runtime import resolve_backends
from memk.memorize.runs.store import RunStore

CPU = torch.device("cpu")
MEMK = [sys.executable, "-m", "memk.cli"]
OUTSIDE = tempfile.gettempdir()  # `python -m` puts the working directory on sys.path: not the checkout
VARIES = {"train_seconds", "finished_at", "made_at", "host"}  # timing, and which machine trained the run


@pytest.fixture(scope="module")
def cluster():
    """A local Ray instance with two CPUs for the whole module; its address, for other processes to join."""
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test file
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def rows(out: Path) -> list[dict]:
    path = out / "runs.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def comparable(value):
    """A row or summary without what differs between two trainings of the same runs."""
    if isinstance(value, dict):
        return {k: comparable(v) for k, v in value.items() if k not in VARIES}
    if isinstance(value, list):
        return [comparable(v) for v in value]
    return value


def by_id(found: list[dict]) -> dict[str, dict]:
    assert len({r["run_id"] for r in found}) == len(found), "a run recorded twice"
    return {r["run_id"]: comparable(r) for r in found}


@pytest.fixture(scope="module")
def local_capacity(tmp_path_factory):
    """The capacity smoke preset through the local executor: the rows every Ray run must give."""
    out = tmp_path_factory.mktemp("local-capacity")
    summary = capacity.run_capacity(capacity.preset("smoke"), out, progress=False)
    return rows(out), summary


def smoke_runs():
    exp = capacity.preset("smoke")
    return capacity.plan(exp, resolve_backends(CPU, exp.attention_backend, exp.logprob_backend))


class Recording:
    """A SweepProgress that keeps what it was told."""

    def __init__(self):
        self.finished, self.shown = 0, []

    def run_finished(self):
        self.finished += 1

    def show(self, status):
        self.shown.append(status)


# ---------------------------------------------------------------------------------------
# The same results as the local executor


def test_capacity_smoke_through_ray_gives_the_local_rows_and_summary(cluster, local_capacity, tmp_path):
    local_rows, local_summary = local_capacity
    summary = capacity.run_capacity(capacity.preset("smoke"), tmp_path, progress=False, executor=ray_executor(CPU))
    found = rows(tmp_path)
    assert by_id(found) == by_id(local_rows)
    assert all(r["host"] for r in found) and all(r["torch_threads"] == 1 for r in found)  # one CPU a task
    assert comparable(summary) == comparable(local_summary) and summary["failed_runs"] == []
    assert json.loads((tmp_path / "summary.json").read_text())["failed_runs"] == []


@pytest.mark.slow
def test_the_command_without_an_address_starts_its_own_ray_instance(cluster, local_capacity, tmp_path):
    result = subprocess.run([*MEMK, "run-capacity", "--preset", "smoke", "--executor", "ray", "--ensemble", "off",
                             "--no-progress", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300,
                            cwd=OUTSIDE)
    assert result.returncode == 0, result.stderr
    assert by_id(rows(tmp_path)) == by_id(local_capacity[0])


@pytest.mark.slow
def test_generalization_smoke_through_ray_gives_the_local_rows_and_summary(cluster, tmp_path):
    exp = generalization.preset("smoke")
    local = generalization.run_generalization(exp, tmp_path / "local", progress=False)
    remote = generalization.run_generalization(exp, tmp_path / "ray", progress=False, executor=ray_executor(CPU))
    assert by_id(rows(tmp_path / "ray")) == by_id(rows(tmp_path / "local"))
    assert len(rows(tmp_path / "ray")) == 7  # 2 models x 3 sizes, and the check run
    assert comparable(remote) == comparable(local)


def test_with_ensemble_each_ensemble_is_one_task_and_gives_the_local_ensembles_rows(cluster, monkeypatch, tmp_path):
    executor = ray_executor(CPU, ensemble=2)
    assert [(len(p.runs), p.slots) for p in executor.plans(smoke_runs())] == [(2, 2), (2, 2)]  # a model's sizes
    exp = capacity.preset("smoke")
    capacity.run_capacity(exp, tmp_path / "ray", progress=False, executor=executor)
    monkeypatch.setenv("MEMK_NUM_THREADS", "1")  # as the Ray tasks train: one CPU each
    capacity.run_capacity(exp, tmp_path / "local", progress=False, executor=EnsembleExecutor(CPU, max_members=2))
    assert by_id(rows(tmp_path / "ray")) == by_id(rows(tmp_path / "local"))


@pytest.mark.skipif(os.cpu_count() < 2, reason="one core: a one-CPU task has the whole machine")
def test_ensembles_of_tasks_side_by_side_plan_for_their_share_of_the_memory(monkeypatch):
    runs = smoke_runs()
    sizes = [member_bytes(r) for r in runs]
    assert max(sizes) < 2 * min(sizes)  # so one budget below fits one member of every model
    # A task with the machine to itself has room for two members of every model; one of
    # `cores` one-CPU tasks has 1/cores of that: room for one member of every model.
    monkeypatch.setattr(packing, "free_memory_bytes", lambda device: int(2 * max(sizes) / MEMORY_FRACTION))
    alone = RayExecutor(CPU, 0, os.cpu_count(), ensemble=2).plans(runs)
    shared = RayExecutor(CPU, 0, 1, ensemble=2).plans(runs)
    assert [p.slots for p in alone] == [2, 2]
    assert [(len(p.runs), p.slots) for p in shared] == [(1, 1)] * 4  # a task a run, not ensembles that do not fit


# ---------------------------------------------------------------------------------------
# Killed workers, killed drivers, failing tasks


@dataclass(frozen=True)
class StallsOnce:
    """Uniform data; the first try of run `victim` writes its worker's pid at its third evaluation
    (its checkpoint of the second on disk) and waits there to be killed."""

    victim: str
    folder: str

    def training_data(self, run):
        return UniformWorkload().training_data(run)

    def stop_signal(self, run, data):
        measure, evaluations = UniformWorkload().stop_signal(run, data), [0]

        def stalling(model):
            evaluations[0] += 1
            folder = Path(self.folder)
            if run.run_id == self.victim and evaluations[0] == 3 and not (folder / "killed").exists():
                (folder / "pid.tmp").write_text(str(os.getpid()))
                (folder / "pid.tmp").rename(folder / "pid")
                time.sleep(120)
            return measure(model)

        return stalling

    def result(self, run, model, outcome, data):
        return UniformWorkload().result(run, model, outcome, data)


def test_a_worker_killed_mid_run_is_retried_and_nothing_is_lost_or_duplicated(cluster, local_capacity, tmp_path):
    runs = smoke_runs()
    victim = max(runs, key=lambda r: r.n_sequences)  # the longest run: it reaches a third evaluation
    seen = {}

    def kill_the_stalled_worker():
        pid = tmp_path / "pid"
        deadline = time.time() + 120
        while not pid.exists() and time.time() < deadline:
            time.sleep(0.05)
        seen["checkpoint"] = (tmp_path / "out" / "checkpoints" / f"{victim.run_id}.pt").exists()
        (tmp_path / "killed").touch()
        os.kill(int(pid.read_text()), signal.SIGKILL)  # the Ray worker training the victim

    killer = threading.Thread(target=kill_the_stalled_worker)
    killer.start()
    with RunStore(tmp_path / "out", "capacity") as store:
        RayExecutor(CPU, 0, 1, slots=2).execute(runs, StallsOnce(victim.run_id, str(tmp_path)), store, Recording())
        assert store.failures_of(runs) == []
    killer.join()
    assert seen["checkpoint"], "the worker was killed before its run had checkpointed"
    found = rows(tmp_path / "out")
    assert by_id(found) == by_id(local_capacity[0])  # the retried run resumed to the very same result
    assert not list((tmp_path / "out" / "checkpoints").glob("*.pt"))


@dataclass(frozen=True)
class Broken:
    """Uniform data, but run `victim` (every run for "*") has none: each try raises (and is counted in folder/tries)."""

    victim: str
    folder: str

    def training_data(self, run):
        if self.victim in (run.run_id, "*"):
            with open(Path(self.folder) / "tries", "a") as f:
                f.write("x")
            raise RuntimeError(f"no data for {run.name}")
        return UniformWorkload().training_data(run)

    def stop_signal(self, run, data):
        return UniformWorkload().stop_signal(run, data)

    def result(self, run, model, outcome, data):
        return UniformWorkload().result(run, model, outcome, data)


@dataclass
class BreakingExecutor:
    """The Ray executor with a workload that fails one run, for run_capacity to use."""

    victim: str
    folder: str

    def execute(self, runs, workload, store, progress):
        RayExecutor(CPU, 0, 1, max_retries=1, slots=2).execute(runs, Broken(self.victim, self.folder), store, progress)


def test_a_task_that_keeps_failing_is_reported_and_the_sweep_completes_then_a_rerun_retries_it(
        cluster, local_capacity, tmp_path):
    runs = smoke_runs()
    victim = runs[0]
    out = tmp_path / "out"
    progress = Recording()
    with RunStore(out, "capacity") as store:
        RayExecutor(CPU, 0, 1, max_retries=1, slots=2).execute(runs, Broken(victim.run_id, str(tmp_path)), store,
                                                               progress)
        (failure,) = store.failures_of(runs)
    assert (tmp_path / "tries").read_text() == "xx"  # the first try and one retry, no more
    assert failure["run_id"] == victim.run_id and failure["attempts"] == 2
    assert failure["error"] == f"RuntimeError: no data for {victim.name}"
    assert by_id(rows(out)) == {k: v for k, v in by_id(local_capacity[0]).items() if k != victim.run_id}
    assert progress.finished == len(runs) and any("in flight" in s for s in progress.shown)

    # The summary lists it (and the command line then exits 1: below).
    summary = capacity.run_capacity(capacity.preset("smoke"), out, progress=False,
                                    executor=BreakingExecutor(victim.run_id, str(tmp_path)))
    assert [f["run_id"] for f in summary["failed_runs"]] == [victim.run_id]
    assert len(summary["precisions"]["float32"]["models"][0]["points"]) == 1  # the failed size is missing

    # Run again with the run healthy: it is retried and the failure is gone.
    summary = capacity.run_capacity(capacity.preset("smoke"), out, progress=False, executor=ray_executor(CPU))
    assert summary["failed_runs"] == [] and json.loads((out / "failures.json").read_text()) == {}
    assert by_id(rows(out)) == by_id(local_capacity[0])
    assert comparable(summary) == comparable(local_capacity[1])


@dataclass(frozen=True)
class Diverges(Broken):
    """Run `victim` diverges at its first evaluation (each try counted in folder/tries)."""

    def training_data(self, run):
        if run.run_id == self.victim:
            with open(Path(self.folder) / "tries", "a") as f:
                f.write("x")
        return UniformWorkload().training_data(run)

    def stop_signal(self, run, data):
        if run.run_id == self.victim:
            def diverged(model):
                raise FloatingPointError("training diverged at step 0 (loss nan); lower the learning rate")
            return diverged
        return UniformWorkload().stop_signal(run, data)


def test_a_run_that_diverges_fails_at_once_without_retries(cluster, tmp_path):
    runs = smoke_runs()
    victim = runs[1]
    with RunStore(tmp_path / "out", "capacity") as store:
        RayExecutor(CPU, 0, 1, max_retries=2, slots=2).execute(runs, Diverges(victim.run_id, str(tmp_path)), store,
                                                               Recording())
        (failure,) = store.failures_of(runs)
        assert len(store.rows) == 3
    assert (tmp_path / "tries").read_text() == "x"  # a diverged run would only diverge again
    assert (failure["run_id"], failure["attempts"]) == (victim.run_id, 1)
    assert failure["error"].startswith("FloatingPointError: training diverged at step 0")


def test_a_sweep_whose_every_run_failed_is_one_clear_error(cluster, tmp_path):
    with pytest.raises(ConfigError, match=r"all 4 runs failed after retries \(the first: RuntimeError: no data for"):
        capacity.run_capacity(capacity.preset("smoke"), tmp_path, progress=False,
                              executor=BreakingExecutor("*", str(tmp_path)))
    assert len(json.loads((tmp_path / "failures.json").read_text())) == 4


@pytest.mark.slow
def test_a_driver_killed_mid_sweep_resumes_keeping_every_finished_run(cluster, tmp_path):
    out = tmp_path / "runs"
    args = [*MEMK, "run-capacity", "--preset", "smoke", "--sizes", "8,16,32,64,128,256", "--out", str(out),
            "--no-progress", "--executor", "ray", "--ray-address", cluster, "--ensemble", "off"]  # a task a run
    driver = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=OUTSIDE)
    deadline = time.time() + 120
    while time.time() < deadline and driver.poll() is None and not rows(out):
        time.sleep(0.02)
    assert driver.poll() is None, "the sweep finished before its driver could be killed"
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    before = rows(out)
    assert 1 <= len(before) < 12

    result = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=OUTSIDE)
    assert result.returncode == 0, result.stderr
    after = rows(out)
    assert after[: len(before)] == before  # finished runs kept as they were, not redone
    assert len(after) == 12 and len({r["run_id"] for r in after}) == 12
    assert not list((out / "checkpoints").glob("*.pt"))


def test_the_command_warns_and_exits_1_where_runs_failed(capsys, monkeypatch, tmp_path):
    failed = {"run_id": "L1-d8-N69", "error": "RuntimeError: no data", "attempts": 3}
    monkeypatch.setattr(capacity, "run_capacity", lambda *a, **k: {"precisions": {}, "failed_runs": [failed]})
    with pytest.raises(SystemExit) as exit:
        main(["run-capacity", "--preset", "smoke", "--no-progress", "--out", str(tmp_path)])
    assert exit.value.code == 1
    assert "1 run(s) failed after retries" in capsys.readouterr().err
    assert report_failures({"failed_runs": []}, tmp_path) == 0


# ---------------------------------------------------------------------------------------
# Bad input: one line, exit status 2


def one_line_error(capsys, args, needle):
    with pytest.raises(SystemExit) as exit:
        main(["run-capacity", "--preset", "smoke", "--no-progress", *args])
    err = capsys.readouterr().err
    assert exit.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert needle in lines[0], lines[0]


@pytest.mark.parametrize("address, needle", [
    ("127.0.0.1:1", "no Ray cluster answers at --ray-address '127.0.0.1:1'"),  # nothing listens on port 1
    ("headnode", "is not HOST:PORT"),
])
def test_a_bad_address_is_one_line_and_exit_2(capsys, tmp_path, address, needle):
    pytest.importorskip("ray")
    one_line_error(capsys, ["--executor", "ray", "--ray-address", address, "--out", str(tmp_path)], needle)
    assert not (tmp_path / "runs.jsonl").exists()


def test_ray_not_installed_is_one_line_naming_the_extra(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as where it is not installed
    one_line_error(capsys, ["--executor", "ray", "--out", str(tmp_path)], 'pip install "memk[ray]"')


def test_cuda_on_a_cluster_without_a_gpu_is_one_line_and_exit_2(cluster, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # this machine passes; the cluster has no GPU
    one_line_error(capsys, ["--executor", "ray", "--device", "cuda", "--out", str(tmp_path)],
                   "the Ray cluster has no GPU")


@pytest.mark.parametrize("args, needle", [
    (["--ray-address", "auto"], "--ray-address is for --executor ray"),
    (["--executor", "ray", "--gpus-per-task", "0.5"], "--gpus-per-task needs --device cuda"),
    (["--executor", "ray", "--cpus-per-task", "0"], "--cpus-per-task must be a whole number >= 1"),
])
def test_ray_options_that_cannot_apply_are_one_line_and_exit_2(capsys, tmp_path, args, needle):
    one_line_error(capsys, [*args, "--out", str(tmp_path)], needle)


def test_a_cluster_that_cannot_hold_one_task_is_one_line_and_exit_2(cluster, capsys, tmp_path):
    one_line_error(capsys, ["--executor", "ray", "--cpus-per-task", "3", "--out", str(tmp_path)],
                   "no machine of the Ray cluster has 3 CPUs")
