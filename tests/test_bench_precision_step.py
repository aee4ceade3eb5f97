"""bench/precision_step.py: a run's CPU training step and bits in each precision (its --quick mode)."""

import json
import math

import torch
from click.testing import CliRunner

from memk.bench.precision_step import BITS_SEQUENCES, MODELS, PRECISIONS, main, step_function
from memk.memorize.model import GPTConfig
from memk.memorize.train import seeded_gpt


def test_quick_mode_writes_every_precision_with_its_ratio_to_float32(tmp_path):
    out = tmp_path / "step.json"
    result = CliRunner().invoke(main, ["--quick", "--no-profile", "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["schema"] == "memk-precision-step/1" and report["cpu"] and isinstance(report["isa_flags"], list)
    (entry,) = report["models"].values()
    for key, ratios in (("step_ms", "against_float32"), ("bits_ms", "bits_against_float32")):
        assert set(entry[key]) == set(PRECISIONS) and all(ms > 0 for ms in entry[key].values())
        assert entry[ratios]["float32"] == 1.0
        for p in PRECISIONS:
            assert math.isclose(entry[ratios][p], entry[key][p] / entry[key]["float32"], abs_tol=2e-3)
    assert entry["bits_sequences"] == BITS_SEQUENCES


def test_the_step_timed_is_a_fresh_seeded_runs_own_step():
    shape = MODELS["default 1x32"]
    n_layer, d_model, n_head, vocab, seq, batch = shape
    step, bits, config, rows, backends = step_function(shape, "float32")
    assert config == GPTConfig(n_layer=n_layer, d_model=d_model, n_head=n_head, vocab_size=vocab, seq_len=seq)
    # The run's first loss is the seeded model's loss on the step's batch, computed here directly.
    gpt = seeded_gpt(config, 0, backends.attention, backends.logprob, torch.device("cpu"))
    x = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    assert rows == batch and step() == float(gpt.loss(x))
    assert step() < float(gpt.loss(x))  # and it learns: the second step's loss is lower
    assert len(bits()) == BITS_SEQUENCES
