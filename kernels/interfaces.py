"""The types memk.kernels' modules share: what a backend provides, and the error it raises.

A leaf module (it imports only torch): the registry (backends.py) and the implementations
(fused_logprob.py, flash_attention.py) all import these from here, so an implementation never
has to import the registry that loads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


class BackendUnavailable(RuntimeError):
    """A backend exists but cannot run here (no compiler, no CUDA, ...)."""


@dataclass(frozen=True)
class LogprobOps:
    """The three log-prob ops one backend provides (signatures as in memk.kernels.reference)."""

    token_logprobs: Callable[..., torch.Tensor]
    cross_entropy: Callable[..., torch.Tensor]
    sequence_bits: Callable[..., torch.Tensor]


# packed attention: (qkv: (batch, seq, 3·d_model), n_head) -> (batch, seq, d_model), causal.
PackedAttention = Callable[[torch.Tensor, int], torch.Tensor]
