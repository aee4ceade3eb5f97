"""The run store: the folder's lock and kind, runs.jsonl written as runs finish, resume, damaged
rows set aside, temporaries removed, checkpoints, provenance; and the JobStore interface that both
RunStore and a Ray task's store give the jobs they train."""

import json

import pytest
import torch

from memk.memorize.errors import ConfigError
from memk.memorize.runtime import Backends
from memk.memorize.runs.store import JobStore, RunStore, provenance

SDPA = Backends("sdpa", "reference")


class Planned:
    def __init__(self, run_id, legacy_run_id=None, backends=SDPA):
        self.run_id, self.legacy_run_id, self.backends = run_id, legacy_run_id or f"legacy-{run_id}", backends


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_rows_are_written_as_runs_finish_and_read_back_on_resume(tmp_path):
    with RunStore(tmp_path, "capacity") as store:
        assert store.rows == [] and store.todo([Planned("a"), Planned("b")])[0].run_id == "a"
        store.checkpoint_path("a").write_bytes(b"in progress")
        store.record({"run_id": "a", "bits": 1.5})
        assert not store.checkpoint_path("a").exists()  # a finished run keeps no checkpoint
        assert lines(tmp_path / "runs.jsonl") == [{"run_id": "a", "bits": 1.5}]
    with RunStore(tmp_path, "capacity") as store:
        assert [r.run_id for r in store.todo([Planned("a"), Planned("b")])] == ["b"]
        store.record({"run_id": "b", "bits": 2.5})
        store.record({"run_id": "old", "bits": 0.0})  # a row of another plan: kept, not used
        assert [r["run_id"] for r in store.rows_of([Planned("b"), Planned("a")])] == ["b", "a"]  # plan order
    assert len((tmp_path / "runs.jsonl").read_text().splitlines()) == 3
    assert not (tmp_path / "checkpoints").exists()  # no run in progress: no empty folder left behind


def test_rows_of_folders_from_before_backends_were_in_ids_count_where_the_backends_match(tmp_path):
    with RunStore(tmp_path, "capacity") as store:
        store.record({"run_id": "old-a", "attention_backend": "sdpa", "logprob_backend": "reference"})
        store.record({"run_id": "old-b", "attention_backend": "sdpa", "logprob_backend": "fused"})
        a, b = Planned("new-a", "old-a"), Planned("new-b", "old-b")  # both asked for with sdpa + reference
        assert store.todo([a, b]) == [b]  # b was computed with another log-prob backend: done again
        assert [r["run_id"] for r in store.rows_of([a, b])] == ["old-a"]


def test_a_row_cut_mid_line_is_set_aside_and_its_run_done_again(tmp_path, capsys):
    good = json.dumps({"run_id": "a", "bits": 1.0})
    (tmp_path / "runs.jsonl").write_text(good + "\n" + '{"run_id": "b", "bi' + "\n")
    with RunStore(tmp_path, "capacity") as store:
        assert [r.run_id for r in store.todo([Planned("a"), Planned("b")])] == ["b"]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "runs.jsonl line 2 is damaged" in err[0] and "done again" in err[0]
    assert (tmp_path / "runs.jsonl").read_text() == good + "\n"
    assert (tmp_path / "runs.jsonl.damaged").read_text() == '{"run_id": "b", "bi\n'



BROKEN_ROWS = {  # every way a line of runs.jsonl can fail to be a run's row
    "cut short": b'{"run_id": "b", "precision": "flo',
    "not UTF-8": b'{"run_id": "b", "precision": "float32", "bits": 2.0, "note": "\xff\xfe"}',
    "not JSON": b"\x00\x00\x00\x00",
    "nested past the recursion limit": b"[" * 100_000 + b"]" * 100_000,
    "not an object": b'["b", "float32", 2.0]',
    "run_id not a string": b'{"run_id": 7, "precision": "float32", "bits": 2.0}',
    "a field the other rows have missing": b'{"run_id": "b", "bits": 2.0}',
}


