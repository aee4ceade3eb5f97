"""memk.kernels: attention and log-prob ops for GPT-style models.

Knows nothing of experiments. Models pick an implementation by backend name
through `packed_attention(name)` and `logprob_ops(name)`; `reference` is plain
PyTorch and always available.
"""

from .backends import (
    attention_backends,
    default_attention_backend,
    default_logprob_backend,
    logprob_backends,
    logprob_ops,
    packed_attention,
    register_attention_backend,
    register_logprob_backend,
)
from .interfaces import BackendUnavailable, LogprobOps

# The fused log-prob ops; importing them compiles nothing (the kernels build on first call).
from .fused_logprob import cross_entropy, sequence_bits, token_logprobs
from .head_logprob import head_token_logprobs, logprob_moments

__all__ = [
    "BackendUnavailable",
    "LogprobOps",
    "attention",
    "attention_packed",
    "attention_backends",
    "cross_entropy",
    "default_attention_backend",
    "default_logprob_backend",
    "head_token_logprobs",
    "logprob_backends",
    "logprob_moments",
    "logprob_ops",
    "packed_attention",
    "register_attention_backend",
    "register_logprob_backend",
    "sequence_bits",
    "token_logprobs",
]


def __getattr__(name: str):
    # The Triton ops load on first use, so importing memk.kernels does not import triton.
    if name in ("attention", "attention_packed"):
        import importlib

        return getattr(importlib.import_module(f"{__name__}.flash_attention"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
