"""What an audit records for a pipeline (memorize/audit/records.py): samples.csv against samples.jsonl and
hand-made rows, and audit.json's provenance against the files' digests, on a tiny GPT-2 built here."""

import csv
import hashlib
import io
import json
import subprocess
from pathlib import Path

import pytest
import torch

from memk.bench.audit_demo import char_tokenizer, new_gpt2, random_texts
from memk.cli.main import main as memk_main
from memk.memorize.audit import records
from memk.memorize.audit.records import samples_csv


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("records")
    tokenizer = char_tokenizer()
    new_gpt2(len(tokenizer), 64, 5, d_model=16, layers=1, heads=2).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    (root / "members.txt").write_text("\n".join(random_texts(6, 12, seed=1)) + "\n")
    # Quotes, commas and a lone "\r" in one sample: samples.csv must keep it one cell.
    (root / "non_members.txt").write_text("\n".join(random_texts(6, 12, seed=2) + ['say "a, b"\rend']) + "\n")
    return root


def run_audit(tiny, out, *extra):
    return memk_main(["audit", "--model", str(tiny / "model"), "--members", str(tiny / "members.txt"),
                      "--non-members", str(tiny / "non_members.txt"), "--out", str(out), "--bootstrap", "20",
                      "--no-progress", *extra])


def test_samples_csv_is_one_quoted_row_per_sample_with_attack_columns_and_the_text_last(tiny, tmp_path):
    with pytest.raises(SystemExit):
        run_audit(tiny, tmp_path / "c", "--recall-shots", "1")
    rows = [json.loads(line) for line in (tmp_path / "c" / "samples.jsonl").read_text().splitlines()]
    with open(tmp_path / "c" / "samples.csv", newline="", encoding="utf-8") as f:
        table = list(csv.reader(f))
    header, body = table[0], table[1:]
    assert header[-1] == "text" and "key" not in header
    assert {"attack.loss", "attack.dc_pdd", "attack.recall", "model_bits"} <= set(header)
    order = {(r["set"], r["index"]): r for r in rows}
    assert len(body) == len(rows)
    for cells in body:
        row = order[(cells[0], int(cells[1]))]
        record = dict(zip(header, cells))
        assert record["text"] == row["text"]
        assert float(record["model_bits"]) == row["model_bits"]  # every digit kept
        for name, score in row["attacks"].items():
            assert float(record[f"attack.{name}"]) == score
        if "recall" not in row["attacks"]:
            assert record["attack.recall"] == ""  # ReCaLL's prefix non-member
    assert any('"a, b"' in cells[-1] and "\r" in cells[-1] for cells in body)


def test_samples_csv_flattens_nested_fields_and_leaves_absent_cells_empty():
    text = samples_csv([{"key": "k", "set": "member", "a": None, "b": {"x": 1, "y": [1, 2]}, "attacks": {"loss": 0.5},
                         "text": "t,1"}, {"key": "k", "set": "non-member", "b": None, "c": True, "attacks": {},
                                          "text": "t2"}])
    assert list(csv.reader(io.StringIO(text))) == [
        ["set", "a", "b.x", "b.y", "attack.loss", "c", "text"],
        ["member", "", "1", "[1, 2]", "0.5", "", "t,1"], ["non-member", "", "", "", "", "true", "t2"]]


def test_audit_json_records_version_commit_model_and_data_digests_settings_and_timings(tiny, tmp_path):
    with pytest.raises(SystemExit):
        run_audit(tiny, tmp_path / "d", "--fail-if", "f1>1")
    summary = json.loads((tmp_path / "d" / "audit.json").read_text())
    prov = summary["provenance"]

    def blake2b(path):
        return hashlib.blake2b(Path(path).read_bytes(), digest_size=16).hexdigest()

    from importlib.metadata import version
    assert prov["memk_version"] == version("memk")
    import memk.memorize
    root = Path(memk.memorize.__file__).resolve().parent.parent
    git = subprocess.run(["git", "-C", str(root), "rev-parse", "--show-toplevel"], capture_output=True, text=True)
    if git.returncode == 0 and Path(git.stdout.strip()).resolve() == root:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True)
        assert prov["memk_git"]["commit"] == head.stdout.strip()
    else:
        assert prov["memk_git"] is None
    weights = prov["models"]["model"]["blake2b"]
    assert weights and all(blake2b(tiny / "model" / name) == d for name, d in weights.items())
    assert prov["models"]["reference"] is None
    data = {d["role"]: d for d in prov["data"]}
    assert data["members"]["file_blake2b"] == blake2b(tiny / "members.txt") and data["members"]["texts"] == 6
    assert data["non-members"]["file_blake2b"] == blake2b(tiny / "non_members.txt")
    assert summary["settings"]["bootstrap"] == 20 and summary["settings"]["recall_shots"] == 0
    seconds = summary["timings"]["seconds"]
    assert set(seconds) >= {"load_models", "prepare", "score", "extraction", "recall_dc_pdd", "summarize"}
    assert all(v >= 0 for v in seconds.values())


def test_the_digests_are_blake2b_of_the_files_bytes_and_of_the_texts_with_their_lengths(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"one\ntwo\n")
    assert records.file_digest(str(tmp_path / "a.txt")) == hashlib.blake2b(b"one\ntwo\n", digest_size=16).hexdigest()
    assert records.file_digest(None) is None and records.file_digest(str(tmp_path)) is None  # a folder: no file
    digest = hashlib.blake2b(digest_size=16)
    for text in ("ab", "é"):
        digest.update(len(text.encode()).to_bytes(8, "little") + text.encode())
    assert records.texts_digest(["ab", "é"]) == digest.hexdigest()
    assert records.texts_digest(["a", "b"]) != records.texts_digest(["ab"])  # the lengths keep texts apart
    record = records.data_record("members", ["ab", "é"], str(tmp_path / "a.txt"))
    assert record == {"role": "members", "source": str(tmp_path / "a.txt"),
                      "file_blake2b": records.file_digest(str(tmp_path / "a.txt")), "texts": 2,
                      "texts_blake2b": digest.hexdigest()}
