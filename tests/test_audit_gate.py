"""`memk audit --fail-if` (memorize/audit/gate.py): the limits' grammar and values against hand-made summaries,
the outcome audit.json records, and the command's exit status on a tiny GPT-2 built here."""

import json

import pytest
import torch

from memk.bench.audit_demo import char_tokenizer, new_gpt2, random_texts
from memk.cli.main import main as memk_main
from memk.memorize.audit import gate as audit_gate
from memk.memorize.audit.audit import AuditSettings, audit
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


# --------------------------------------------------------------------------- the outcome audit.json records


def test_the_outcome_records_each_limit_its_measured_value_and_the_result():
    limits = audit_gate.parse_limits(["auc > 0.75,f1<0.5", "mem_u_bits_max>=120", "auc[loss]>0.75"])
    record = audit_gate.outcome(limits, SUMMARY, ROWS)
    assert record == {"result": "fail", "exit_status": 1, "limits": [
        {"condition": "auc>0.75", "metric": "auc", "op": ">", "threshold": 0.75, "measured": 0.8,
         "measured_from": "highest over the attacks: Min-K%", "result": "fail"},
        {"condition": "f1<0.5", "metric": "f1", "op": "<", "threshold": 0.5, "measured": 0.66,
         "measured_from": "the loss attack, median rule", "result": "pass"},
        {"condition": "mem_u_bits_max>=120", "metric": "mem_u_bits_max", "op": ">=", "threshold": 120.0,
         "measured": 120.0, "measured_from": "member text 1", "result": "fail"},
        {"condition": "auc[loss]>0.75", "metric": "auc[loss]", "op": ">", "threshold": 0.75, "measured": 0.7,
         "measured_from": "loss", "result": "pass"}]}
    assert audit_gate.failures(record) == ["auc 0.8 > 0.75 (highest over the attacks: Min-K%)",
                                           "mem_u_bits_max 120 >= 120 (member text 1)"]
    passing = audit_gate.outcome(audit_gate.parse_limits(["auc>0.9"]), SUMMARY, ROWS)
    assert (passing["result"], passing["exit_status"], passing["limits"][0]["measured"]) == ("pass", 0, 0.8)
    assert audit_gate.failures(passing) == []
    assert audit_gate.outcome([], SUMMARY, ROWS) is None and audit_gate.failures(None) == []


def test_audit_json_records_the_fail_if_outcome_the_exit_status_follows(tiny, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        run_audit(tiny, tmp_path / "e", "--fail-if", "auc>=0,auc[loss]>1", "--fail-if", "extracted_rate<=1")
    assert exit_.value.code == 1
    summary = json.loads((tmp_path / "e" / "audit.json").read_text())
    record, members = summary["fail_if"], summary["extraction"]["member"]
    best = max(a["auc"] for a in summary["attacks"].values())
    assert (record["result"], record["exit_status"]) == ("fail", 1)
    assert [(c["condition"], c["result"]) for c in record["limits"]] == [
        ("auc>=0", "fail"), ("auc[loss]>1", "pass"), ("extracted_rate<=1", "fail")]
    assert [c["measured"] for c in record["limits"]] == [
        best, summary["attacks"]["loss"]["auc"], members["extracted_any"] / members["samples"]]
    assert summary["settings"]["fail_if"] == ["auc>=0,auc[loss]>1", "extracted_rate<=1"]
    assert capsys.readouterr().err.strip() == audit_gate.failure_line(audit_gate.failures(record))
    with pytest.raises(SystemExit) as exit_:  # the same audit again (nothing coded), another limit
        run_audit(tiny, tmp_path / "e", "--fail-if", "auc>1")
    assert exit_.value.code == 0
    record = json.loads((tmp_path / "e" / "audit.json").read_text())["fail_if"]
    assert (record["result"], record["exit_status"], record["limits"][0]["measured"]) == ("pass", 0, best)
    with pytest.raises(SystemExit) as exit_:
        run_audit(tiny, tmp_path / "e")
    assert exit_.value.code == 0 and json.loads((tmp_path / "e" / "audit.json").read_text())["fail_if"] is None


def test_the_audit_refuses_a_limit_it_will_not_compute_before_coding_a_text(tiny, monkeypatch):
    from memk.memorize.audit import audit as audit_module

    def no_scoring(*args, **kwargs):
        raise AssertionError("a text was coded")

    monkeypatch.setattr(audit_module, "score_texts", no_scoring)
    texts = random_texts(4, 12, seed=5)
    for limit, says in (("auc[reference]>0.5", "needs --reference"), ("mem_u_bits>1", "needs a reference"),
                        ("auc[recall]>0.5", "needs --recall-shots")):
        with pytest.raises(ConfigError, match=says):
            audit(str(tiny / "model"), texts[:2], texts[2:], settings=AuditSettings(bootstrap=0, fail_if=(limit,)),
                  progress=False)
    with pytest.raises(ConfigError, match="METRIC OP NUMBER"):
        AuditSettings(fail_if=("auc=1",)).check()
