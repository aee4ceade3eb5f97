"""The membership attacks and their metrics (memorize/audit/attacks.py) against direct computations on hand-made
scores."""

import itertools
import math
import zlib

import numpy as np
import pytest

from memk.memorize.audit.attacks import (
    attack_metrics, attack_scores, bootstrap_interval, dc_pdd_score, lowest_fraction_mean, recall_ratio, roc_curve,
    token_counts, tpr_at_fpr, zlib_bits,
)
from memk.memorize.membership import roc_auc

# Ties within and across the groups on purpose.
MEMBERS = [3.0, 2.5, 2.5, 1.0, 0.2, 4.0, 2.5, -1.0]
NONMEMBERS = [0.0, 2.5, 1.0, 1.0, -0.5, 0.3, 0.1, -2.0, 1.5, 0.0]


def best_tpr_over_every_threshold(m, n, fpr):
    """max TPR of "score > t" over every t that matters (each score, and below them all), FPR <= fpr."""
    best = 0.0
    for t in sorted(set(m) | set(n) | {min(m + n) - 1}):
        if sum(x > t for x in n) / len(n) <= fpr:
            best = max(best, sum(x > t for x in m) / len(m))
    return best


@pytest.mark.parametrize("fpr", [0.0, 0.001, 0.01, 0.1, 0.2, 0.35, 0.5, 0.99, 1.0])
def test_tpr_at_fpr_is_the_best_threshold_within_the_fpr(fpr):
    assert tpr_at_fpr(MEMBERS, NONMEMBERS, fpr) == pytest.approx(best_tpr_over_every_threshold(MEMBERS, NONMEMBERS, fpr))


def test_tpr_at_fpr_on_random_scores_against_every_threshold():
    rng = np.random.default_rng(0)
    for _ in range(20):
        m = list(np.round(rng.normal(0.5, 1, rng.integers(1, 30)), 1))
        n = list(np.round(rng.normal(0, 1, rng.integers(1, 300)), 1))
        for fpr in (0.001, 0.01, 0.05):
            assert tpr_at_fpr(m, n, fpr) == pytest.approx(best_tpr_over_every_threshold(m, n, fpr))


def test_one_percent_of_a_hundred_allows_exactly_one_false_positive():
    n = list(range(100))  # 0..99
    m = [98.5, 99.5, 97.5]
    assert tpr_at_fpr(m, n, 0.01) == pytest.approx(2 / 3)  # t = 98: 99 is the one false positive allowed


def test_auc_is_the_pairwise_win_rate_with_ties_as_half():
    pairs = [(a > b) + 0.5 * (a == b) for a, b in itertools.product(MEMBERS, NONMEMBERS)]
    assert roc_auc(MEMBERS, NONMEMBERS) == pytest.approx(sum(pairs) / len(pairs))
    metrics = attack_metrics(MEMBERS, NONMEMBERS, resamples=200, seed=1)
    assert metrics["auc"] == pytest.approx(sum(pairs) / len(pairs))
    assert metrics["tpr_at_1pct_fpr"] == pytest.approx(best_tpr_over_every_threshold(MEMBERS, NONMEMBERS, 0.01))
    lo, hi = metrics["auc_interval"]
    assert lo <= metrics["auc"] <= hi and lo < hi


def test_bootstrap_of_perfect_separation_is_a_point_and_is_seeded():
    assert bootstrap_interval(roc_auc, [5, 6, 7], [1, 2], resamples=50, seed=0) == (1.0, 1.0)
    a = bootstrap_interval(roc_auc, MEMBERS, NONMEMBERS, resamples=100, seed=3)
    assert a == bootstrap_interval(roc_auc, MEMBERS, NONMEMBERS, resamples=100, seed=3)


def test_roc_curve_points_are_the_rates_at_each_threshold():
    fpr, tpr = roc_curve(MEMBERS, NONMEMBERS)
    thresholds = sorted(set(MEMBERS) | set(NONMEMBERS), reverse=True)
    assert (fpr[0], tpr[0]) == (0.0, 0.0) and (fpr[-1], tpr[-1]) == (1.0, 1.0)
    for f, t, th in zip(fpr[1:], tpr[1:], thresholds):
        assert f == pytest.approx(np.mean(np.array(NONMEMBERS) >= th))
        assert t == pytest.approx(np.mean(np.array(MEMBERS) >= th))


