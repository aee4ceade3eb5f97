import math

import numpy as np
import pytest
import torch

from memk.memorize.bits import (
    model_sequence_bits,
    uniform_sequence_entropy_bits,
    unintended_memorization,
)
from memk.memorize.data import uniform_random_sequences
from memk.memorize.model import GPT, GPTConfig
from memk.memorize.schedule import TrainConfig
from memk.memorize.train import train_to_saturation


def float64_sequence_bits(model: GPT, x: torch.Tensor) -> np.ndarray:
    """Independent code length: a float64 copy of the model, softmax written out in numpy."""
    double = GPT(model.config, attention_backend="reference").double()
    double.load_state_dict(model.state_dict())
    with torch.no_grad():
        logits = double(x[:, :-1]).numpy()
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    targets = x[:, 1:].numpy()
    picked = np.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    return -picked.sum(axis=-1) / math.log(2)


def test_uniform_entropy_counts_the_coded_tokens():
    # S=64, V=2048: 63 coded tokens of 11 bits.
    assert uniform_sequence_entropy_bits(2048, 64) == pytest.approx(63 * 11)
    assert uniform_sequence_entropy_bits(7, 5) == pytest.approx(4 * math.log2(7))


@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_model_bits_match_an_independent_float64_computation(backend):
    torch.manual_seed(1)
    model = GPT(GPTConfig(2, 32, 2, 37, 19), logprob_backend=backend)
    with torch.no_grad():  # move away from the near-uniform init so the bits are not trivial
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    x = uniform_random_sequences(70, 37, 19, seed=5)
    ours = model_sequence_bits(model, x, batch_size=16)
    expected = float64_sequence_bits(model, x)
    assert ours.dtype == np.float64 and ours.shape == (70,)
    # float32 logits: per-sequence error far below a thousandth of a bit per token
    np.testing.assert_allclose(ours, expected, rtol=0, atol=18 * 1e-4)


def test_fused_and_reference_backends_agree_on_the_same_checkpoint():
    torch.manual_seed(3)
    config = GPTConfig(1, 32, 2, 61, 24)
    fused = GPT(config, logprob_backend="fused")
    reference = GPT(config, logprob_backend="reference")
    reference.load_state_dict(fused.state_dict())
    x = uniform_random_sequences(40, 61, 24, seed=1)
    for precision in ("float32", "bfloat16-autocast"):
        a = model_sequence_bits(fused, x, precision=precision)
        b = model_sequence_bits(reference, x, precision=precision)
        # the same logits on both sides: 23 float32 log-probs of ~6 bits differ by rounding alone
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-3)
    torch.testing.assert_close(fused.loss(x), reference.loss(x))


def test_bfloat16_autocast_evaluation_stays_close_to_float32():
    torch.manual_seed(2)
    model = GPT(GPTConfig(1, 32, 2, 50, 16))
    x = uniform_random_sequences(20, 50, 16, seed=0)
    f32 = model_sequence_bits(model, x, precision="float32")
    bf16 = model_sequence_bits(model, x, precision="bfloat16-autocast")
    np.testing.assert_allclose(bf16, f32, rtol=2e-2)


def test_unintended_memorization_is_the_clamped_difference():
    got = unintended_memorization(np.array([10.0, 30.0, 20.0]), 20.0)
    np.testing.assert_array_equal(got, [10.0, 0.0, 0.0])


def test_untrained_model_memorizes_about_nothing():
    torch.manual_seed(0)
    config = GPTConfig(1, 32, 2, 64, 32)
    x = uniform_random_sequences(200, 64, 32, seed=0)
    bits = model_sequence_bits(GPT(config), x)
    entropy = uniform_sequence_entropy_bits(64, 32)
    # At init the model predicts near-uniformly: its code lengths sit within a fraction of a bit of H(x|θ).
    assert unintended_memorization(bits, entropy).sum() < 0.005 * len(x) * entropy
    assert abs(bits.mean() - entropy) < 0.01 * entropy


def test_a_small_model_memorizes_nearly_all_of_four_sequences():
    config = GPTConfig(1, 32, 2, 16, 16)
    data = uniform_random_sequences(4, 16, 16, seed=0)
    cfg = TrainConfig(lr=1e-2, warmup_steps=10, batch_size=4, max_steps=400, min_steps=400, eval_every=50)
    model, outcome = train_to_saturation(config, data, cfg, torch.device("cpu"))
    total = 4 * uniform_sequence_entropy_bits(16, 16)
    assert outcome.memorized_bits > 0.95 * total
    assert model_sequence_bits(model, data).sum() < 0.05 * total
