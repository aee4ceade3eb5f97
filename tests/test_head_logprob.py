"""memk.kernels.head_logprob: head_token_logprobs against log_softmax of the full logits in float64,
and logprob_moments against the moments' formulas."""

import math

import pytest
import torch

from memk.kernels import head_token_logprobs, logprob_backends, logprob_moments


def float64_truth(hidden, weight, targets, bias=None):
    logits = hidden.double() @ weight.double().T + (0 if bias is None else bias.double())
    logp = torch.log_softmax(logits, dim=-1)
    p = logp.exp()
    mean = (p * logp).sum(-1)
    std = (p * (logp - mean[:, None]) ** 2).sum(-1).sqrt()
    return logp.gather(1, targets[:, None]).squeeze(1), mean, std


@pytest.mark.parametrize("backend", logprob_backends())
@pytest.mark.parametrize("block_bytes", [1, 4 * 101 * 5, 2**30])  # one row a block, 5 rows (37 is not a multiple), all
def test_matches_float64_at_odd_sizes_in_any_blocks(backend, block_bytes):
    g = torch.Generator().manual_seed(0)
    n, d, vocab = 37, 13, 101
    hidden = torch.randn(n, d, generator=g) * 3
    weight = torch.randn(vocab, d, generator=g)
    bias = torch.randn(vocab, generator=g) + 50.0  # a large common offset: the result must not move
    targets = torch.randint(0, vocab, (n,), generator=g)
    logp, mean, std = head_token_logprobs(hidden, weight, targets, bias, moments=True, block_bytes=block_bytes,
                                          backend=backend)
    want_logp, want_mean, want_std = float64_truth(hidden, weight, targets, bias)
    assert logp.dtype == torch.float32 and logp.shape == (n,)
    torch.testing.assert_close(logp.double(), want_logp, rtol=0, atol=2e-5)
    torch.testing.assert_close(mean.double(), want_mean, rtol=0, atol=2e-5)
    torch.testing.assert_close(std.double(), want_std, rtol=0, atol=2e-5)


def test_non_contiguous_inputs_and_no_moments():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(19, 2 * 11, generator=g)[:, ::2]  # strided columns
    weight = torch.randn(11, 53, generator=g).T  # (53, 11), transposed storage
    targets = torch.randint(0, 53, (38,), generator=g)[::2]
    assert not hidden.is_contiguous() and not weight.is_contiguous() and not targets.is_contiguous()
    logp = head_token_logprobs(hidden, weight, targets, block_bytes=4 * 53 * 3)
    want, _, _ = float64_truth(hidden, weight, targets)
    torch.testing.assert_close(logp.double(), want, rtol=0, atol=2e-5)


def test_float64_weights_give_float64_exactly():
    g = torch.Generator().manual_seed(2)
    hidden, weight = torch.randn(7, 5, generator=g, dtype=torch.float64), torch.randn(9, 5, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 9, (7,), generator=g)
    logp = head_token_logprobs(hidden, weight, targets, block_bytes=4 * 9 * 2)
    assert logp.dtype == torch.float64
    torch.testing.assert_close(logp, float64_truth(hidden, weight, targets)[0], rtol=0, atol=1e-12)


def test_a_masked_vocabulary_entry_has_probability_zero_not_nan():
    hidden = torch.ones(2, 1)
    weight = torch.tensor([[1.0], [2.0], [3.0]])
    bias = torch.tensor([0.0, float("-inf"), 0.0])
    logp, mean, std = head_token_logprobs(hidden, weight, torch.tensor([0, 2]), bias, moments=True, backend="reference")
    want = torch.log_softmax(torch.tensor([1.0, 3.0], dtype=torch.float64), 0)
    torch.testing.assert_close(logp.double(), want, rtol=0, atol=1e-6)
    assert torch.isfinite(mean).all() and torch.isfinite(std).all()


