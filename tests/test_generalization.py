"""The generalization experiment: reference model, mem_U, the attack on trained models, the CLI."""

import json
import math
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import replace

import numpy as np
import pytest
import torch

from memk.memorize.experiments import generalization as gen
from memk.memorize.bits import model_sequence_bits
from memk.memorize.errors import ConfigError
from memk.memorize.data import uniform_random_sequences
from memk.memorize.markov import MarkovSource
from memk.memorize.membership import loss_threshold_attack
from memk.memorize.model import GPT, GPTConfig
from memk.memorize.experiments.reference import Reference, load_reference_model
from memk.memorize.schedule import TrainConfig
from memk.memorize.sources import SourceData
from memk.memorize.train import train_to_saturation

MEMK = [sys.executable, "-m", "memk.cli"]
OUTSIDE = tempfile.gettempdir()  # `python -m` puts the working directory on sys.path


def memk(*args):
    return subprocess.run([*MEMK, *args], capture_output=True, text=True, timeout=600, cwd=OUTSIDE)


def _one_line_error(result, needle):
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert needle in lines[0], lines[0]


def _source_data(train_pool, heldout, exact=None):
    return SourceData(train_pool, heldout, exact, {"source": "test"}, "test")


def test_unintended_memorization_is_zero_for_a_model_equal_to_the_reference():
    torch.manual_seed(0)
    config = GPTConfig(1, 16, 2, 11, 9)
    model = GPT(config)
    with torch.no_grad():  # move away from the near-uniform init so code lengths differ per sequence
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    pool = uniform_random_sequences(40, 11, 9, seed=1)
    heldout = uniform_random_sequences(20, 11, 9, seed=2)
    reference = Reference(config, model_sequence_bits(model, pool), model_sequence_bits(model, heldout), {})
    exp = replace(gen.preset("smoke"), n_attack=20)
    out = gen.measure(model, pool[:30], _source_data(pool, heldout), reference, 20.0, exp, "float32")
    assert out["unintended_bits"] == 0.0
    # total = Σ (8·log2 11 - H(x|θ̂)) over the 30 sequences, all of it generalization here
    expected_total = float((8 * math.log2(11) - reference.pool_bits[:30]).sum())
    assert out["total_memorization_bits"] == pytest.approx(expected_total, rel=1e-12)
    assert out["generalization_bits"] == pytest.approx(expected_total, rel=1e-12)


def test_unintended_memorization_against_an_exact_generator_by_hand():
    chain = MarkovSource(6, branching=2, seed=3)
    pool = chain.sample(50, 7, seed=4)
    heldout = chain.sample(10, 7, seed=5)
    config = GPTConfig(1, 8, 1, 6, 7)
    torch.manual_seed(1)
    model = GPT(config)
    model_bits = model_sequence_bits(model, pool[:25])
    exact = chain.sequence_bits(pool[:25])
    reference = Reference(config, np.full(50, 1e6), np.full(10, 1e6), {})  # a useless reference
    exp = replace(gen.preset("smoke"), n_attack=10)
    out = gen.measure(model, pool[:25], _source_data(pool, heldout, chain), reference, 5.0, exp, "float32")
    by_hand = sum(max(0.0, e - m) for e, m in zip(exact, model_bits))
    assert out["unintended_exact_bits"] == pytest.approx(by_hand, rel=1e-12)
    assert out["unintended_bits"] == out["unintended_exact_bits"]  # θ is known: the exact value is used
    assert out["unintended_reference_bits"] == pytest.approx(float((1e6 - model_bits).sum()), rel=1e-12)


