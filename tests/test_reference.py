"""The reference model θ: trained once, reused while it matches, retrained when its files are damaged."""

import numpy as np
import torch

from memk.memorize.bits import model_sequence_bits
from memk.memorize.data import uniform_random_sequences
from memk.memorize.model import GPTConfig
from memk.memorize.experiments.reference import load_reference_model, train_reference
from memk.memorize.runtime import Backends
from memk.memorize.schedule import TrainConfig
from memk.memorize.sources import SourceData

CONFIG = GPTConfig(1, 8, 1, 16, 8)
TRAIN = TrainConfig(lr=1e-2, warmup_steps=2, batch_size=16, max_steps=20, cooldown_steps=4, min_steps=10, eval_every=10)
DATA = SourceData(uniform_random_sequences(40, 16, 8, seed=1), uniform_random_sequences(10, 16, 8, seed=2), None,
                  {"source": "test", "vocab_size": 16}, "fingerprint")


def reference(tmp_path):
    return train_reference(CONFIG, TRAIN, DATA, tmp_path, tmp_path / "ckpt.pt", torch.device("cpu"),
                           Backends("sdpa", "reference"), progress=False)


def test_the_reference_codes_pool_and_heldout_with_the_stored_model_and_is_reused(tmp_path):
    first = reference(tmp_path)
    model = load_reference_model(tmp_path)
    np.testing.assert_allclose(model_sequence_bits(model, DATA.heldout), first.heldout_bits, rtol=1e-6)
    np.testing.assert_allclose(model_sequence_bits(model, DATA.train_pool), first.pool_bits, rtol=1e-6)
    stamp = (tmp_path / "reference" / "model.pt").stat().st_mtime_ns
    again = reference(tmp_path)
    assert (tmp_path / "reference" / "model.pt").stat().st_mtime_ns == stamp  # not trained again
    assert again.reference_id == first.reference_id and np.array_equal(again.pool_bits, first.pool_bits)


def test_damaged_reference_files_are_set_aside_and_the_reference_trained_again(tmp_path, capsys):
    first = reference(tmp_path)
    for name in ("bits.npz", "reference.json"):
        path = tmp_path / "reference" / name
        path.write_bytes(path.read_bytes()[:20])
        again = reference(tmp_path)
        assert "is damaged" in capsys.readouterr().err and (tmp_path / "reference" / f"{name}.damaged").exists()
        np.testing.assert_array_equal(again.pool_bits, first.pool_bits)  # the same training, the same θ