def test_min_k_and_scores_of_one_text():
    logp = np.array([-0.1, -5.0, -0.2, -3.0, -0.3, -0.4, -0.5, -0.6, -0.7, -0.8], dtype=np.float32)
    assert lowest_fraction_mean(logp, 0.2) == pytest.approx(-4.0)  # the 2 lowest of 10
    assert lowest_fraction_mean(logp[:3], 0.2) == pytest.approx(-5.0)  # at least one token
    z = -np.arange(10, dtype=np.float32)
    scores = attack_scores(bits=30.0, logp=logp, z=z, zlib=120, reference_bits=50.0, k=0.2)
    assert scores == pytest.approx({"loss": -3.0, "zlib": -0.25, "min_k": -4.0, "min_k_pp": -8.5, "reference": 20.0})
    assert "reference" not in attack_scores(30.0, logp, None, 120, None, 0.2)


def test_zlib_bits_are_the_compressed_bytes():
    text = "abcabcabc héllo"
    assert zlib_bits(text) == 8 * len(zlib.compress(text.encode(), 9))
    assert math.isclose(zlib_bits(text) % 8, 0)


def dc_pdd_by_hand(logp, ids, corpus, vocab, a, leave_out=None):
    """DC-PDD as Zhang et al. 2024 write it, one token at a time in float64: f(t) = (count(t) + 1) / (N + V)
    over the corpus's texts (less the text `leave_out`), the first occurrence of each token only."""
    texts = [t for n, t in enumerate(corpus) if n != leave_out]
    total = sum(len(t) for t in texts)
    terms, seen = [], set()
    for i, token in enumerate(ids):
        if token in seen:
            continue
        seen.add(token)
        count = sum(t.count(token) for t in texts)
        f = (count + 1) / (total + vocab)
        terms.append(min(math.exp(float(logp[i])) * math.log(1 / f), a))
    return sum(terms) / len(terms)


def test_dc_pdd_against_a_direct_computation_with_repeats_caps_and_leave_one_out():
    rng = np.random.default_rng(0)
    vocab = 12
    corpus = [list(rng.integers(0, vocab, rng.integers(3, 15))) for _ in range(6)]
    counts = token_counts(corpus, vocab)
    assert list(counts) == [sum(t.count(v) for t in corpus) for v in range(vocab)]
    for a in (0.01, 0.5, 10.0):  # capped everywhere, in part, nowhere
        for n, text in enumerate(corpus):
            logp = np.log(rng.uniform(0.001, 1.0, len(text))).astype(np.float32)
            assert dc_pdd_score(logp, text, counts, a) == pytest.approx(dc_pdd_by_hand(logp, text, corpus, vocab, a))
            assert dc_pdd_score(logp, text, counts, a, leave_out_self=True) == pytest.approx(
                dc_pdd_by_hand(logp, text, corpus, vocab, a, leave_out=n))
    outside = [0, 0, 11, 0, 3]  # a text not in the corpus, its first token repeated
    logp = np.log(np.array([0.9, 0.1, 0.5, 0.2, 0.3]))
    assert dc_pdd_score(logp, outside, counts, 10.0) == pytest.approx(dc_pdd_by_hand(logp, outside, corpus, vocab, 10.0))
    with pytest.raises(ValueError):
        dc_pdd_score(logp[:3], outside, counts)
    with pytest.raises(ValueError):
        dc_pdd_score(logp, [0, 1, 2, 3, vocab], counts)


def test_dc_pdd_of_texts_capped_everywhere_is_exactly_the_cap_whatever_their_length():
    counts = np.full(20, 3)
    scores = {dc_pdd_score(np.zeros(n), list(range(n)), counts, cap=0.01) for n in range(1, 20)}
    assert scores == {0.01}  # a tie, not float rounding that would rank texts by their token count


def test_recall_ratio_is_the_ratio_of_mean_log_likelihoods():
    logp, prefixed = np.array([-0.5, -1.5, -2.0]), np.array([-0.7, -2.5, -2.0])
    bits, prefixed_bits = -logp.sum() / math.log(2), -prefixed.sum() / math.log(2)
    assert recall_ratio(bits, prefixed_bits) == pytest.approx(prefixed.mean() / logp.mean())
    assert recall_ratio(0.0, 0.0) == 0.0 and math.isfinite(recall_ratio(0.0, 1.0))
