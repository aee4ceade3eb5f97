import math

import numpy as np
import pytest
import torch

from memk.memorize.bits import model_sequence_bits
from memk.memorize.data import uniform_random_sequences
from memk.memorize.model import GPT, GPTConfig
from memk.memorize.schedule import TrainConfig
from memk.memorize.train import MemorizedBits, train_to_saturation, uniform_code_signal


class Killed(Exception):
    pass


def test_a_run_ends_with_its_cooldown_inside_the_step_cap():
    config = GPTConfig(1, 16, 2, 16, 8)
    data = uniform_random_sequences(40, 16, 8, seed=0)
    cfg = TrainConfig(lr=1e-2, warmup_steps=5, batch_size=16, max_steps=70, min_steps=70, eval_every=20, cooldown_steps=25)
    _, outcome = train_to_saturation(config, data, cfg, torch.device("cpu"))
    assert outcome.steps == 70 and outcome.stop_reason == "step_cap"
    assert [s for s, _ in outcome.curve] == [0, 20, 40, 60, 70]


def test_a_run_killed_during_its_cooldown_resumes_to_the_uninterrupted_result(tmp_path):
    config = GPTConfig(1, 16, 2, 16, 8)
    data = uniform_random_sequences(40, 16, 8, seed=0)
    cfg = TrainConfig(lr=1e-2, warmup_steps=5, batch_size=16, max_steps=60, min_steps=60, eval_every=20, cooldown_steps=20)
    _, straight = train_to_saturation(config, data, cfg, torch.device("cpu"))

    def kill_at_50(p):
        if p["step"] == 50:
            raise Killed

    ckpt = tmp_path / "run.pt"
    with pytest.raises(Killed):
        train_to_saturation(config, data, cfg, torch.device("cpu"), checkpoint_path=ckpt, on_progress=kill_at_50)
    assert torch.load(ckpt, weights_only=False)["step"] == 40  # the cooldown began here; 10 steps of it are lost
    _, resumed = train_to_saturation(config, data, cfg, torch.device("cpu"), checkpoint_path=ckpt)
    assert [s for s, _ in resumed.curve] == [s for s, _ in straight.curve] == [0, 20, 40, 60]
    np.testing.assert_allclose([b for _, b in resumed.curve], [b for _, b in straight.curve], rtol=1e-6)
    assert resumed.stop_reason == straight.stop_reason == "step_cap"


def test_resuming_from_a_checkpoint_gives_the_uninterrupted_run(tmp_path):
    config = GPTConfig(1, 16, 2, 16, 8)
    data = uniform_random_sequences(40, 16, 8, seed=0)
    full = TrainConfig(lr=1e-2, warmup_steps=5, batch_size=16, max_steps=60, min_steps=60, eval_every=20)
    _, straight = train_to_saturation(config, data, full, torch.device("cpu"))

    ckpt = tmp_path / "run.pt"
    first_half = TrainConfig(**{**full.to_dict(), "max_steps": 40, "min_steps": 40})
    train_to_saturation(config, data, first_half, torch.device("cpu"), checkpoint_path=ckpt)
    assert torch.load(ckpt, weights_only=False)["step"] == 40
    _, resumed = train_to_saturation(config, data, full, torch.device("cpu"), checkpoint_path=ckpt)

    assert [s for s, _ in resumed.curve] == [0, 20, 40, 60]
    np.testing.assert_allclose([b for _, b in resumed.curve], [b for _, b in straight.curve], rtol=1e-6)
    assert resumed.steps == straight.steps == 60


def test_the_loop_stops_on_the_signal_it_is_given():
    config = GPTConfig(1, 8, 1, 16, 8)
    data = uniform_random_sequences(20, 16, 8, seed=0)
    cfg = TrainConfig(lr=1e-2, warmup_steps=0, batch_size=8, max_steps=500, cooldown_steps=5, min_steps=20,
                      eval_every=10, plateau_window=2)
    seen = []

    def flat(model):  # memorized bits that never rise: the plateau is seen at min_steps
        seen.append(model.training)
        return MemorizedBits(42.0, 7.0)

    _, outcome = train_to_saturation(config, data, cfg, torch.device("cpu"), stop_signal=flat)
    assert outcome.stop_reason == "plateau" and outcome.steps == 25
    assert [s for s, _ in outcome.curve] == [0, 10, 20, 25] and len(seen) == 4
    assert outcome.memorized_bits == 42.0 and outcome.model_bits_per_sequence == 7.0


def test_uniform_code_signal_is_the_uniform_entropy_less_the_model_code_length():
    torch.manual_seed(0)
    config = GPTConfig(1, 8, 1, 16, 8)
    model = GPT(config)
    data = uniform_random_sequences(30, 16, 8, seed=3)
    bits = model_sequence_bits(model, data)
    expected = np.maximum(0.0, 7 * 4.0 - bits).sum()  # (S-1)·log2 V = 7 · 4 bits per sequence
    signal = uniform_code_signal(data, "float32")(model)
    assert signal.total == pytest.approx(expected, rel=1e-12) and signal.mean_model_bits == pytest.approx(bits.mean())


def test_a_damaged_checkpoint_is_set_aside_and_the_run_starts_over(tmp_path, capsys):
    config = GPTConfig(1, 16, 2, 16, 8)
    data = uniform_random_sequences(40, 16, 8, seed=0)
    cfg = TrainConfig(lr=1e-2, warmup_steps=5, batch_size=16, max_steps=40, min_steps=40, eval_every=20, cooldown_steps=10)
    _, straight = train_to_saturation(config, data, cfg, torch.device("cpu"))
    ckpt = tmp_path / "run.pt"
    train_to_saturation(config, data, TrainConfig(**{**cfg.to_dict(), "max_steps": 20, "min_steps": 20}),
                        torch.device("cpu"), checkpoint_path=ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])  # cut short, as by a full disk
    _, resumed = train_to_saturation(config, data, cfg, torch.device("cpu"), checkpoint_path=ckpt)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"checkpoint {ckpt} is damaged" in err[0] and "starts over" in err[0]
    assert (tmp_path / "run.pt.damaged").exists()
    assert resumed.steps == straight.steps
    np.testing.assert_allclose([b for _, b in resumed.curve], [b for _, b in straight.curve], rtol=1e-6)
