"""memk.kernels: attention and log-prob ops for GPT-style models.

Knows nothing of experiments. Models pick an implementation by backend name
through `packed_attention(name)` and `logprob_ops(name)`; `reference` is plain
PyTorch and always available.
"""

from .backends import (
    BackendUnavailable,
    LogprobOps,
    attention_backends,
    default_attention_backend,
    default_logprob_backend,
    logprob_backends,
    logprob_ops,
    packed_attention,
    register_attention_backend,
    register_logprob_backend,
)

__all__ = [
    "BackendUnavailable",
    "LogprobOps",
    "attention_backends",
    "default_attention_backend",
    "default_logprob_backend",
    "logprob_backends",
    "logprob_ops",
    "packed_attention",
    "register_attention_backend",
    "register_logprob_backend",
]