def test_reference_model_estimates_the_exact_markov_entropy():
    """A reference trained on plenty of chain samples codes held-out sequences close to H(x | θ).

    Tolerance: within 10% of the exact entropy rate (and never below it by more than the
    sampling noise: no model beats the true generator on fresh data on average).
    """
    chain = MarkovSource(8, branching=3, seed=0)
    pool = chain.sample(3000, 16, seed=1)
    heldout = chain.sample(500, 16, seed=2)
    cfg = TrainConfig(lr=1e-2, warmup_steps=20, batch_size=128, max_steps=500, cooldown_steps=150, min_steps=200, eval_every=50)
    torch.manual_seed(0)
    model, _ = train_to_saturation(GPTConfig(1, 32, 2, 8, 16), pool, cfg, torch.device("cpu"))
    estimate = model_sequence_bits(model, heldout)
    exact = chain.sequence_bits(heldout)
    noise = 4 * exact.std() / math.sqrt(len(exact))
    assert estimate.mean() == pytest.approx(exact.mean(), rel=0.10)
    assert estimate.mean() > exact.mean() - noise


def test_attack_is_chance_on_an_untrained_model():
    torch.manual_seed(0)
    model = GPT(GPTConfig(1, 16, 2, 32, 16))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    members = model_sequence_bits(model, uniform_random_sequences(1000, 32, 16, seed=1))
    nonmembers = model_sequence_bits(model, uniform_random_sequences(1000, 32, 16, seed=2))
    attack = loss_threshold_attack(members, nonmembers)
    # An untrained model cannot tell the two apart: F1 and AUC are 0.5 up to sampling noise
    # (standard error of a proportion of 1000: 0.016; 4 of them).
    assert abs(attack["f1"] - 0.5) < 0.064
    assert abs(attack["auc"] - 0.5) < 0.064


def test_attack_finds_every_member_of_a_memorized_tiny_set():
    data = uniform_random_sequences(8, 32, 16, seed=1)
    cfg = TrainConfig(lr=1e-2, warmup_steps=10, batch_size=8, max_steps=300, cooldown_steps=50, min_steps=100, eval_every=25)
    model, outcome = train_to_saturation(GPTConfig(1, 32, 2, 32, 16), data, cfg, torch.device("cpu"))
    members = model_sequence_bits(model, data)
    nonmembers = model_sequence_bits(model, uniform_random_sequences(8, 32, 16, seed=99))
    attack = loss_threshold_attack(members, nonmembers)
    assert attack["f1"] == 1.0 and attack["auc"] == 1.0


def test_plan_sizes_are_multiples_of_capacity_and_a_too_small_corpus_is_refused():
    exp = gen.preset("smoke")
    runs = gen.plan(exp, bits_per_sequence=50.0, pool_size=10_000, ref_id="r")
    for run in runs:
        expected = max(1, round(run.size_factor * gen.capacity_bits(run.model, exp.alpha) / 50.0))
        assert run.n_sequences == expected
    assert {r.role for r in runs} == {"sweep", "check"}
    largest = max(r.n_sequences for r in runs)
    with pytest.raises(ConfigError, match="too small for the sizes asked"):
        gen.plan(exp, bits_per_sequence=50.0, pool_size=largest - 1, ref_id="r")


@pytest.mark.slow
@pytest.mark.parametrize("source", ["text", "markov"])
def test_cli_end_to_end_then_resume(tmp_path, source):
    out = tmp_path / "gen"
    args = ["run-generalization", "--preset", "smoke", "--source", source, "--out", str(out), "--no-progress"]
    first = memk(*args)
    assert first.returncode == 0, first.stderr
    rows = (out / "runs.jsonl").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert len(rows.splitlines()) == 2 * 3 + 1  # two sweep models x three sizes, one check run
    assert summary["f1_law"] is not None and "c1" in summary["f1_law"]
    check = summary["prediction_check"]["checks"][0]
    assert check["predicted_f1"] is not None and check["measured_f1"] is not None
    assert (out / "reference" / "model.pt").exists()
    pngs = ["memorization.png", "double_descent.png", "membership.png"]
    if source == "markov":
        pngs.append("reference_check.png")
        assert "reference_check" in summary
    else:
        assert (out / "tokenizer.json").exists()
    # The stored reference is the model that coded the held-out split.
    reference = load_reference_model(out)
    heldout = torch.from_numpy(np.load(out / "corpus.npz")["heldout"]) if source == "text" else None
    if heldout is not None:
        stored = np.load(out / "reference" / "bits.npz")["heldout"]
        np.testing.assert_allclose(model_sequence_bits(reference, heldout.long()), stored, rtol=1e-6)
    for png in pngs:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "F1 law" in first.stdout

    again = memk(*args)  # everything done: nothing retrained, nothing lost
    assert again.returncode == 0, again.stderr
    assert (out / "runs.jsonl").read_text() == rows


