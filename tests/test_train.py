import inspect
from collections import deque

import numpy as np
import pytest
import torch

from memk.memorize.bits import model_sequence_bits
from memk.memorize.data import uniform_random_sequences
from memk.memorize.model import GPT, GPTConfig
from memk.memorize.schedule import TrainConfig, batch_indices
from memk.memorize.train import (AloneStep, MemorizedBits, TrainingLoop, TrainingStep, start_member, train_to_saturation,
                                 uniform_code_signal)


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


# ---------------------------------------------------------------------------------------
# The one loop and its steps


def test_a_run_alone_and_an_ensemble_step_offer_the_same_training_step():
    from memk.memorize.ensemble import EnsembleStep

    declared = {name for name in vars(TrainingStep) if not name.startswith("_")}
    assert declared == {"slots", "load", "gpt", "checkpoint", "losses", "zero_grad", "clip_gradients", "step", "keep"}
    for implementation in (AloneStep, EnsembleStep):
        for name in declared - {"slots"}:
            want = list(inspect.signature(getattr(TrainingStep, name)).parameters)
            assert list(inspect.signature(getattr(implementation, name)).parameters) == want, (implementation, name)
        assert hasattr(implementation, "slots")


class RecordingAdamW(torch.optim.AdamW):
    """torch's AdamW, keeping the learning rate and the gradient norm of every step it takes."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = []

    def step(self, closure=None):
        grads = [p.grad for group in self.param_groups for p in group["params"]]
        norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
        self.seen.append((self.param_groups[0]["lr"], norm))
        return super().step(closure)


def test_the_loop_steps_at_the_schedules_rate_on_the_runs_batches_clipped_to_its_norm():
    config = GPTConfig(1, 8, 1, 16, 8)
    data = uniform_random_sequences(20, 16, 8, seed=0)
    cfg = TrainConfig(lr=1e-2, warmup_steps=4, batch_size=8, max_steps=12, cooldown_steps=4, min_steps=12,
                      eval_every=5, grad_clip=1e-3, seed=2)
    torch.manual_seed(0)
    model = GPT(config)
    optimizer = RecordingAdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas)
    step = AloneStep(model, optimizer)
    batches, outcomes = [], []
    real_loss = model.loss

    def loss(x):
        batches.append(x.clone())
        return real_loss(x)

    model.loss = loss
    measure = lambda m: MemorizedBits(1.0, 2.0)  # noqa: E731
    start = lambda k: start_member(step, k, cfg, data, measure, torch.device("cpu"), None,  # noqa: E731
                                   on_finish=lambda gpt, outcome: outcomes.append(outcome))
    TrainingLoop(step, torch.device("cpu"), "float32", deque([start])).run()
    assert outcomes[0].steps == 12 and [s for s, _ in outcomes[0].curve] == [0, 5, 10, 12]
    # warm-up over 4 steps, constant, then the cool-down from step 8 (max_steps - cooldown_steps) to 0
    assert [lr for lr, _ in optimizer.seen] == pytest.approx([2.5e-3, 5e-3, 7.5e-3, 1e-2, 1e-2, 1e-2, 1e-2, 1e-2,
                                                              1e-2, 7.5e-3, 5e-3, 2.5e-3], rel=1e-12)
    assert all(norm == pytest.approx(1e-3, rel=1e-5) for _, norm in optimizer.seen)  # every step clipped to 1e-3
    for s, x in enumerate(batches):
        assert torch.equal(x, data[batch_indices(s, 20, 8, 2)])
