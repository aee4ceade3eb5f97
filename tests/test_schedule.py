"""The per-run schedule: learning rate, plateau rule, batches, and the Schedule driven without a model."""

import math

import pytest
import torch

from memk.memorize.schedule import (
    Schedule,
    TrainConfig,
    batch_indices,
    doubling_gain,
    learning_rate,
    plateau_reached,
    saturated,
)


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


def power_law(steps, exponent, scale=100.0):
    return [(t, scale * t**exponent) for t in steps]


def test_doubling_gain_of_a_power_law_is_two_to_the_exponent_less_one():
    # b(t) = c t^a gains exactly 2^a - 1 over any doubling: 3.5% at a = 0.05 never saturates at
    # 2%, 1.4% at a = 0.02 is saturated, whatever the step budget
    steps = range(0, 64_001, 100)
    for a, expect_saturated in ((0.05, False), (0.02, True)):
        curve = power_law(steps, a)
        assert doubling_gain(curve) == pytest.approx(2**a - 1, rel=1e-9)
        assert doubling_gain(curve, until=3200) == pytest.approx(2**a - 1, rel=1e-9)
        assert saturated(doubling_gain(curve)) is expect_saturated


def test_doubling_gain_sees_an_exponential_approach_saturate_late_and_not_early():
    # c(t) = C(1 - e^{-rt}): over the doubling T/2 -> T it gains (e^{-rT/2} - e^{-rT}) / (1 - e^{-rT/2})
    steps = list(range(0, 2001, 10))
    curve = list(zip(steps, saturating(steps)))
    for until in (100, 400, 1000, 2000):
        exact = (math.exp(-0.01 * until / 2) - math.exp(-0.01 * until)) / (1 - math.exp(-0.01 * until / 2))
        assert doubling_gain(curve, until=until) == pytest.approx(exact, rel=1e-9)
    assert not saturated(doubling_gain(curve, until=400))  # +13.5%
    assert saturated(doubling_gain(curve, until=1000))  # +0.7%


