"""The run store: the folder's lock and kind, runs.jsonl written as runs finish, resume, damaged
rows set aside, temporaries removed, checkpoints, provenance."""

import json

import pytest
import torch

from memk.memorize.errors import ConfigError
from memk.memorize.runtime import Backends
from memk.memorize.store import RunStore, provenance

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
