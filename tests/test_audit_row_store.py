"""The audit's samples.jsonl and resume (memorize/audit/row_store.py): an interrupted audit resumes without coding
a finished sample again, never mixes rows of other models or settings, sets damaged rows aside; its pieces
against known answers. On the demo's GPT-2s (memk.bench.audit_demo), nothing downloaded."""

import datetime
import hashlib
import json
import os
import shutil
from types import SimpleNamespace

import pytest

from memk.cli.main import main as memk_main
from memk.memorize.audit import audit as audit_module
from memk.memorize.audit import row_store
from memk.memorize.audit.audit import AuditSettings, audit
from memk.memorize.errors import ConfigError

transformers = pytest.importorskip("transformers")
FAST = AuditSettings(bootstrap=200)


def run_memk(capsys, *args):
    with pytest.raises(SystemExit) as exit_:
        memk_main(["audit", *args, "--no-progress"])
    return exit_.value.code, capsys.readouterr().err


def test_an_interrupted_audit_resumes_without_redoing_finished_samples_and_never_mixes_settings(demo, texts, tmp_path):
    members, nonmembers = texts[0][:6], texts[1][:6]
    args = dict(reference=str(demo["base"]), out=tmp_path, settings=FAST, progress=False)
    first = audit(str(demo["finetuned"]), members, nonmembers, **args)
    lines = (tmp_path / "samples.jsonl").read_text().splitlines()
    kept = [json.loads(line) for line in lines[:5]]
    kept[0]["model_bits"] = 12345.0  # a mark: a row coded again would lose it
    # As a kill leaves it: five whole rows and a cut-off sixth.
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept) + lines[5][:40])

    resumed = audit(str(demo["finetuned"]), members, nonmembers, **args)
    marked = next(r for r in resumed.samples if (r["set"], r["index"]) == (kept[0]["set"], kept[0]["index"]))
    assert marked["model_bits"] == 12345.0
    assert [r for r in resumed.samples if r is not marked] == [r for r in first.samples
                                                                if (r["set"], r["index"]) != (marked["set"], marked["index"])]
    assert len((tmp_path / "samples.jsonl").read_text().splitlines()) == 12

    other = audit(str(demo["finetuned"]), members, nonmembers, **{**args, "settings": AuditSettings(bootstrap=200, min_k=0.5)})
    assert all(r["model_bits"] != 12345.0 for r in other.samples)  # the other settings' rows were not reused
    assert list(tmp_path.glob("samples.jsonl.other-*"))


def small_sets(texts):
    return texts[0][:3], texts[1][:3]


def no_scoring(*args, **kwargs):
    raise AssertionError("a text was coded again")


def sample_lines(out):
    return (out / "samples.jsonl").read_bytes().split(b"\n")[:-1]


def in_order(rows):
    return sorted(rows, key=lambda r: (r["set"], r["index"]))


def test_the_same_command_again_on_a_finished_audit_rewrites_the_summary_and_codes_nothing(demo, texts, tmp_path,
                                                                                            capsys, monkeypatch):
    members, nonmembers = small_sets(texts)
    (tmp_path / "m.txt").write_text("\n".join(members) + "\n")
    (tmp_path / "n.txt").write_text("\n".join(nonmembers) + "\n")
    command = ["--model", str(demo["finetuned"]), "--reference", str(demo["base"]), "--members", str(tmp_path / "m.txt"),
               "--non-members", str(tmp_path / "n.txt"), "--out", str(tmp_path / "out"), "--bootstrap", "0", "--top", "2"]
    code, err = run_memk(capsys, *command)
    assert code in (0, None), err
    rows = sample_lines(tmp_path / "out")
    monkeypatch.setattr(audit_module, "score_texts", no_scoring)  # every row is there: nothing to code
    code, err = run_memk(capsys, *command)
    assert code in (0, None), err
    assert len(json.loads((tmp_path / "out" / "audit.json").read_text())["top"]) == 2
    # As a kill after the last row and before the summary leaves it, then other summary settings.
    for name in ("audit.json", "report.html", "roc.png"):
        (tmp_path / "out" / name).unlink()
    code, err = run_memk(capsys, *command[:-4], "--bootstrap", "20", "--top", "5")
    assert code in (0, None), err
    summary = json.loads((tmp_path / "out" / "audit.json").read_text())
    assert len(summary["top"]) == 5 and summary["settings"]["bootstrap"] == 20
    assert all(len(a["auc_interval"]) == 2 for a in summary["attacks"].values())
    assert (tmp_path / "out" / "report.html").stat().st_size > 0
    assert sample_lines(tmp_path / "out") == rows


