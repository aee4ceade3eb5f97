import math

import numpy as np
import pytest
import torch

from memk.memorize.data import uniform_random_sequences
from memk.memorize.model import GPTConfig
from memk.memorize.train import TrainConfig, batch_indices, learning_rate, plateau_reached, train_to_saturation


def saturating(steps, capacity=1000.0, rate=0.01):
    return [capacity * (1 - math.exp(-rate * s)) for s in steps]


def test_plateau_rule_on_synthetic_curves():
    window, tol = 5, 0.01
    assert not plateau_reached([10.0 * i for i in range(1, 30)], window, tol)  # linear: still rising
    assert plateau_reached([500.0] * 10, window, tol)  # flat
    assert not plateau_reached([500.0] * 5, window, tol)  # too short to judge
    assert not plateau_reached([0.0] * 10, window, tol)  # never rose: nothing memorized yet
    noisy = [500.0 + (7.0 if i % 2 else -7.0) for i in range(12)]
    assert plateau_reached(noisy, window, tol)  # noise around a level is a plateau


def test_plateau_rule_stops_a_saturating_curve_where_the_window_gain_falls_below_tolerance():
    # c(t) = C(1 - e^{-rt}), evaluated every 10 steps. The gain of the best value over the last
    # 5 evaluations is c(t) - c(t-50); it drops below 1% of c(t-50) at a step we can solve for.
    steps = list(range(0, 2000, 10))
    curve = saturating(steps)
    first = next(i for i in range(len(curve)) if plateau_reached(curve[: i + 1], 5, 0.01))
    t = steps[first]
    gain = lambda s: saturating([s])[0] - saturating([s - 50])[0]
    assert gain(t) < 0.01 * saturating([t - 50])[0]
    assert gain(t - 10) >= 0.01 * saturating([t - 60])[0]


def test_learning_rate_warms_up_holds_then_cools_down_to_zero():
    cfg = TrainConfig(lr=0.1, warmup_steps=10, cooldown_steps=100)
    assert learning_rate(0, cfg) == pytest.approx(0.01)
    assert learning_rate(4, cfg) == pytest.approx(0.05)
    assert learning_rate(9, cfg) == pytest.approx(0.1)
    assert learning_rate(10_000, cfg) == 0.1
    assert learning_rate(500, cfg, cooldown_start=500) == pytest.approx(0.1)
    assert learning_rate(550, cfg, cooldown_start=500) == pytest.approx(0.05)
    assert learning_rate(599, cfg, cooldown_start=500) == pytest.approx(0.001)


class Killed(Exception):
    pass


def test_a_run_ends_with_its_cooldown_inside_the_step_cap():
    config = GPTConfig(1, 16, 2, 16, 8)
    data = uniform_random_sequences(40, 16, 8, seed=0)
    cfg = TrainConfig(lr=1e-2, warmup_steps=5, batch_size=16, max_steps=70, min_steps=70, eval_every=20, cooldown_steps=25)
    _, outcome = train_to_saturation(config, data, cfg, torch.device("cpu"))
    assert outcome.steps == 70 and outcome.stop_reason == "step_cap"
    assert [s for s, _ in outcome.curve] == [0, 20, 40, 60, 70]


def test_batches_are_epochs_of_permutations():
    n, batch = 10, 4
    seen = torch.cat([batch_indices(s, n, batch, seed=0) for s in range(5)])  # 20 indices = 2 epochs
    assert sorted(seen[:10].tolist()) == list(range(10))
    assert sorted(seen[10:].tolist()) == list(range(10))
    assert (batch_indices(3, n, batch, seed=0) == batch_indices(3, n, batch, seed=0)).all()
    assert batch_indices(0, 3, 8, seed=0).tolist() == [0, 1, 2]  # small data: full batch


def test_bad_train_config_is_a_clear_error():
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="float16")
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)


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
