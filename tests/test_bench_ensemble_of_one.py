"""bench/ensemble_of_one.py: a run's step alone against an ensemble of one, on the CPU (its --quick mode)."""

import json

from click.testing import CliRunner

from memk.bench.ensemble_of_one import drift, main
from memk.memorize.model import GPTConfig


def test_quick_mode_writes_both_sides_per_size_and_thread_count(tmp_path):
    out = tmp_path / "one.json"
    result = CliRunner().invoke(main, ["--quick", "--threads", "1", "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["schema"] == "memk-ensemble-of-one/1" and report["cpu"] and report["torch"]
    assert [s["model"] for s in report["sizes"]] == ["L1-d8-h1-V64-S32", "L1-d32-h1-V2048-S64"]
    for size in report["sizes"]:
        one = size["threads"]["1"]
        assert one["alone_ms"] > 0 and one["ratio"] == round(one["ensemble_of_one_ms"] / one["alone_ms"], 3)
    ratios = [s["threads"]["1"]["ratio"] for s in report["sizes"]]
    assert report["worst_ratio"] == max(ratios) and report["best_ratio"] == min(ratios)


def test_the_two_sides_drift_apart_by_float32_rounding_only():
    report = drift(GPTConfig(1, 8, 1, 16, 8), batch=4)
    assert report["steps"] == 10 and report["max_loss_rel_diff"] < 1e-5 and report["max_weight_abs_diff"] < 1e-5
    assert report["losses_identical"] == (report["max_loss_abs_diff"] == 0.0)
