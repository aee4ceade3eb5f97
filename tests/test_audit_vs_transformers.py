"""The audit benchmark's script at its smoke sizes: it runs, and all four methods give the same bits."""

import json
import subprocess
import sys
import tempfile

import pytest


@pytest.mark.slow
def test_smoke_run_agrees_with_the_transformers_loops(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, "-m", "memk.bench.audit_vs_transformers", "--smoke", "--out", str(out)],
                            capture_output=True, text=True, timeout=600, cwd=tempfile.gettempdir())
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads(out.read_text())
    assert record["smoke"] and record["model"]["vocab"] == 50257
    methods = {r["method"]: r for r in record["results"]}
    assert set(methods) == {"memk_bits", "memk_audit", "hf_loss_loop", "hf_padded_batch"}
    for r in methods.values():
        assert r["samples_per_s"] > 0 and r["peak_memory_rise_bytes"] >= 0
        # ~40 tokens of ~15.6 bits: float32 log-probs agree to well under a thousandth of a bit per token
        assert r["max_bits_difference_from_memk_bits"] < 0.02, r
    for key in ("date", "cpu", "torch", "load_average_1m"):
        assert key in record["environment"]
