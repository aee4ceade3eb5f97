"""Membership inference and the F1 law against brute force, hand-worked cases and known constants."""

import math

import numpy as np
import pytest

from memk.memorize.membership import f1_law, fit_f1_law, loss_threshold_attack, roc_auc


def pairwise_auc(a, b):
    a, b = np.asarray(a, float), np.asarray(b, float)
    return ((a[:, None] > b[None, :]).sum() + 0.5 * (a[:, None] == b[None, :]).sum()) / (len(a) * len(b))


def test_roc_auc_matches_pairwise_count_with_ties():
    rng = np.random.default_rng(0)
    for n1, n2 in ((1, 1), (7, 3), (50, 80)):
        a = rng.integers(0, 5, n1).astype(float)  # few values: many ties
        b = rng.integers(0, 5, n2).astype(float)
        assert roc_auc(a, b) == pytest.approx(pairwise_auc(a, b), abs=1e-12)
    a, b = rng.normal(size=200), rng.normal(0.3, 1, size=150)
    assert roc_auc(a, b) == pytest.approx(pairwise_auc(a, b), abs=1e-12)
    assert roc_auc([2.0, 3.0], [0.0, 1.0]) == 1.0 and roc_auc([0.0], [1.0]) == 0.0 and roc_auc([1.0], [1.0]) == 0.5


def test_attack_on_identical_distributions_is_chance():
    n = 20000
    rng = np.random.default_rng(1)
    r = loss_threshold_attack(rng.normal(100, 5, n), rng.normal(100, 5, n))
    # F1 = accuracy = TP / n here; under the null TP is hypergeometric, SE below the binomial 0.5 / sqrt(n).
    se = 0.5 / math.sqrt(n)
    for key in ("f1", "accuracy", "precision", "recall"):
        assert abs(r[key] - 0.5) < 4 * se
    # AUC under the null: SE = sqrt((n1 + n2 + 1) / (12 n1 n2)).
    assert abs(r["auc"] - 0.5) < 4 * math.sqrt((2 * n + 1) / (12 * n * n))
    assert r["n_members"] == r["n_nonmembers"] == n


def test_perfectly_separated_scores_give_one():
    r = loss_threshold_attack([1.0, 2.0, 3.0], [10.0, 11.0, 12.0])
    assert r["f1"] == r["precision"] == r["recall"] == r["accuracy"] == r["auc"] == 1.0
    assert r["threshold_bits"] == 6.5


def test_hand_worked_example():
    # Pool sorted: 1(m) 2(n) 3(m) 4(m) | 5(n) 6(m) 7(n) 8(n); median 4.5; members predicted: 1, 2, 3, 4.
    # TP = 3 (1, 3, 4), FP = 1 (2), FN = 1 (6), TN = 3: precision = recall = F1 = accuracy = 3/4.
    r = loss_threshold_attack([1, 3, 4, 6], [2, 5, 7, 8])
    assert r["threshold_bits"] == 4.5
    assert (r["precision"], r["recall"], r["f1"], r["accuracy"]) == (0.75, 0.75, 0.75, 0.75)
    # AUC: member pairs with lower bits than a non-member: 1<{2,5,7,8}=4, 3<{5,7,8}=3, 4<3, 6<2 -> 12/16.
    assert r["auc"] == 0.75


def test_ties_at_the_threshold_are_shared():
    # Pool: 1(m) 5(m) 5(n) 5(n) 9(n) 5(m)... members [1, 5, 5], non-members [5, 5, 9]: median 5, one value below,
    # four tied; two member predictions left to give, each tie called a member with chance 2/4.
    # TP = 1 + 2 * 0.5 = 2, FP = 2 * 0.5 = 1: precision = recall = 2/3.
    r = loss_threshold_attack([1, 5, 5], [5, 5, 9])
    assert r["threshold_bits"] == 5
    assert r["precision"] == pytest.approx(2 / 3) and r["recall"] == pytest.approx(2 / 3)
    assert r["f1"] == pytest.approx(2 / 3) and r["accuracy"] == pytest.approx(2 / 3)
    # All scores equal: no information, chance, not zero.
    r = loss_threshold_attack([3.0] * 4, [3.0] * 4)
    assert r["f1"] == r["accuracy"] == r["auc"] == 0.5


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="balanced"):
        loss_threshold_attack([1.0, 2.0], [3.0])
    with pytest.raises(ValueError, match="non-empty"):
        loss_threshold_attack([], [])
    with pytest.raises(ValueError, match="NaN"):
        roc_auc([1.0, np.nan], [2.0])
    with pytest.raises(ValueError, match="at least 4 points"):
        fit_f1_law([0.1, 0.2, 0.3], [0.9, 0.8, 0.7])
    with pytest.raises(ValueError, match="positive"):
        fit_f1_law([0.1, 0.2, 0.0, 0.4], [0.9, 0.8, 0.7, 0.6])


def test_f1_law_form_and_limits():
    assert f1_law(np.array([1e6]), 0.8, 2.0, -0.5)[0] == pytest.approx(0.9)
    assert f1_law(np.array([0.5]), 0.8, 2.0, -0.5)[0] == pytest.approx(0.5 * (1 + 0.4))
    # Stable sigmoid: huge arguments of either sign saturate without NaN.
    np.testing.assert_array_equal(f1_law(np.array([1e-3, 1e6]), 1.0, 1e4, -1e3), [0.5, 1.0])


@pytest.mark.parametrize("c1,c2,c3", [(0.9, 3.0, -0.5), (0.6, 12.0, -0.2), (1.0, 1.5, -1.5)])
def test_fit_recovers_constants(c1, c2, c3):
    ratios = np.geomspace(0.02, 4.0, 15)
    fit = fit_f1_law(ratios, f1_law(ratios, c1, c2, c3))
    assert fit["c1"] == pytest.approx(c1, rel=1e-5)
    assert fit["c2"] == pytest.approx(c2, rel=1e-5)
    assert fit["c3"] == pytest.approx(c3, rel=1e-5, abs=1e-7)
    assert fit["ratio_at_midpoint"] == -fit["c3"]
    assert fit["r2"] == pytest.approx(1.0) and fit["rmse"] < 1e-7 and fit["n_points"] == 15
    assert fit["form"].startswith("F1 = 0.5*(1 + c1*sigmoid(")


def test_fit_with_small_noise_gets_close():
    ratios = np.geomspace(0.02, 4.0, 40)
    noise = np.random.default_rng(3).normal(0, 0.003, len(ratios))
    fit = fit_f1_law(ratios, f1_law(ratios, 0.9, 3.0, -0.5) + noise)
    assert fit["c1"] == pytest.approx(0.9, abs=0.03)
    assert fit["c2"] == pytest.approx(3.0, rel=0.25)
    assert fit["c3"] == pytest.approx(-0.5, abs=0.05)
    assert fit["r2"] > 0.99
    assert 0.001 < fit["rmse"] < 0.006