@pytest.mark.parametrize("how", list(BROKEN_ROWS))
def test_a_broken_row_is_set_aside_and_its_run_done_again(tmp_path, capsys, how):
    a = json.dumps({"run_id": "a", "precision": "float32", "bits": 1.0}).encode()
    c = json.dumps({"run_id": "c", "precision": "bfloat16", "bits": 3.0}).encode()
    (tmp_path / "runs.jsonl").write_bytes(a + b"\n" + BROKEN_ROWS[how] + b"\n" + c + b"\n")
    with RunStore(tmp_path, "capacity") as store:
        assert [r.run_id for r in store.todo([Planned("a"), Planned("b"), Planned("c")])] == ["b"]
        assert [r["precision"] for r in store.rows] == ["float32", "bfloat16"]  # no KeyError for a summary
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "runs.jsonl line 2 is damaged" in err[0] and "done again" in err[0]
    assert (tmp_path / "runs.jsonl").read_bytes() == a + b"\n" + c + b"\n"
    assert (tmp_path / "runs.jsonl.damaged").read_bytes() == BROKEN_ROWS[how] + b"\n"  # byte for byte
    with RunStore(tmp_path, "capacity") as store:  # what is left reads back whole, and nothing more is set aside
        assert [r["run_id"] for r in store.rows] == ["a", "c"]
    assert capsys.readouterr().err == ""


