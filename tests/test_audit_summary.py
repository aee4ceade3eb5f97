"""audit.json's summary (memorize/audit/summary.py) against totals, AUCs and ranks computed by hand for four
hand-made rows, and the table `memk audit` prints from it."""

import datetime
from types import SimpleNamespace

import pytest

from memk.memorize.audit.attacks import ATTACKS
from memk.memorize.audit.settings import AuditSettings
from memk.memorize.audit.summary import CODING, format_table, summarize

MODEL = SimpleNamespace(describe=lambda: {"spec": "m", "kind": "huggingface"})
REFERENCE = SimpleNamespace(describe=lambda: {"spec": "r", "kind": "huggingface"})
SETTINGS = AuditSettings(bootstrap=0, top=2, extract_prefixes=())
# (set, index, bytes, chars, H(x|M), H(x|R)): one token a byte; mem_U 40, 0 (R codes it shorter), 2, 0.
TEXTS = [("member", 0, 10, 10, 30.0, 70.0), ("member", 1, 5, 4, 20.0, 18.0),
         ("non-member", 0, 8, 8, 50.0, 52.0), ("non-member", 1, 6, 6, 40.0, 39.0)]


def rows(reference: bool) -> list[dict]:
    out = []
    for kind, index, size, chars, bits, reference_bits in TEXTS:
        out.append({
            "set": kind, "index": index, "sha1": "", "chars": chars, "bytes": size, "zlib_bits": 8 * size + 16,
            "model_tokens": size, "model_bits": bits, "reference_tokens": size if reference else None,
            "reference_bits": reference_bits if reference else None,
            "mem_u_bits": max(0.0, reference_bits - bits) if reference else None,
            "attacks": {"loss": -bits / size, **({"reference": reference_bits - bits} if reference else {})},
            "extraction": None, "text": f"{kind} text {index}"})
    return out


def test_per_set_totals_memorization_and_generalization_are_the_hand_sums():
    summary = summarize(rows(True), MODEL, [REFERENCE], SETTINGS, {"device": "cpu"})
    # members: 15 bytes = 120 bits uniform, H(x|M) 30 + 20, H(x|R) 70 + 18, mem_U 40 + 0
    assert summary["sets"]["member"] == pytest.approx({
        "samples": 2, "chars": 14, "bytes": 15, "model_tokens": 15, "model_bits": 50.0, "model_bits_per_byte": 50 / 15,
        "zlib_bits": 152, "total_memorization_bits": 70.0, "reference_tokens": 15, "reference_bits": 88.0,
        "unintended_memorization_bits": 40.0, "mean_unintended_memorization_bits": 20.0,
        "samples_with_unintended_memorization": 1, "generalization_bits": 30.0})
    # non-members: 14 bytes = 112 bits uniform, H(x|M) 50 + 40, H(x|R) 52 + 39, mem_U 2 + 0
    assert summary["sets"]["non-member"] == pytest.approx({
        "samples": 2, "chars": 14, "bytes": 14, "model_tokens": 14, "model_bits": 90.0, "model_bits_per_byte": 90 / 14,
        "zlib_bits": 144, "total_memorization_bits": 22.0, "reference_tokens": 14, "reference_bits": 91.0,
        "unintended_memorization_bits": 2.0, "mean_unintended_memorization_bits": 1.0,
        "samples_with_unintended_memorization": 1, "generalization_bits": 20.0})
    # loss: members -3, -4 above non-members -6.25, -6.67: AUC 1; reference: 40 > 2, 40 > -1, -2 < both: 2 of 4
    assert set(summary["attacks"]) == {"loss", "reference"}
    assert summary["attacks"]["loss"]["auc"] == 1.0 and summary["attacks"]["reference"]["auc"] == 0.5
    assert summary["attacks"]["loss"]["label"] == ATTACKS["loss"] and "auc_interval" not in summary["attacks"]["loss"]
    assert summary["top_ranked_by"] == "mem_u_bits"
    assert [(t["set"], t["index"], t["mem_u_bits"]) for t in summary["top"]] == [
        ("member", 0, 40.0), ("non-member", 0, 2.0)]
    assert summary["reference"] == REFERENCE.describe() and summary["references"] == [REFERENCE.describe()]
    assert summary["model"] == MODEL.describe() and summary["coding"] == CODING and summary["extraction"] is None
    assert summary["settings"]["device"] == "cpu" and summary["settings"]["bootstrap"] == 0
    assert summary["format"] == 2
    assert datetime.datetime.fromisoformat(summary["created"]).tzinfo is not None


def test_without_a_reference_the_top_is_ranked_by_the_loss_attack_and_there_is_no_mem_u():
    summary = summarize(rows(False), MODEL, [], SETTINGS, {})
    assert summary["reference"] is None and summary["references"] == [] and set(summary["attacks"]) == {"loss"}
    assert "unintended_memorization_bits" not in summary["sets"]["member"]
    assert summary["sets"]["member"]["total_memorization_bits"] == 70.0
    assert summary["top_ranked_by"] == "loss"
    assert [(t["set"], t["index"]) for t in summary["top"]] == [("member", 0), ("member", 1)]  # loss -3, -4


def test_the_printed_table_holds_each_sets_numbers_and_each_attacks_auc():
    table = format_table(summarize(rows(True), MODEL, [REFERENCE], SETTINGS, {})).splitlines()
    assert table[1].split() == ["member", "2", "50.0", "88.0", "40.0", "20.00", "30.0"]
    assert table[2].split() == ["non-member", "2", "90.0", "91.0", "2.0", "1.00", "20.0"]
    loss = next(line for line in table if line.startswith(ATTACKS["loss"]))
    assert loss.split()[-3:] == ["1.000", "1.000", "1.000"]  # AUC, TPR at 1% and 0.1% FPR: separated
    plain = format_table(summarize(rows(False), MODEL, [], SETTINGS, {})).splitlines()
    assert plain[1].split() == ["member", "2", "50.0"] and "mem_U" not in plain[0]
