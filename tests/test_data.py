import numpy as np
import pytest
from scipy import stats

from memk.memorize.data import BLOCK, uniform_random_sequences


def test_same_seed_same_data_and_other_seed_other_data():
    a = uniform_random_sequences(50, 64, 16, seed=3)
    assert a.shape == (50, 16)
    assert (a == uniform_random_sequences(50, 64, 16, seed=3)).all()
    assert not (a == uniform_random_sequences(50, 64, 16, seed=4)).all()


def test_sizes_nest_across_block_boundaries():
    big = uniform_random_sequences(2 * BLOCK + 7, 100, 9, seed=1)
    for n in (1, 5, BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK + 7):
        assert (uniform_random_sequences(n, 100, 9, seed=1) == big[:n]).all()


def test_tokens_are_uniform_over_the_vocabulary():
    x = uniform_random_sequences(3000, 7, 10, seed=0).numpy().ravel()
    assert x.min() == 0 and x.max() == 6
    counts = np.bincount(x, minlength=7)
    # chi-square goodness of fit against the uniform distribution
    assert stats.chisquare(counts).pvalue > 1e-4


@pytest.mark.parametrize("n, vocab, length", [(0, 5, 5), (5, 0, 5), (5, 5, -1)])
def test_bad_sizes_are_clear_errors(n, vocab, length):
    with pytest.raises(ValueError, match="positive integer"):
        uniform_random_sequences(n, vocab, length)
