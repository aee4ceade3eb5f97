"""Several references in `memk audit` (memorize/audit/references.py): each sample coded by the best, each reported
alone, against audits with each reference alone (the demo's GPT-2s, memk.bench.audit_demo); the row and set
fields against hand-made scores."""

import json
from types import SimpleNamespace

import numpy as np
import pytest

from memk.memorize.audit import references
from memk.memorize.audit.audit import AuditSettings, audit


def test_several_references_code_each_sample_with_the_best_and_report_each(demo, texts, tmp_path):
    from memk.memorize.membership import roc_auc

    members, nonmembers = texts[0][:4], texts[1][:4]
    settings = AuditSettings(bootstrap=0, extract_prefixes=())
    refs = [str(demo["base"]), str(demo["finetuned"])]  # the base codes non-members best, the fine-tune members
    both = audit(str(demo["finetuned"]), members, nonmembers, reference=refs, out=tmp_path, settings=settings,
                 progress=False)
    alone = [audit(str(demo["finetuned"]), members, nonmembers, reference=r, settings=settings, progress=False)
             for r in refs]
    for n, row in enumerate(both.samples):
        each = [a.samples[n] for a in alone]
        assert [r["bits"] for r in row["references"]] == pytest.approx([e["reference_bits"] for e in each], rel=1e-12)
        best = int(np.argmin([e["reference_bits"] for e in each]))  # -log2 max_R p_R(x): the shortest code
        assert row["best_reference"] == best and row["reference_tokens"] == each[best]["reference_tokens"]
        assert row["reference_bits"] == pytest.approx(min(e["reference_bits"] for e in each), rel=1e-12)
        assert row["mem_u_bits"] == pytest.approx(max(0.0, row["reference_bits"] - row["model_bits"]), abs=1e-9)
        for i, e in enumerate(each):
            assert row["references"][i]["mem_u_bits"] == pytest.approx(e["mem_u_bits"], abs=1e-9)
            assert row["attacks"][f"reference_{i + 1}"] == pytest.approx(e["attacks"]["reference"], abs=1e-9)
    assert {r["best_reference"] for r in both.samples} == {0, 1}
    assert [r["best_reference"] for r in both.samples if r["set"] == "member"] == [1] * 4
    summary = both.summary
    for name in ("member", "non-member"):
        group = [r for r in both.samples if r["set"] == name]
        assert summary["sets"][name]["unintended_memorization_bits"] == pytest.approx(
            sum(r["mem_u_bits"] for r in group))
        for i in range(2):
            assert summary["sets"][name]["references"][i]["unintended_memorization_bits"] == pytest.approx(
                alone[i].summary["sets"][name]["unintended_memorization_bits"])
    scores = [[r["reference_bits"] - r["model_bits"] for r in both.samples if r["set"] == s]
              for s in ("member", "non-member")]
    assert summary["attacks"]["reference"]["auc"] == pytest.approx(roc_auc(*scores))
    for i in range(2):
        assert summary["attacks"][f"reference_{i + 1}"]["auc"] == pytest.approx(
            alone[i].summary["attacks"]["reference"]["auc"])
    written = json.loads((tmp_path / "audit.json").read_text())
    assert written["reference"]["best_of"] == refs and [r["spec"] for r in written["references"]] == refs
    assert "Each reference alone" in (tmp_path / "report.html").read_text()
    # One reference: its rows and summary keep the format they had.
    assert not {"references", "best_reference"} & set(alone[0].samples[0])
    assert alone[0].summary["reference"]["spec"] == refs[0] and "reference_1" not in alone[0].summary["attacks"]


# --------------------------------------------------------------------------- the fields, against hand-made scores


def score(bits, tokens):
    return SimpleNamespace(bits=bits, tokens=tokens)  # what references.py reads of a TextScore


def test_a_rows_reference_fields_are_the_best_references_and_each_ones():
    assert references.reference_fields(10.0, []) == {}
    one = references.reference_fields(10.0, [score(25.0, 7)])
    assert one == {"reference_tokens": 7, "reference_bits": 25.0, "mem_u_bits": 15.0}
    several = references.reference_fields(10.0, [score(25.0, 7), score(8.0, 9), score(8.0, 4)])
    assert several == {"reference_tokens": 9, "reference_bits": 8.0, "mem_u_bits": 0.0, "best_reference": 1,  # the
                       "references": [{"tokens": 7, "bits": 25.0, "mem_u_bits": 15.0},  # first of a tie
                                      {"tokens": 9, "bits": 8.0, "mem_u_bits": 0.0},
                                      {"tokens": 4, "bits": 8.0, "mem_u_bits": 0.0}]}
    assert references.each_reference_attack({"model_bits": 10.0, **several}) == {
        "reference_1": 15.0, "reference_2": -2.0, "reference_3": -2.0}
    assert references.each_reference_attack({"model_bits": 10.0, **one}) == {}
    assert references.role_names(3) == ["reference", "reference_2", "reference_3"]


def test_each_references_set_totals_are_the_hand_sums():
    group = [{"best_reference": 0, "references": [{"tokens": 5, "bits": 30.0, "mem_u_bits": 10.0},
                                                  {"tokens": 6, "bits": 40.0, "mem_u_bits": 20.0}]},
             {"best_reference": 1, "references": [{"tokens": 4, "bits": 12.0, "mem_u_bits": 0.0},
                                                  {"tokens": 3, "bits": 9.0, "mem_u_bits": 1.0}]}]
    # uniform code 100 bits, H(X|M) 38 bits: generalization = 100 - 38 - Σ mem_U
    assert references.per_reference_sets(group, 2, 100.0, 38.0) == [
        {"reference_tokens": 9, "reference_bits": 42.0, "unintended_memorization_bits": 10.0,
         "mean_unintended_memorization_bits": 5.0, "samples_with_unintended_memorization": 1,
         "generalization_bits": 52.0, "best_for_samples": 1},
        {"reference_tokens": 9, "reference_bits": 49.0, "unintended_memorization_bits": 21.0,
         "mean_unintended_memorization_bits": 10.5, "samples_with_unintended_memorization": 2,
         "generalization_bits": 41.0, "best_for_samples": 1}]


def test_the_summarys_reference_is_the_one_or_what_the_best_of_several_is():
    a, b = {"spec": "a", "kind": "huggingface"}, {"spec": "b", "kind": "memk"}
    assert references.describe([]) is None and references.describe([a]) == a
    both = references.describe([a, b])
    assert (both["spec"], both["best_of"], both["kind"]) == ("best of a, b", ["a", "b"], "best of 2 references")