def test_a_missing_field_is_named_and_rows_that_all_lack_a_field_or_have_more_are_kept(tmp_path, capsys):
    rows = [{"run_id": "a", "precision": "float32", "bits": 1.0},
            {"run_id": "b", "bits": 2.0},  # no precision, which a, c and d have
            {"run_id": "c", "precision": "float32", "bits": 3.0, "saturated": True},  # a field the others lack: fine
            {"run_id": "d", "precision": "float32", "bits": 4.0}]
    (tmp_path / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with RunStore(tmp_path, "capacity") as store:
        assert [r["run_id"] for r in store.rows] == ["a", "c", "d"]
    err = capsys.readouterr().err
    assert "runs.jsonl line 2 is damaged" in err and "'precision'" in err
    # Rows that all lack a field are rows of their kind (the store knows no experiment's fields).
    (tmp_path / "runs.jsonl").write_text("".join(json.dumps({"run_id": r, "bits": 1.0}) + "\n" for r in "xyz"))
    with RunStore(tmp_path, "capacity") as store:
        assert [r["run_id"] for r in store.rows] == ["x", "y", "z"]
    assert capsys.readouterr().err == ""

def test_temporaries_left_by_a_kill_mid_write_are_removed(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    left = [tmp_path / ".runs.jsonl.tmp-4242", tmp_path / "checkpoints" / ".x.pt.tmp-4243"]
    for path in left:
        path.write_bytes(b"half a file")
    (tmp_path / "checkpoints" / "x.pt").write_bytes(b"a checkpoint")
    with RunStore(tmp_path, "capacity"):
        assert not any(p.exists() for p in left)
        assert (tmp_path / "checkpoints" / "x.pt").exists()


def test_a_finished_runs_checkpoint_left_by_a_kill_inside_record_is_removed_on_resume(tmp_path):
    with RunStore(tmp_path, "capacity") as store:
        store.record({"run_id": "a", "bits": 1.5})
        # killed between the row's write and the checkpoint's removal: the row is there, and so is this
        store.checkpoint_path("a").write_bytes(b"the last evaluation's checkpoint")
        store.checkpoint_path("b").write_bytes(b"a run still in progress")
    with RunStore(tmp_path, "capacity") as store:
        assert not store.checkpoint_path("a").exists()  # nothing would ever read it again
        assert store.checkpoint_path("b").read_bytes() == b"a run still in progress"
        assert [r.run_id for r in store.todo([Planned("a"), Planned("b")])] == ["b"]


@pytest.mark.parametrize("written", [{"experiment": "capacity"}, {"precisions": ["float32"], "models": []}])
def test_a_folder_of_the_other_experiment_is_refused(tmp_path, written):
    (tmp_path / "experiment.json").write_text(json.dumps(written))
    with pytest.raises(ConfigError, match="holds a run-capacity experiment; give run-generalization another --out"):
        RunStore(tmp_path, "generalization").__enter__()
    with RunStore(tmp_path, "capacity") as store:  # its own kind is fine, and the lock was released
        store.write_experiment({"precisions": ["float32"]})
    assert json.loads((tmp_path / "experiment.json").read_text())["experiment"] == "capacity"


def test_a_folder_is_written_by_one_store_at_a_time(tmp_path):
    with RunStore(tmp_path, "capacity"):
        with pytest.raises(ConfigError, match="another memk run is writing to"):
            RunStore(tmp_path, "capacity").__enter__()
    with RunStore(tmp_path, "capacity"):  # released when the first one closed
        pass


def test_an_unwritable_folder_is_a_config_error(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(ConfigError, match="cannot write to output folder.*--out"):
        RunStore(tmp_path / "file" / "runs", "capacity").__enter__()


def test_json_files_round_trip_and_a_damaged_one_is_set_aside(tmp_path, capsys):
    with RunStore(tmp_path, "generalization") as store:
        assert store.read_json("prediction.json") is None
        store.write_json("prediction.json", {"plan_id": "p", "law": None})
        assert store.read_json("prediction.json") == {"plan_id": "p", "law": None}
        (tmp_path / "prediction.json").write_text('{"plan_id": "p", "la')
        assert store.read_json("prediction.json") is None
    assert "prediction.json is damaged" in capsys.readouterr().err
    assert (tmp_path / "prediction.json.damaged").exists() and not (tmp_path / "prediction.json").exists()


def test_the_run_store_and_a_ray_tasks_store_are_both_job_stores(tmp_path):
    import inspect

    from memk.memorize.runs.ray_executor import TaskStore  # Ray itself is imported only when the executor is built

    task = TaskStore({"a": str(tmp_path / "node" / "checkpoints" / "a.pt")})
    with RunStore(tmp_path / "out", "capacity") as store:
        for job_store in (store, task):
            assert isinstance(job_store, JobStore)
            for method in ("checkpoint_path", "record"):  # the same parameters, so a job may call either
                declared = list(inspect.signature(getattr(JobStore, method)).parameters)[1:]  # less self
                assert list(inspect.signature(getattr(job_store, method)).parameters) == declared, method
        assert store.checkpoint_path("a") == tmp_path / "out" / "checkpoints" / "a.pt"
        assert task.checkpoint_path("a") == tmp_path / "node" / "checkpoints" / "a.pt"
        assert (tmp_path / "node" / "checkpoints").is_dir()  # made for a node that does not share the folder
        for job_store in (store, task):
            job_store.record({"run_id": "a", "bits": 1.5})
        assert store.rows == [{"run_id": "a", "bits": 1.5}]
    assert [{k: v for k, v in row.items() if k != "host"} for row in task.rows] == [{"run_id": "a", "bits": 1.5}]
    assert task.rows[0]["host"]  # which machine trained it: the driver records the task's rows as they are


def test_provenance_names_device_backends_torch_and_the_finish_time():
    p = provenance(Backends("sdpa", "fused"), torch.device("cpu"))
    assert p["device"] == "cpu" and p["attention_backend"] == "sdpa" and p["logprob_backend"] == "fused"
    assert p["torch"] == torch.__version__ and p["finished_at"].endswith("Z")
    assert p["trained_as"] == "alone"


def test_a_failed_run_is_listed_until_it_finishes_and_is_still_to_do(tmp_path):
    a, b = Planned("a"), Planned("b")
    with RunStore(tmp_path, "capacity") as store:
        store.record_failure(a, "RuntimeError: boom", attempts=3)
        assert [f["run_id"] for f in store.failures_of([b, a])] == ["a"]
        assert store.todo([a, b]) == [a, b]  # a rerun retries it
    with RunStore(tmp_path, "capacity") as store:  # read back by the next command
        (failure,) = store.failures_of([a, b])
        assert (failure["error"], failure["attempts"]) == ("RuntimeError: boom", 3)
        store.record({"run_id": "a", "bits": 1.0})
        assert store.failures_of([a, b]) == []
    assert json.loads((tmp_path / "failures.json").read_text()) == {}


# ---- the lock's file and what a failed start leaves -------------------------------------------


def test_the_lock_file_is_removed_as_a_store_closes_however_it_ends(tmp_path):
    with RunStore(tmp_path, "capacity"):
        assert (tmp_path / ".lock").exists()
    assert not (tmp_path / ".lock").exists()
    with pytest.raises(RuntimeError):
        with RunStore(tmp_path, "capacity"):
            raise RuntimeError("a run failed")
    assert not (tmp_path / ".lock").exists() and tmp_path.exists()


def test_a_lock_file_left_by_a_killed_process_is_taken_and_then_removed(tmp_path):
    import subprocess
    import sys

    code = ("import os, sys; from memk.memorize.runs.store import lock_folder; "
            "lock_folder(sys.argv[1]); os._exit(0)")  # dies holding it: the file stays, the lock goes
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, timeout=120)
    assert (tmp_path / ".lock").exists()
    with RunStore(tmp_path, "capacity") as store:
        store.record({"run_id": "a", "bits": 1.0})
    assert not (tmp_path / ".lock").exists()


def test_a_lock_won_on_a_file_its_holder_removed_is_retaken_on_the_new_file(tmp_path, monkeypatch):
    # The race of removing a lock file: B opens .lock while A holds it; A removes it and lets go; B's
    # flock then succeeds on a file no longer in the folder, while C could lock a new .lock. B must
    # notice and take the file that is there, so that C is refused.
    import os

    from memk.memorize.runs import store as store_module

    a = store_module.lock_folder(tmp_path)
    real_open, opened = os.open, []

    def open_then_a_lets_go(path, *args, **kwargs):
        fd = real_open(path, *args, **kwargs)
        if str(path).endswith(".lock"):
            opened.append(path)
            if len(opened) == 1:
                a.close()
        return fd

    monkeypatch.setattr(os, "open", open_then_a_lets_go)
    b = store_module.lock_folder(tmp_path)
    monkeypatch.setattr(os, "open", real_open)
    assert len(opened) == 2  # B won the removed file's lock first, then took the new file's
    with pytest.raises(ConfigError, match="another memk run is writing to"):
        store_module.lock_folder(tmp_path)  # C
    b.close()
    with store_module.lock_folder(tmp_path):  # free again once B lets go
        pass
    assert not (tmp_path / ".lock").exists()


def test_a_start_that_fails_before_any_work_leaves_no_folder_it_made(tmp_path):
    out = tmp_path / "new" / "deeper" / "out"
    with pytest.raises(ConfigError, match="refused"):
        with RunStore(out, "generalization") as store:
            store.write_experiment({"source": "text"})
            (out / "tokenizer.json").write_text("{}")  # prepared on the way, remade by a rerun
            raise ConfigError("refused")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("work", ["row", "failure", "checkpoint", "kept"])
def test_a_failure_after_work_was_saved_keeps_the_folder_without_its_lock(tmp_path, work):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with RunStore(out, "capacity") as store:
            store.write_experiment({"precisions": ["float32"]})
            if work == "row":
                store.record({"run_id": "a", "bits": 1.0})
            elif work == "failure":
                store.record_failure(Planned("a"), "RuntimeError: boom", attempts=3)
            elif work == "checkpoint":
                store.checkpoint_path("a").write_bytes(b"a run in progress")
            else:
                store.keep()
            raise KeyboardInterrupt
    assert (out / "experiment.json").exists() and not (out / ".lock").exists()
    with RunStore(out, "capacity") as store:  # and the next command resumes there
        assert len(store.rows) == (work == "row") and len(store.failures) == (work == "failure")


def test_a_failed_start_in_a_folder_that_was_there_removes_only_its_lock(tmp_path):
    (tmp_path / "notes.txt").write_text("the user's")
    with pytest.raises(ConfigError):
        with RunStore(tmp_path, "capacity"):
            raise ConfigError("refused")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
