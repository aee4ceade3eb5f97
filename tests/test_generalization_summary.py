"""run-generalization's summary on hand-made rows: the peaks, the F1 law's check, the reference check."""

import json
from dataclasses import fields
from pathlib import Path

import pytest

from memk.memorize.experiments.generalization_summary import GeneralizationRow, format_summary, summarize

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _row(run_id, role, name, n, ratio, heldout, unintended, f1, exact=None):
    row = {
        "run_id": run_id, "role": role, "model_name": name, "parameters": 100, "capacity_bits": 1000.0,
        "n_sequences": n, "size_factor": ratio, "dataset_bits": 1000.0 * ratio, "dataset_over_capacity": ratio,
        "capacity_over_dataset": 1 / ratio, "train_bits_per_token": 1.0, "heldout_bits_per_token": heldout,
        "total_memorization_bits": 500.0, "unintended_bits": unintended, "unintended_reference_bits": unintended,
        "generalization_bits": 500.0 - unintended, "f1": f1, "auc": f1, "steps": 10, "stop_reason": "plateau",
        "model": {}, "attack": {}, "train_seconds": 1.0, "train_config": {},
    }
    if exact is not None:
        row["unintended_exact_bits"] = exact
    return row


def test_summary_finds_the_peaks_and_compares_predictions_with_measurements():
    rows = [
        _row("a1", "sweep", "A", 10, 0.25, 5.0, 30.0, 1.0, exact=20.0),
        _row("a2", "sweep", "A", 20, 0.5, 9.0, 60.0, 1.0, exact=60.0),  # both peaks here: interior
        _row("a3", "sweep", "A", 40, 1.0, 4.0, 10.0, 0.9, exact=20.0),
        _row("a4", "sweep", "A", 80, 2.0, 3.0, 0.0, 0.6, exact=0.0),
        _row("c1", "check", "C", 30, 1.5, 2.0, 5.0, 0.7, exact=0.0),
    ]
    prediction = {"law": None, "made_at": "t", "predictions": [
        {"run_id": "c1", "model_name": "C", "n_sequences": 30, "capacity_over_dataset": 1 / 1.5, "predicted_f1": 0.75}]}
    summary = summarize(rows, prediction)
    a, c = summary["models"]
    assert a["heldout_peak_dataset_over_capacity"] == 0.5 and a["heldout_peak_is_interior"]
    assert a["unintended_peak_dataset_over_capacity"] == 0.5 and a["unintended_peak_bits"] == 60.0
    assert not c["heldout_peak_is_interior"]  # a single run has no interior
    check = summary["prediction_check"]["checks"][0]
    assert check["measured_f1"] == 0.7 and check["error"] == pytest.approx(-0.05)
    rc = summary["reference_check"]  # estimate 105 bits against exact 100
    assert rc["total_unintended_reference_bits"] == 105.0 and rc["total_unintended_exact_bits"] == 100.0
    assert rc["relative_error_of_total"] == pytest.approx(0.05)
    assert "F1 law" in format_summary({**summary, "source": {"source": "s"}, "source_bits_per_sequence": 1.0,
                                           "alpha": {"value": 2.0, "source": "x"},
                                           "reference": {"model_name": "r", "trained_on_sequences": 1,
                                                         "heldout_bits_per_token": 1.0}})


@pytest.mark.parametrize("run, exact", [("generalization-default", False), ("generalization-markov", True)])
def test_a_row_of_runs_jsonl_reads_as_a_generalization_row_and_writes_back_key_for_key(run, exact):
    for line in (DOCS / run / "runs.jsonl").read_text().splitlines()[:3]:
        stored = json.loads(line)
        written = GeneralizationRow.from_dict(stored).to_dict()
        assert list(stored)[: len(written)] == list(written)  # the stored row's keys in its order, then provenance
        assert written == {k: stored[k] for k in written}
        assert ("unintended_exact_bits" in written) == exact  # only where the generator is known
    names = [f.name for f in fields(GeneralizationRow)]
    assert list(written) == (names if exact else [n for n in names if n != "unintended_exact_bits"])