def test_doubling_gain_takes_the_best_so_far_and_refuses_to_judge_too_early():
    noisy = [(t, 500.0 + (7.0 if (t // 10) % 2 else -7.0)) for t in range(0, 1001, 10)]
    assert doubling_gain(noisy) == 0.0  # noise around a level: the best so far stopped rising
    assert doubling_gain([(0, 0.0), (10, 5.0)]) is None  # no evaluation after step 0 in the first half
    assert doubling_gain([(0, 0.0), (10, 0.0), (20, 5.0)]) is None  # nothing memorized by the half
    assert doubling_gain([]) is None and not saturated(None)


def test_the_saturation_rule_starts_the_cooldown_where_a_doubling_gains_less_than_its_share():
    cfg = TrainConfig(lr=0.1, warmup_steps=0, max_steps=100_000, cooldown_steps=10, min_steps=0, eval_every=10,
                      saturation_gain=0.02)
    schedule = Schedule(cfg)
    drive(schedule, lambda step: 1000 * (1 - math.exp(-0.01 * step)))
    c = lambda t: 1 - math.exp(-0.01 * t)  # noqa: E731
    exact = lambda t: (c(t) - c(10 * (t // 20))) / c(10 * (t // 20))  # the half: the last evaluation at or before t/2  # noqa: E731
    first = next(t for t in range(20, 5000, 10) if exact(t) < 0.02)  # the first evaluation below 2%
    assert schedule.stop_reason == "saturated" and schedule.cooldown_start == first
    assert schedule.outcome(1.0).saturation_gain == pytest.approx(exact(first), rel=1e-9)
    # a power law gaining 3.5% a doubling runs to the step cap, whose outcome says how far it was
    capped = Schedule(TrainConfig(lr=0.1, warmup_steps=0, max_steps=2000, cooldown_steps=10, min_steps=0,
                                  eval_every=10, saturation_gain=0.02))
    drive(capped, lambda step: 100.0 * max(step, 1) ** 0.05)
    assert capped.stop_reason == "step_cap" and capped.cooldown_start == 1990
    assert capped.outcome(1.0).saturation_gain == pytest.approx((1990 / 990) ** 0.05 - 1, rel=1e-9)  # the half: step 990


def test_saturation_gain_is_checked_and_left_out_of_old_run_ids():
    with pytest.raises(ValueError, match="saturation_gain"):
        TrainConfig(saturation_gain=0.0)
    assert "saturation_gain" not in TrainConfig().to_dict()
    assert TrainConfig(saturation_gain=0.02).to_dict()["saturation_gain"] == 0.02


def test_learning_rate_warms_up_holds_then_cools_down_to_zero():
    cfg = TrainConfig(lr=0.1, warmup_steps=10, cooldown_steps=100)
    assert learning_rate(0, cfg) == pytest.approx(0.01)
    assert learning_rate(4, cfg) == pytest.approx(0.05)
    assert learning_rate(9, cfg) == pytest.approx(0.1)
    assert learning_rate(10_000, cfg) == 0.1
    assert learning_rate(500, cfg, cooldown_start=500) == pytest.approx(0.1)
    assert learning_rate(550, cfg, cooldown_start=500) == pytest.approx(0.05)
    assert learning_rate(599, cfg, cooldown_start=500) == pytest.approx(0.001)


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




def drive(schedule: Schedule, bits_at) -> dict[int, float]:
    """The training loop's protocol without a model: memorized bits come from bits_at(step)."""
    rates = {}
    while True:
        if schedule.evaluation_due():
            schedule.record(bits_at(schedule.step), 10.0)
        if schedule.begin_cooldown_if_due():
            continue
        if schedule.finished:
            return rates
        rates[schedule.step] = schedule.learning_rate()
        schedule.advance(1.0)


def test_a_flat_curve_starts_the_cooldown_at_the_evaluation_that_sees_the_plateau():
    cfg = TrainConfig(lr=0.1, warmup_steps=0, max_steps=1000, cooldown_steps=5, min_steps=0, eval_every=10,
                      plateau_window=2, plateau_rel_tol=0.01)
    curve = {0: 0.0, 10: 100.0, 20: 100.5, 30: 100.5}
    schedule = Schedule(cfg)
    rates = drive(schedule, lambda step: curve.get(step, 100.7))
    # At step 20 the last two evaluations (100, 100.5) are compared with 0: rising. At 30 the best
    # of (100.5, 100.5) beats the best before them (100) by 0.5 < 1% of 100: a plateau.
    assert schedule.stop_reason == "plateau" and schedule.cooldown_start == 30
    assert schedule.step == 35 and [s for s, _ in schedule.curve] == [0, 10, 20, 30, 35]
    assert rates[29] == pytest.approx(0.1) and rates[30] == pytest.approx(0.1) and rates[34] == pytest.approx(0.02)
    assert schedule.best.memorized_bits == 100.7 and schedule.best.step == 35
    outcome = schedule.outcome(train_seconds=1.0)
    assert outcome.memorized_bits == 100.7 and outcome.memorized_bits_final == 100.7 and outcome.steps == 35


def test_a_rising_curve_cools_down_before_the_step_cap():
    cfg = TrainConfig(lr=0.1, warmup_steps=0, max_steps=50, cooldown_steps=10, min_steps=0, eval_every=10)
    schedule = Schedule(cfg)
    drive(schedule, lambda step: float(step + 1))
    assert schedule.stop_reason == "step_cap" and schedule.cooldown_start == 40
    assert [s for s, _ in schedule.curve] == [0, 10, 20, 30, 40, 50] and schedule.step == 50


def test_without_a_cooldown_the_cap_is_evaluated_even_off_the_cadence():
    cfg = TrainConfig(lr=0.1, warmup_steps=0, max_steps=25, cooldown_steps=0, min_steps=0, eval_every=10)
    schedule = Schedule(cfg)
    drive(schedule, lambda step: float(step + 1))
    assert schedule.stop_reason == "step_cap" and [s for s, _ in schedule.curve] == [0, 10, 20, 25]


def test_state_dict_round_trip_continues_the_same_schedule():
    cfg = TrainConfig(lr=0.1, warmup_steps=3, max_steps=60, cooldown_steps=10, min_steps=0, eval_every=10,
                      plateau_window=2, plateau_rel_tol=0.01)
    bits = lambda step: 50.0 * (1 - math.exp(-step / 8))  # noqa: E731
    straight = Schedule(cfg)
    straight_rates = drive(straight, bits)

    first = Schedule(cfg)
    while first.step < 20 or first.evaluation_due():  # stopped right after the evaluation at step 20
        if first.evaluation_due():
            first.record(bits(first.step), 10.0)
            continue
        first.begin_cooldown_if_due()
        first.advance(1.0)
    resumed = Schedule(cfg)
    resumed.load_state_dict(first.state_dict())
    rates = drive(resumed, bits)
    assert resumed.curve == straight.curve and resumed.stop_reason == straight.stop_reason
    assert resumed.best == straight.best and all(rates[s] == straight_rates[s] for s in rates)


def test_a_non_finite_loss_is_divergence():
    schedule = Schedule(TrainConfig())
    with pytest.raises(FloatingPointError, match="diverged at step 1.*lower the learning rate"):
        schedule.advance(float("nan"))