@pytest.mark.slow
def test_cli_resumes_after_a_kill_without_redoing_finished_runs(tmp_path):
    out = tmp_path / "gen"
    args = ["run-generalization", "--preset", "smoke", "--source", "markov", "--max-steps", "200", "--out", str(out),
            "--no-progress"]
    # One worker: its jobs run in turn, so there is time to kill between a finished run and the
    # next (two side by side can finish within one poll). The resume below takes the default.
    proc = subprocess.Popen([*MEMK, *args, "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            cwd=OUTSIDE)
    runs = out / "runs.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:  # kill once a run has finished and the next is under way
        if runs.exists() and runs.read_text().strip() and any((out / "checkpoints").glob("sweep-*.pt")):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = runs.read_text().splitlines()
    reference = (out / "reference" / "reference.json").read_text()

    result = memk(*args)
    assert result.returncode == 0, result.stderr
    after = runs.read_text().splitlines()
    assert after[: len(before)] == before and len(after) == 7  # finished runs kept, the rest done once
    assert (out / "reference" / "reference.json").read_text() == reference  # the reference was not retrained
    assert not list((out / "checkpoints").glob("*.pt"))


@pytest.mark.slow
def test_cli_reads_a_hugging_face_dataset_saved_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    from pydoc_data.topics import topics

    folder = tmp_path / "hf"
    rows = [{"body": topics[k], "id": i} for i, k in enumerate(sorted(topics))]
    datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows)}).save_to_disk(str(folder))
    out = tmp_path / "gen"
    result = memk("run-generalization", "--preset", "smoke", "--hf-dataset", str(folder), "--hf-split", "validation",
                  "--hf-column", "body", "--models", "1x8", "--check-models", "", "--sizes", "20,40,80,160",
                  "--out", str(out), "--no-progress")
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["source"]["source"] == f"hf:{folder}[validation].body"
    assert summary["source"]["n_documents"] == len(topics)
    assert [p["n_sequences"] for p in summary["models"][0]["points"]] == [20, 40, 80, 160]


@pytest.mark.parametrize(
    "make, args, needle",
    [
        (None, ["--text", "/nonexistent/corpus.txt"], "no such file"),
        (lambda p: p.write_text(""), ["--text", "{file}"], "empty"),
        (lambda p: p.write_bytes(b"abc\xff\xfe def"), ["--text", "{file}"], "UTF-8"),
        (None, ["--size-factors", "1000"], "too small for the sizes asked"),
        (None, ["--source", "markov", "--text", "x.txt"], "text sources"),
        (None, ["--alpha", "-1"], "alpha"),
        (None, ["--capacity-summary", "/nonexistent/summary.json"], "cannot read capacity summary"),
        (None, ["--models", "1x7x2"], "divisible"),
        (None, ["--alpha", "inf"], "positive finite"),
        (None, ["--check-size-factors", "inf"], "check size factors must be positive finite"),
        (None, ["--source", "markov", "--markov-branching", "1"], "chain is deterministic"),
        (None, ["--check-models", "1x8x1,1x8x1"], "named twice"),
        (None, ["--source", "markov", "--markov-sequences", "10000000000"], "GiB free; lower --markov-sequences"),
    ],
)
def test_bad_input_is_a_one_line_error(tmp_path, make, args, needle):
    file = tmp_path / "corpus.txt"
    if make is not None:
        make(file)
    args = [a.replace("{file}", str(file)) for a in args]
    result = memk("run-generalization", "--preset", "smoke", "--out", str(tmp_path / "out"), "--no-progress", *args)
    _one_line_error(result, needle)
    assert not (tmp_path / "out").exists()  # a refused start leaves no folder behind
