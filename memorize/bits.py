"""Exact bits: code lengths under the trained model and the true generator.

memk codes tokens 1..S-1 of every sequence, each given the tokens before it; token 0
is the context the model starts from and is coded on neither side. For uniform
random tokens the true generator θ gives H(x | θ) = (S-1)·log2 V bits for exactly
these tokens, so both sides of mem_U code the same thing (PAPER.md).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .model import GPT
from .precision import autocast_context


def coded_tokens(seq_len: int) -> int:
    """How many tokens of a sequence are coded: all but the first."""
    return seq_len - 1


def uniform_sequence_entropy_bits(vocab_size: int, seq_len: int) -> float:
    """H(x | θ) for one sequence of the uniform generator, over the coded tokens."""
    return coded_tokens(seq_len) * math.log2(vocab_size)




@torch.no_grad()
def model_sequence_bits(
    model: GPT, data: torch.Tensor, precision: str = "float32", batch_size: int = 512
) -> np.ndarray:
    """-log2 p(x_1..x_{S-1} | x_0, θ̂) per sequence, float64 (n,).

    The forward pass runs as the model was trained (in its weights' dtype, under autocast for
    "bfloat16-autocast"); the
    log-probabilities are taken in float32 from its logits and summed in float64.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(data), batch_size):
            x = data[start : start + batch_size].to(device, non_blocking=True)
            with autocast_context(device, precision):
                logits = model.next_token_logits(x)
            out.append(model.logprob.sequence_bits(logits, x[:, 1:]).double().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros(0)


def unintended_memorization(model_bits: np.ndarray, reference_bits: np.ndarray | float) -> np.ndarray:
    """mem_U per sequence: max(0, H^K(x | θ) - H^K(x | θ̂)), in bits (PAPER.md)."""
    return np.maximum(0.0, np.asarray(reference_bits, dtype=np.float64) - np.asarray(model_bits, dtype=np.float64))
