"""MarkovSource against independent checks: dense linear algebra, python loops, sampling statistics."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from memk.memorize import markov
from memk.memorize.errors import ConfigError
from memk.memorize.markov import MarkovSource


@pytest.mark.parametrize("V,b,c", [(2, 1, 1.0), (2, 2, 1.0), (17, 4, 1.0), (64, 8, 0.3), (40, 40, 2.0)])
def test_rows_are_distributions_with_branching_successors(V, b, c):
    src = MarkovSource(V, branching=b, seed=3, concentration=c)
    P = src.transitions
    assert P.shape == (V, V) and P.dtype == np.float64
    np.testing.assert_allclose(P.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    assert ((P > 0).sum(axis=1) == b).all()
    # The cycle edge i -> i+1 is always there.
    assert (P[np.arange(V), (np.arange(V) + 1) % V] > 0).all()


def test_stationary_solves_pi_p_equals_pi():
    src = MarkovSource(50, branching=3, seed=1, concentration=0.5)
    pi, P = src.stationary, src.transitions
    assert pi.shape == (50,) and (pi > 0).all()
    assert pi.sum() == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(pi @ P, pi, rtol=0, atol=1e-13)
    # Independent check: the left eigenvector of P for eigenvalue 1, from dense linear algebra.
    w, vecs = np.linalg.eig(P.T)
    v = np.real(vecs[:, np.argmin(np.abs(w - 1))])
    np.testing.assert_allclose(pi, v / v.sum(), rtol=1e-9, atol=1e-14)


def test_gmres_route_matches_direct_solve(monkeypatch):
    direct = MarkovSource(300, branching=4, seed=2)
    monkeypatch.setattr(markov, "DIRECT_SOLVE_MAX_V", 10)
    iterative = MarkovSource(300, branching=4, seed=2)
    np.testing.assert_allclose(iterative.stationary, direct.stationary, rtol=1e-9, atol=0)


def test_entropy_rate_by_formula():
    src = MarkovSource(30, branching=5, seed=4)
    P, pi = src.transitions, src.stationary
    rate = sum(pi[i] * -sum(p * math.log2(p) for p in P[i] if p > 0) for i in range(30))
    assert src.entropy_rate_bits() == pytest.approx(rate, rel=1e-12)
    assert src.sequence_entropy_bits(17) == pytest.approx(16 * rate, rel=1e-12)
    assert src.sequence_entropy_bits(1) == 0.0


def test_sequence_bits_against_python_loop():
    src = MarkovSource(23, branching=4, seed=5, concentration=0.7)
    x = src.sample(6, 19, seed=9)
    P = src.transitions
    expected = [-sum(math.log2(P[int(s[t - 1]), int(s[t])]) for t in range(1, len(s))) for s in x]
    got = src.sequence_bits(x)
    assert got.dtype == np.float64 and got.shape == (6,)
    np.testing.assert_allclose(got, expected, rtol=1e-13)
    np.testing.assert_allclose(src.sequence_bits(x.numpy().astype(np.int32)), expected, rtol=1e-13)


def test_mean_sequence_bits_matches_entropy_within_standard_error():
    src = MarkovSource(64, branching=6, seed=0)
    S = 32
    bits = src.sequence_bits(src.sample(20000, S, seed=1))
    se = bits.std(ddof=1) / math.sqrt(len(bits))
    assert abs(bits.mean() - src.sequence_entropy_bits(S)) < 4 * se


def test_empirical_transitions_and_first_token_match_the_chain():
    V = 16
    src = MarkovSource(V, branching=4, seed=7)
    x = src.sample(4000, 64, seed=2).numpy()
    counts = np.zeros((V, V))
    np.add.at(counts, (x[:, :-1].ravel(), x[:, 1:].ravel()), 1)
    P = src.transitions
    assert (counts[P == 0] == 0).all()  # never a transition of probability 0
    # Chi-square goodness of fit of every row's successor counts, pooled over rows.
    expected = counts.sum(axis=1, keepdims=True) * P
    mask = P > 0
    chi2 = (((counts - expected) ** 2)[mask] / expected[mask]).sum()
    dof = int(mask.sum() - V)
    assert stats.chi2.sf(chi2, dof) > 1e-4
    # Token 0 is drawn from π.
    first = np.bincount(x[:, 0], minlength=V)
    assert stats.chisquare(first, len(x) * src.stationary).pvalue > 1e-4


def test_cycle_is_periodic_with_rate_zero_and_uniform_pi():
    src = MarkovSource(12, branching=1, seed=0)
    np.testing.assert_allclose(src.stationary, np.full(12, 1 / 12), rtol=1e-12)
    assert src.entropy_rate_bits() == 0.0
    x = src.sample(50, 20, seed=0)
    assert ((x[:, 1:] - x[:, :-1]) % 12 == 1).all()
    np.testing.assert_array_equal(src.sequence_bits(x), 0.0)


def test_determinism_and_nesting():
    a, b = MarkovSource(40, 3, seed=11), MarkovSource(40, 3, seed=11)
    np.testing.assert_array_equal(a.transitions, b.transitions)
    assert not np.array_equal(a.transitions, MarkovSource(40, 3, seed=12).transitions)
    big = a.sample(2500, 10, seed=4)
    assert big.dtype == torch.int64 and big.shape == (2500, 10)
    assert torch.equal(big, b.sample(2500, 10, seed=4))
    assert torch.equal(big[:1100], a.sample(1100, 10, seed=4))  # sizes nest
    assert not torch.equal(big, a.sample(2500, 10, seed=5))
    d = a.describe()
    assert d == {"vocab_size": 40, "branching": 3, "seed": 11, "concentration": 1.0,
                 "entropy_rate_bits": a.entropy_rate_bits()}


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(vocab_size=1), "vocab_size"),
        (dict(vocab_size=8, branching=0), "branching"),
        (dict(vocab_size=8, branching=9), "branching"),
        (dict(vocab_size=8, concentration=0.0), "concentration"),
        (dict(vocab_size=8, concentration=-1.0), "concentration"),
    ],
)
def test_bad_construction_raises(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        MarkovSource(**kwargs)


def test_bad_sequences_raise():
    src = MarkovSource(8, branching=2, seed=0)
    x = src.sample(3, 6, seed=0)
    with pytest.raises(ValueError, match="outside"):
        src.sequence_bits(torch.where(x == x[1, 2], 8, x))
    with pytest.raises(ValueError, match="outside"):
        src.sequence_bits(x - 100)
    with pytest.raises(ValueError, match="2-D"):
        src.sequence_bits(x[0])
    # A transition the chain cannot make: token a followed by a non-successor.
    P = src.transitions
    a = int(x[2, 3])
    z = int(np.nonzero(P[a] == 0)[0][0])
    bad = x.clone()
    bad[2, 4] = z
    with pytest.raises(ValueError, match=rf"sequence 2, position 4: transition {a} -> {z}"):
        src.sequence_bits(bad)
    with pytest.raises(ConfigError, match="seq_len"):
        src.sample(3, 0, seed=0)
