"""Atomic writes, a full disk as one clear error, temporaries, damaged state files set aside."""

import errno
import json

import pytest

from memk.memorize import outputs
from memk.memorize.errors import DiskFull


def test_an_atomic_write_leaves_the_old_file_whole_when_it_fails(tmp_path):
    path = tmp_path / "rows.jsonl"
    outputs.atomic_write_text(path, "old\n")

    def half_then_fail(tmp):
        tmp.write_text("ne")
        raise ValueError("killed")

    with pytest.raises(ValueError):
        outputs.atomic_write(path, half_then_fail)
    assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["rows.jsonl"]


def test_a_full_disk_is_one_error_naming_the_file(tmp_path):
    def no_space(tmp):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFull, match=r"no space left on the device writing .*summary.json; free some space"):
        outputs.atomic_write(tmp_path / "summary.json", no_space)


def test_a_failed_write_on_a_nearly_full_disk_is_taken_for_a_full_disk(tmp_path, monkeypatch):
    def torch_save_failing(tmp):  # torch.save reports ENOSPC as a RuntimeError
        raise RuntimeError("[enforce fail at inline_container.cc] . PytorchStreamWriter failed writing file")

    usage = type("Usage", (), {"free": 1024})
    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda folder: usage)
    with pytest.raises(DiskFull):
        outputs.atomic_write(tmp_path / "run.pt", torch_save_failing)
    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda folder: type("Usage", (), {"free": 2**40}))
    with pytest.raises(RuntimeError, match="PytorchStreamWriter"):  # plenty of space: the error is not ours
        outputs.atomic_write(tmp_path / "run.pt", torch_save_failing)


def test_temporaries_are_found_at_any_depth(tmp_path):
    (tmp_path / "reference").mkdir()
    (tmp_path / "reference" / ".bits.npz.tmp-77").write_bytes(b"x")
    (tmp_path / ".runs.jsonl.tmp-78").write_bytes(b"x")
    (tmp_path / "runs.jsonl").write_text("")
    assert outputs.remove_temporaries(tmp_path) == 2 and (tmp_path / "runs.jsonl").exists()


def test_read_state_sets_a_damaged_file_aside_with_one_warning(tmp_path, capsys):
    path = tmp_path / "reference.json"
    load = lambda p: json.loads(p.read_text())  # noqa: E731
    assert outputs.read_state(path, load, "reference description", "and it is trained again") is None  # none yet
    path.write_text('{"reference_id": "ab')
    assert outputs.read_state(path, load, "reference description", "and it is trained again") is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "reference description" in err[0] and "is damaged (JSONDecodeError" in err[0]
    assert (tmp_path / "reference.json.damaged").read_text() == '{"reference_id": "ab' and not path.exists()
    path.write_text('{"reference_id": "ab"}')
    assert outputs.read_state(path, load, "reference description", "x") == {"reference_id": "ab"}


def test_content_digest_is_order_free_for_keys_and_short():
    assert outputs.content_digest({"a": 1, "b": [1, 2]}) == outputs.content_digest({"b": [1, 2], "a": 1})
    assert outputs.content_digest([1, 2]) != outputs.content_digest([2, 1]) and len(outputs.content_digest(0)) == 8
