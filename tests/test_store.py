"""The run store: the folder's lock, runs.jsonl written as runs finish, resume, checkpoints, provenance."""

import json

import pytest
import torch

from memk.memorize.errors import ConfigError
from memk.memorize.runtime import Backends
from memk.memorize.store import RunStore, provenance


class Planned:
    def __init__(self, run_id):
        self.run_id = run_id


def test_rows_are_written_as_runs_finish_and_read_back_on_resume(tmp_path):
    with RunStore(tmp_path) as store:
        assert store.rows == [] and store.todo([Planned("a"), Planned("b")])[0].run_id == "a"
        store.checkpoint_path("a").write_bytes(b"in progress")
        store.record({"run_id": "a", "bits": 1.5})
        assert not store.checkpoint_path("a").exists()  # a finished run keeps no checkpoint
        assert [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()] == [
            {"run_id": "a", "bits": 1.5}
        ]
    with RunStore(tmp_path) as store:
        assert [r.run_id for r in store.todo([Planned("a"), Planned("b")])] == ["b"]
        store.record({"run_id": "b", "bits": 2.5})
        store.record({"run_id": "old", "bits": 0.0})  # a row of another plan: kept, not used
        assert [r["run_id"] for r in store.rows_of([Planned("b"), Planned("a")])] == ["a", "b"]
    assert len((tmp_path / "runs.jsonl").read_text().splitlines()) == 3
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # atomic writes leave no temporaries


def test_a_folder_is_written_by_one_store_at_a_time(tmp_path):
    with RunStore(tmp_path):
        with pytest.raises(ConfigError, match="another memk run is writing to"):
            RunStore(tmp_path).__enter__()
    with RunStore(tmp_path):  # released when the first one closed
        pass


def test_an_unwritable_folder_is_a_config_error(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(ConfigError, match="cannot write to output folder.*--out"):
        RunStore(tmp_path / "file" / "runs").__enter__()


def test_json_files_round_trip_and_a_missing_one_is_none(tmp_path):
    with RunStore(tmp_path) as store:
        assert store.read_json("prediction.json") is None
        store.write_json("prediction.json", {"plan_id": "p", "law": None})
        assert store.read_json("prediction.json") == {"plan_id": "p", "law": None}


def test_provenance_names_device_backends_torch_and_the_finish_time():
    p = provenance(Backends("sdpa", "fused"), torch.device("cpu"))
    assert p["device"] == "cpu" and p["attention_backend"] == "sdpa" and p["logprob_backend"] == "fused"
    assert p["torch"] == torch.__version__ and p["finished_at"].endswith("Z")
