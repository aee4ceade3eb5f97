"""The sliding window of memorize/audit/scoring.py: every token coded once, with the context promised."""

import pytest

from memk.memorize.audit.scoring import windows_of


@pytest.mark.parametrize("n", [1, 2, 7, 8, 9, 30, 101])
@pytest.mark.parametrize("width,stride", [(8, 4), (8, 1), (8, 7), (5, 3), (2, 1)])
def test_each_token_is_coded_once_with_at_least_width_minus_stride_plus_one_context(n, width, stride):
    ids = list(range(100, 100 + n))
    seq = [0, *ids]
    coded = []
    for w in windows_of(3, ids, 0, width, stride):
        assert w.sample == 3 and len(w.inputs) <= width and w.targets == seq[seq.index(w.inputs[0]) + 1:][:len(w.inputs)]
        begin = seq.index(w.inputs[0])
        for i in range(w.skip, len(w.targets)):
            position = begin + 1 + i  # of the target in seq
            context = i + 1  # tokens fed before it: inputs[: i + 1]
            assert context >= min(position, width - stride + 1)
            coded.append(position)
    assert coded == list(range(1, n + 1))


def test_a_text_that_fits_is_one_window_from_the_start_token():
    [w] = windows_of(0, [5, 6, 7], 1, 8, 4)
    assert (w.inputs, w.targets, w.skip) == ([1, 5, 6], [5, 6, 7], 0)


def test_no_tokens_no_windows_and_bad_strides_are_refused():
    assert windows_of(0, [], 1, 8, 4) == []
    with pytest.raises(ValueError):
        windows_of(0, [1, 2], 0, 8, 8)
