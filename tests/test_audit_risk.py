"""The risk that capacity predicts (memorize/audit/risk.py): the committed law and α against the files they
come from, the measured F1 against run-generalization's rule computed by hand, and the audit's risk block on a
tiny GPT-2 built here."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from memk.bench.audit_demo import char_tokenizer, new_gpt2, random_texts
from memk.memorize.audit import risk as audit_risk
from memk.memorize.audit.audit import AuditSettings, audit
from memk.memorize.audit.summary import format_table
from memk.memorize.errors import ConfigError
from memk.memorize.experiments.generalization import DEFAULT_ALPHA

REPO = Path(__file__).resolve().parent.parent
FIT = REPO / "docs" / "generalization-default"


@pytest.mark.skipif(not FIT.is_dir(), reason="needs the repository's docs/ (a source checkout)")
def test_the_committed_law_is_the_fit_in_docs_and_its_ratio_range_the_runs_it_was_fitted_on():
    summary = json.loads((FIT / "summary.json").read_text())
    law = audit_risk.COMMITTED_LAW
    for c in ("c1", "c2", "c3", "r2", "n_points"):
        assert law[c] == summary["f1_law"][c]
    assert law["alpha"] == summary["alpha"]["value"] == DEFAULT_ALPHA
    rows = [json.loads(line) for line in (FIT / "runs.jsonl").read_text().splitlines() if line.strip()]
    ratios = [r["capacity_over_dataset"] for r in rows if r["role"] == "sweep"]
    assert len(ratios) == law["n_points"]
    assert law["ratio_range"] == [min(ratios), max(ratios)]
    assert "docs/generalization-default/summary.json" in law["source"] and "2026-11-25" in law["source"]


def median_rule_f1(member_bits, nonmember_bits):
    """run-generalization's rule by hand (no ties): call the len(m) lowest of the pooled bits members."""
    pooled = sorted([(b, True) for b in member_bits] + [(b, False) for b in nonmember_bits])
    called = pooled[:len(member_bits)]
    tp = sum(is_member for _, is_member in called)
    precision = recall = tp / len(member_bits)
    return 0.0 if tp == 0 else 2 * precision * recall / (precision + recall)


def test_measured_f1_is_the_median_rule_on_bits_per_token():
    rng = np.random.default_rng(0)
    m, n = rng.normal(1.0, 1.0, 40), rng.normal(2.0, 1.0, 40)  # bits per token: members lower
    out = audit_risk.measured_f1(-m, -n, resamples=100, seed=0)  # the loss attack's scores are minus bits
    assert out["f1"] == pytest.approx(median_rule_f1(list(m), list(n)))
    assert out["interval"][0] <= out["f1"] <= out["interval"][1]
    assert out["balanced_size"] == 40


def test_measured_f1_of_unequal_sets_is_the_mean_over_balanced_draws():
    separated = audit_risk.measured_f1(-np.arange(5.0), -np.arange(10.0, 30.0), resamples=0, seed=0)
    assert separated["f1"] == 1.0 and separated["balanced_size"] == 5 and "interval" not in separated
    same = audit_risk.measured_f1(-np.ones(5), -np.ones(12), resamples=0, seed=0)
    assert same["f1"] == pytest.approx(0.5)  # all tied: chance
    a = audit_risk.measured_f1(np.arange(7.0), np.arange(3.0, 20.0), resamples=0, seed=4)
    assert a == audit_risk.measured_f1(np.arange(7.0), np.arange(3.0, 20.0), resamples=0, seed=4)


