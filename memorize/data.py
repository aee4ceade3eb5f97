"""Uniform random token sequences: the synthetic data whose entropy is known exactly."""

from __future__ import annotations

import numpy as np
import torch

# Sequences are drawn in blocks, each from its own child seed, so the dataset of size N
# is always the first N sequences of one stream: sizes nest, whatever N is.
BLOCK = 1024


def uniform_random_sequences(n: int, vocab_size: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """The first n sequences of the seeded stream: int64 tensor (n, seq_len), tokens uniform on [0, vocab_size)."""
    for name, value in (("n", n), ("vocab_size", vocab_size), ("seq_len", seq_len)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    n_blocks = -(-n // BLOCK)
    children = np.random.SeedSequence([seed, vocab_size, seq_len]).spawn(n_blocks)
    blocks = [np.random.default_rng(c).integers(0, vocab_size, size=(BLOCK, seq_len)) for c in children]
    return torch.from_numpy(np.concatenate(blocks)[:n]).long()