def test_a_second_audit_into_the_folder_an_audit_is_writing_is_refused(demo, texts, tmp_path, monkeypatch):
    members, nonmembers = small_sets(texts)
    score, calls, refusals = audit_module.score_texts, [], []

    def score_while_another_starts(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the first chunk's rows are in samples.jsonl: another audit starts into the folder
            with pytest.raises(ConfigError, match="another memk run is writing to") as refused:
                audit(str(demo["base"]), members, nonmembers, out=tmp_path, settings=AuditSettings(bootstrap=0),
                      progress=False)
            refusals.append(refused)
        return score(*args, **kwargs)

    monkeypatch.setattr(audit_module, "score_texts", score_while_another_starts)
    result = audit(str(demo["finetuned"]), members, nonmembers, out=tmp_path,
                   settings=AuditSettings(bootstrap=0, chunk=2), progress=False)
    assert len(refusals) == 1
    assert not list(tmp_path.glob("samples.jsonl.*"))  # nothing of the first audit was set aside
    written = in_order(json.loads(line) for line in sample_lines(tmp_path))
    assert len(written) == 6 and written == in_order(result.samples)


def test_audits_of_other_keys_set_aside_within_one_second_are_all_kept(demo, texts, tmp_path, monkeypatch):
    class SameSecond(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime.datetime(2026, 11, 27, 12, 0, 0, tzinfo=tz)

    monkeypatch.setattr(row_store, "datetime", type("clock", (), {"datetime": SameSecond,
                                                                     "timezone": datetime.timezone}))
    members, nonmembers = texts[0][:2], texts[1][:2]
    keys = []
    for min_k in (0.1, 0.2, 0.3, 0.4):  # four keys
        audit(str(demo["finetuned"]), members, nonmembers, out=tmp_path, settings=AuditSettings(bootstrap=0, min_k=min_k),
              progress=False)
        keys.append(json.loads(sample_lines(tmp_path)[0])["key"])
    aside = sorted(tmp_path.glob("samples.jsonl.other-*"))
    assert len(set(keys)) == 4 and len(aside) == 3
    assert sorted(json.loads(p.read_text().splitlines()[0])["key"] for p in aside) == sorted(keys[:3])


def test_weights_changed_in_place_with_the_same_size_and_date_are_coded_again(demo, texts, tmp_path):
    members, nonmembers = small_sets(texts)
    model = tmp_path / "model"
    shutil.copytree(demo["finetuned"], model)
    weights, base_weights = model / "model.safetensors", (demo["base"] / "model.safetensors").read_bytes()
    before = weights.stat()
    assert len(base_weights) == before.st_size
    settings = AuditSettings(bootstrap=0)
    first = audit(str(model), members, nonmembers, out=tmp_path / "out", settings=settings, progress=False)
    weights.write_bytes(base_weights)  # the base's weights, under the fine-tuned one's size and date
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (weights.stat().st_size, weights.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    again = audit(str(model), members, nonmembers, out=tmp_path / "out", settings=settings, progress=False)
    base = audit(str(demo["base"]), members, nonmembers, settings=settings, progress=False)
    assert [r["model_bits"] for r in again.samples] == pytest.approx([r["model_bits"] for r in base.samples], rel=1e-6)
    assert all(a["model_bits"] < b["model_bits"] - 50 for a, b in zip(first.samples[:3], again.samples[:3]))


def _list_line(rows):
    return rows[:1] + [b"[1, 2]"] + rows[2:], 2, b"[1, 2]"


def _row_missing_a_field(rows):
    row = json.loads(rows[1])
    del row["model_bits"]
    line = json.dumps(row).encode()
    return rows[:1] + [line] + rows[2:], 2, line


def _non_utf8_tail(rows):
    return rows + [b'\xff\xfe{"key": "cut'], len(rows) + 1, b'\xff\xfe{"key": "cut'


@pytest.mark.parametrize("damage", [_list_line, _row_missing_a_field, _non_utf8_tail])
def test_a_damaged_sample_row_is_set_aside_with_a_warning_and_coded_again(demo, texts, tmp_path, capsys, damage):
    members, nonmembers = small_sets(texts)
    args = dict(reference=str(demo["base"]), out=tmp_path, settings=AuditSettings(bootstrap=0), progress=False)
    first = audit(str(demo["finetuned"]), members, nonmembers, **args)
    lines, number, bad = damage(sample_lines(tmp_path))
    (tmp_path / "samples.jsonl").write_bytes(b"".join(line + b"\n" for line in lines[:-1]) + lines[-1])
    capsys.readouterr()
    again = audit(str(demo["finetuned"]), members, nonmembers, **args)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"samples.jsonl line {number} is damaged" in err[0] and "coded again" in err[0], err
    assert (tmp_path / "samples.jsonl.damaged").read_bytes() == bad + b"\n"
    assert [(r["set"], r["index"], r["sha1"]) for r in again.samples] == [(r["set"], r["index"], r["sha1"])
                                                                          for r in first.samples]
    assert [r["model_bits"] for r in again.samples] == pytest.approx([r["model_bits"] for r in first.samples], rel=1e-6)
    assert in_order(json.loads(line) for line in sample_lines(tmp_path)) == in_order(again.samples)


# --------------------------------------------------------------------------- the pieces, against known answers


def test_a_rows_sha1_is_the_sha1_of_the_texts_utf8_bytes():
    assert row_store.text_sha1("abc") == "a9993e364706816aba3e25717850c26c9cd0d89d"  # FIPS 180-2's example
    assert row_store.text_sha1("é\u2028") == hashlib.sha1("é\u2028".encode("utf-8")).hexdigest()


def test_the_key_is_a_digest_of_the_format_the_models_identities_and_the_settings():
    def digest(obj):  # memk's content_digest: 8 hex digits of SHA-1 over canonical JSON
        return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:8]

    model, ref, other = ({"spec": name, "weights": name * 2} for name in ("m", "r", "o"))
    held = SimpleNamespace(fingerprint=model)
    refs = [SimpleNamespace(fingerprint=ref), SimpleNamespace(fingerprint=other)]
    assert row_store.audit_key(held, [], {"min_k": 0.2}) == digest([2, model, None, {"min_k": 0.2}])
    assert row_store.audit_key(held, refs[:1], {"min_k": 0.2}) == digest([2, model, ref, {"min_k": 0.2}])
    assert row_store.audit_key(held, refs, {"min_k": 0.2}) == digest([2, model, [ref, other], {"min_k": 0.2}])
    assert row_store.audit_key(held, [], {"min_k": 0.3}) != row_store.audit_key(held, [], {"min_k": 0.2})


def a_row(key, kind, index, text):
    return {"key": key, "set": kind, "index": index, "sha1": row_store.text_sha1(text), "chars": len(text),
            "bytes": len(text), "zlib_bits": 8, "model_tokens": 1, "model_bits": 1.5, "reference_tokens": None,
            "reference_bits": None, "mem_u_bits": None, "attacks": {"loss": -1.5}, "extraction": None, "text": text}


def test_loading_keeps_the_wanted_rows_sets_damage_aside_and_another_audits_file_whole(tmp_path, capsys):
    path = tmp_path / row_store.SAMPLES
    kept, changed = a_row("k", "member", 0, "a"), a_row("k", "member", 1, "b")
    no_text = {**a_row("k", "non-member", 0, "c"), "text": 3}
    path.write_text("".join(json.dumps(r) + "\n" for r in (kept, changed, no_text)) + '{"key": "k", "set"')
    wanted = {("member", 0): row_store.text_sha1("a"), ("member", 1): row_store.text_sha1("b, edited"),
              ("non-member", 0): row_store.text_sha1("c")}
    assert row_store.load_rows(path, "k", wanted) == [kept]
    assert path.read_text() == json.dumps(kept) + "\n"  # the row of an edited text is dropped: coded again
    assert len((tmp_path / "samples.jsonl.damaged").read_text().splitlines()) == 2
    assert "line 3, 4 is damaged" in capsys.readouterr().err
    path.write_text(json.dumps(a_row("other", "member", 0, "a")) + "\n")
    assert row_store.load_rows(path, "k", wanted) == [] and not path.exists()
    [aside] = tmp_path.glob("samples.jsonl.other-*")
    assert json.loads(aside.read_text())["key"] == "other"
    assert row_store.load_rows(tmp_path / "none.jsonl", "k", wanted) == []


def test_rows_are_appended_as_whole_lines(tmp_path):
    path = tmp_path / row_store.SAMPLES
    rows = [a_row("k", "member", i, t) for i, t in enumerate(("x", "y\nz"))]
    row_store.append_rows(path, rows[:1])
    row_store.append_rows(path, rows[1:])
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows


def test_a_refused_start_removes_the_folders_it_made_only_while_empty(tmp_path):
    out = tmp_path / "a" / "b"
    created = row_store.new_folders(out)
    assert created == [out, tmp_path / "a"] and row_store.new_folders(tmp_path) == []
    row_store.prepare_output(out)
    (out / "kept").write_text("")
    row_store.remove_if_empty(created)
    assert (out / "kept").is_file()  # a folder holding a file stays, and so do those around it
    (out / "kept").unlink()
    row_store.remove_if_empty(created)
    assert not (tmp_path / "a").exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="is not writable"):
        row_store.prepare_output(tmp_path / "file" / "out")