def test_capacity_risk_is_alpha_times_parameters_over_member_bits_through_the_law():
    law = audit_risk.COMMITTED_LAW
    risk = audit_risk.capacity_risk(1000, 800.0, [-1.0, -2.0], [-3.0, -4.0], alpha=2.0, alpha_source="test",
                                    law=law, resamples=0, seed=0)
    ratio = 2.0 * 1000 / 800.0
    assert risk["capacity_bits"] == 2000.0 and risk["capacity_over_member_bits"] == pytest.approx(ratio)
    sigmoid = 1.0 / (1.0 + math.exp(-law["c2"] * (ratio + law["c3"])))
    assert risk["predicted_f1"] == pytest.approx(0.5 * (1.0 + law["c1"] * sigmoid))
    assert risk["in_fitted_range"] is True and risk["measured_f1"]["f1"] == 1.0
    assert "note" in risk  # α 2 is not the law's 2.33: said
    far = audit_risk.capacity_risk(10**6, 800.0, [-1.0], [-3.0], alpha=law["alpha"], alpha_source="test", law=law,
                                   resamples=0, seed=0)
    assert far["in_fitted_range"] is False and "note" not in far
    none = audit_risk.capacity_risk(1000, None, [-1.0], [-3.0], alpha=2.0, alpha_source="t", law=law, resamples=0,
                                    seed=0)
    assert none["predicted_f1"] is None and none["capacity_over_member_bits"] is None


def test_alpha_from_a_capacity_summary_or_the_default_stated(tmp_path):
    alpha, source = audit_risk.load_alpha(None)
    assert alpha == DEFAULT_ALPHA and "default" in source
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"precisions": {"bfloat16": {"fit": {"through_origin": {"alpha": 3.5}}},
                                                  "float32": {"fit": {"through_origin": {"alpha": 3.8}}}}}))
    alpha, source = audit_risk.load_alpha(str(summary))
    assert alpha == 3.8 and "float32" in source and str(summary) in source
    summary.write_text(json.dumps({"precisions": {"bfloat16": {"fit": {"through_origin": {"alpha": 3.5}}}}}))
    assert audit_risk.load_alpha(str(summary))[0] == 3.5
    for bad in ("{}", "not json", json.dumps({"precisions": {"float32": {}}})):
        summary.write_text(bad)
        with pytest.raises(ConfigError, match="--capacity-summary"):
            audit_risk.load_alpha(str(summary))
    with pytest.raises(ConfigError, match="cannot read"):
        audit_risk.load_alpha(str(tmp_path / "missing.json"))


def test_a_law_from_a_run_generalization_summary(tmp_path):
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"f1_law": {"c1": 0.9, "c2": 10.0, "c3": -0.3, "r2": 0.99}, "alpha": {"value": 3.6}}))
    law = audit_risk.load_law(str(summary))
    assert (law["c1"], law["c2"], law["c3"], law["alpha"]) == (0.9, 10.0, -0.3, 3.6) and str(summary) in law["source"]
    summary.write_text(json.dumps({"f1_law": None}))
    with pytest.raises(ConfigError, match="--f1-law"):
        audit_risk.load_law(str(summary))


def test_the_audit_reports_capacity_member_bits_and_both_f1s(tmp_path):
    torch.set_num_threads(1)
    tokenizer = char_tokenizer()
    folders = {}
    for name, seed in (("model", 1), ("reference", 2)):
        folders[name] = tmp_path / name
        new_gpt2(len(tokenizer), 64, seed, d_model=16, layers=1, heads=2).save_pretrained(folders[name])
        tokenizer.save_pretrained(folders[name])
    members, nonmembers = random_texts(6, 12, seed=3), random_texts(9, 12, seed=4)
    result = audit(str(folders["model"]), members, nonmembers, reference=str(folders["reference"]),
                   settings=AuditSettings(bootstrap=20), device="cpu", progress=False)
    risk, rows = result.summary["risk"], result.samples
    module = new_gpt2(len(tokenizer), 64, 1, d_model=16, layers=1, heads=2)
    parameters = sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())  # tied weights once
    assert risk["parameters"] == parameters == result.summary["model"]["parameters"]
    assert risk["capacity_bits"] == pytest.approx(DEFAULT_ALPHA * parameters)
    member_bits = math.fsum(r["reference_bits"] for r in rows if r["set"] == "member")
    assert risk["member_bits"] == pytest.approx(member_bits)
    assert risk["capacity_over_member_bits"] == pytest.approx(DEFAULT_ALPHA * parameters / member_bits)
    loss = {s: [r["attacks"]["loss"] for r in rows if r["set"] == s] for s in ("member", "non-member")}
    assert risk["measured_f1"] == audit_risk.measured_f1(loss["member"], loss["non-member"], 20, 0)
    assert "capacity:" in format_table(result.summary) and "predicts" in format_table(result.summary)