@pytest.mark.parametrize("backend", logprob_backends())
def test_double_backward_through_the_head_matches_float64(backend):
    # A gradient penalty on the hidden states: d/dh of |d sum(logp) / dh|^2, through the log-prob op's backward.
    g = torch.Generator().manual_seed(4)
    n, d, vocab = 11, 6, 29
    hidden = torch.randn(n, d, generator=g, dtype=torch.float64)
    weight = torch.randn(vocab, d, generator=g, dtype=torch.float64)
    targets = torch.randint(0, vocab, (n,), generator=g)

    def penalty_grad(logprobs, h):
        h = h.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(logprobs(h).sum(), h, create_graph=True)
        grad.double().square().sum().backward()
        return h.grad

    got = penalty_grad(lambda h: head_token_logprobs(h, weight.float(), targets, block_bytes=4 * vocab * 4,
                                                     backend=backend), hidden.float())
    want = penalty_grad(lambda h: float64_truth(h, weight, targets)[0], hidden)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="same d"):
        head_token_logprobs(torch.zeros(3, 4), torch.zeros(5, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="targets must be"):
        head_token_logprobs(torch.zeros(3, 4), torch.zeros(5, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"bias must be \(V,\) = \(5,\), got \(4,\)"):
        head_token_logprobs(torch.zeros(3, 4), torch.zeros(5, 4), torch.zeros(3, dtype=torch.long), torch.zeros(4))
    with pytest.raises(ValueError, match="block_bytes must be positive, got 0"):
        head_token_logprobs(torch.zeros(3, 4), torch.zeros(5, 4), torch.zeros(3, dtype=torch.long), block_bytes=0)


def test_logprob_moments_of_batched_logits_match_float64():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 3, 41, generator=g) * 4
    mean, std = logprob_moments(logits)
    logp = torch.log_softmax(logits.double(), -1)
    want_mean = (logp.exp() * logp).sum(-1)
    want_std = (logp.exp() * (logp - want_mean[..., None]) ** 2).sum(-1).sqrt()
    assert mean.shape == std.shape == (2, 3) and mean.dtype == torch.float32
    torch.testing.assert_close(mean.double(), want_mean, rtol=0, atol=2e-5)
    torch.testing.assert_close(std.double(), want_std, rtol=0, atol=2e-5)


def test_logprob_moments_known_answers():
    # p = (1/4, 3/4): mean = E[log p], std = |log(3/4) - log(1/4)| sqrt(p (1 - p)) = log 3 * sqrt(3) / 4
    mean, std = logprob_moments(torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64))
    assert mean.dtype == torch.float64
    assert mean.item() == pytest.approx(0.25 * math.log(0.25) + 0.75 * math.log(0.75), abs=1e-12)
    assert std.item() == pytest.approx(math.log(3.0) * math.sqrt(3.0) / 4, abs=1e-12)
    # uniform over V: every log p is -log V, so mean = -log V (minus the entropy) and std = 0; in float32,
    # to the rounding of log-sum-exp = 7 + log 64 (a few float32 units of 11)
    mean, std = logprob_moments(torch.full((4, 64), 7.0))
    torch.testing.assert_close(mean, torch.full((4,), -math.log(64.0)), rtol=0, atol=2e-5)
    torch.testing.assert_close(std, torch.zeros(4), rtol=0, atol=2e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", logprob_backends())
def test_on_cuda_matches_float64_in_float32_and_bfloat16(backend):
    g = torch.Generator().manual_seed(3)
    n, d, vocab = 300, 64, 5003  # a few blocks of rows at 1 MiB of logits each
    hidden = torch.randn(n, d, generator=g)
    weight = torch.randn(vocab, d, generator=g) / 8
    targets = torch.randint(0, vocab, (n,), generator=g)
    for dtype, atol in ((torch.float32, 1e-4), (torch.bfloat16, 0.1)):
        h, w = hidden.to(dtype), weight.to(dtype)
        # The truth of the weights as the GPU holds them: bfloat16 rounds them before the product.
        want, want_mean, want_std = float64_truth(h.float(), w.float(), targets)
        logp, mean, std = head_token_logprobs(h.cuda(), w.cuda(), targets.cuda(), moments=True,
                                              block_bytes=2**20, backend=backend)
        assert logp.dtype == torch.float32 and logp.device.type == "cuda"
        # bfloat16 logits carry ~3 significant digits: |logit| ~ 3 gives ~0.02 nats; 0.1 bounds it.
        torch.testing.assert_close(logp.double().cpu(), want, rtol=0, atol=atol)
        torch.testing.assert_close(mean.double().cpu(), want_mean, rtol=0, atol=atol)
        torch.testing.assert_close(std.double().cpu(), want_std, rtol=0, atol=atol)
