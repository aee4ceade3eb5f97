"""`memk audit --fail-if`, samples.csv and audit.json's provenance: the limits' grammar and values against
hand-made summaries, and the command's exit status on a tiny GPT-2 built here."""

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
from memk.memorize.audit import gate as audit_gate
from memk.memorize.audit.records import samples_csv
from memk.memorize.errors import ConfigError

SUMMARY = {
    "attacks": {"loss": {"label": "loss", "auc": 0.7, "tpr_at_1pct_fpr": 0.05, "tpr_at_0.1pct_fpr": 0.0},
                "min_k": {"label": "Min-K%", "auc": 0.8, "tpr_at_1pct_fpr": 0.02, "tpr_at_0.1pct_fpr": 0.01}},
    "sets": {"member": {"samples": 3, "unintended_memorization_bits": 150.0, "mean_unintended_memorization_bits": 50.0}},
    "risk": {"measured_f1": {"f1": 0.66}, "predicted_f1": 0.9},
}
ROWS = [{"set": "member", "index": i, "mem_u_bits": b} for i, b in enumerate((10.0, 120.0, 20.0))] + [
    {"set": "non-member", "index": 0, "mem_u_bits": 500.0}]


def test_limits_parse_with_spaces_commas_and_an_attack():
    limits = audit_gate.parse_limits(["auc>0.6, mem_u_bits >= 100", "auc[loss]<0.5", "tpr_at_0.1pct_fpr<=1e-3"])
    assert [(l.metric, l.attack, l.op, l.value) for l in limits] == [
        ("auc", None, ">", 0.6), ("mem_u_bits", None, ">=", 100.0), ("auc", "loss", "<", 0.5),
        ("tpr_at_0.1pct_fpr", None, "<=", 0.001)]


@pytest.mark.parametrize("spec, says", [
    ("auc=0.6", "METRIC OP NUMBER"), ("auc>", "METRIC OP NUMBER"), ("bits>3", "unknown metric 'bits'"),
    ("auc>high", "not a number"), ("auc>nan", "finite"), ("mem_u_bits[loss]>1", "take an [attack]"),
    ("auc[lose]>0.5", "unknown attack 'lose'"), ("auc>0.6,", "empty limit"),
])
def test_a_malformed_limit_is_refused_naming_it(spec, says):
    with pytest.raises(ConfigError, match=says.replace("[", r"\[").replace("]", r"\]")):
        audit_gate.parse_limits([spec])


def test_limits_on_metrics_the_audit_will_not_compute_are_refused_before_it_runs():
    check = audit_gate.check_available
    with pytest.raises(ConfigError, match="needs a reference"):
        check(audit_gate.parse_limits(["mem_u_bits>1"]), reference=False, attacks={"loss"}, extraction=False)
    with pytest.raises(ConfigError, match="extraction was not run"):
        check(audit_gate.parse_limits(["extracted>0"]), reference=True, attacks={"loss"}, extraction=False)
    with pytest.raises(ConfigError, match="needs --reference"):
        check(audit_gate.parse_limits(["auc[reference]>0.5"]), reference=False, attacks={"loss"}, extraction=False)
    with pytest.raises(ConfigError, match="needs --recall-shots"):
        check(audit_gate.parse_limits(["auc[recall]>0.5"]), reference=False, attacks={"loss"}, extraction=False)
    with pytest.raises(ConfigError, match="needs several --reference"):
        check(audit_gate.parse_limits(["auc[reference_2]>0.5"]), reference=True, attacks={"reference"}, extraction=False)
    check(audit_gate.parse_limits(["auc[loss]>0.5,f1>0.9"]), reference=False, attacks={"loss"}, extraction=False)
    check(audit_gate.parse_limits(["auc[reference_2]>0.5"]), reference=True, attacks={"reference_2"}, extraction=False)


def test_each_metric_reads_its_field_and_auc_is_the_strongest_attack():
    values = {spec: audit_gate.value_of(audit_gate.parse_limits([spec])[0], SUMMARY, ROWS)[0] for spec in (
        "auc>0", "auc[loss]>0", "tpr_at_1pct_fpr>0", "tpr_at_0.1pct_fpr[loss]>0", "mem_u_bits>0",
        "mem_u_bits_mean>0", "mem_u_bits_max>0", "f1>0", "predicted_f1>0")}
    assert values == {"auc>0": 0.8, "auc[loss]>0": 0.7, "tpr_at_1pct_fpr>0": 0.05, "tpr_at_0.1pct_fpr[loss]>0": 0.0,
                      "mem_u_bits>0": 150.0, "mem_u_bits_mean>0": 50.0, "mem_u_bits_max>0": 120.0,  # members only
                      "f1>0": 0.66, "predicted_f1>0": 0.9}
    passed = audit_gate.passed(audit_gate.parse_limits(["auc>0.75,auc[loss]>0.75,mem_u_bits_max>=120,f1<0.5"]),
                               SUMMARY, ROWS)
    assert passed == ["auc 0.8 > 0.75 (highest over the attacks: Min-K%)", "mem_u_bits_max 120 >= 120 (member text 1)"]
    with pytest.raises(ConfigError, match="extraction was not run"):
        audit_gate.value_of(audit_gate.parse_limits(["extracted>0"])[0], SUMMARY, ROWS)
    extraction = {**SUMMARY, "extraction": {"member": {"samples": 3, "extracted_any": 2, "rate_any": 2 / 3},
                                            "non-member": {"samples": 1, "extracted_any": 1, "rate_any": 1.0}}}
    assert audit_gate.passed(audit_gate.parse_limits(["extracted>1,extracted_rate>0.5"]), extraction, ROWS) == [
        "extracted 2 > 1 (member texts extracted at some prefix length, of 3)",
        "extracted_rate 0.666667 > 0.5 (2 of 3 member texts extracted)"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("gate")
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


def test_a_passed_limit_exits_1_with_one_line_after_writing_the_results(tiny, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        run_audit(tiny, tmp_path / "a", "--fail-if", "auc>=0", "--fail-if", "auc[loss]>1")
    assert exit_.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("memk: audit: --fail-if limit passed: auc ")
    assert ">= 0" in err[0] and "auc[loss]" not in err[0]
    assert (tmp_path / "a" / "audit.json").is_file() and (tmp_path / "a" / "samples.csv").is_file()
    with pytest.raises(SystemExit) as exit_:
        run_audit(tiny, tmp_path / "a", "--fail-if", "auc>1,f1>1,extracted>6")
    assert exit_.value.code == 0 and capsys.readouterr().err == ""
    with pytest.raises(SystemExit) as exit_:
        run_audit(tiny, tmp_path / "a", "--fail-if", "extracted>=0")  # extraction is on by default
    assert exit_.value.code == 1 and "extracted 0 >= 0" in capsys.readouterr().err


@pytest.mark.parametrize("limit, says", [("auc>>1", "METRIC OP NUMBER"), ("mem_u_bits>1", "needs a reference"),
                                         ("extracted>0", "extraction was not run")])
def test_a_bad_limit_is_exit_2_before_any_work(tiny, tmp_path, capsys, limit, says):
    with pytest.raises(SystemExit) as exit_:
        run_audit(tiny, tmp_path / "b", "--fail-if", limit, "--no-extract")
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0]
    assert not (tmp_path / "b").exists()  # refused before the output folder, the texts or the model


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
