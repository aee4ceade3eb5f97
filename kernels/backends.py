"""Backend registry: the seam between models and kernel implementations.

A model asks for ops by backend name (log-prob: "reference", "fused"; attention: "reference",
"sdpa", "triton") and never imports an implementation. Backends register a loader, so a
backend that needs compiling (CUDA/C++) or Triton is only built when someone asks for it, and
a failure to build is an error that names the alternatives, never a silent switch.
"""

from __future__ import annotations

import importlib.util
from typing import Callable

import torch

from . import reference
from .interfaces import BackendUnavailable, LogprobOps, PackedAttention


def _load_fused_logprob() -> LogprobOps:
    # The C++/CUDA kernels compile here, on first use (cached), never at import.
    from .fused_logprob import logprob_ops as fused_logprob_ops

    return fused_logprob_ops()


_LOGPROB_LOADERS: dict[str, Callable[[], LogprobOps]] = {
    "reference": lambda: LogprobOps(reference.token_logprobs, reference.cross_entropy, reference.sequence_bits),
    "fused": _load_fused_logprob,
}


def _load_triton_attention() -> PackedAttention:
    # Imported here, not at the top: importing memk.kernels must not import triton.
    try:
        from .flash_attention import load_backend
    except ImportError as e:
        raise BackendUnavailable(
            f"the 'triton' attention backend needs triton ({e}); use 'sdpa' or 'reference' instead"
        ) from e
    return load_backend()


_ATTENTION_LOADERS: dict[str, Callable[[], PackedAttention]] = {
    "reference": lambda: reference.packed_causal_attention,
    "sdpa": lambda: reference.packed_causal_attention_sdpa,
    "triton": _load_triton_attention,
}
_loaded: dict[tuple[str, str], object] = {}  # (kind, name) -> what its loader returned, loaded once


def register_logprob_backend(name: str, loader: Callable[[], LogprobOps]) -> None:
    _LOGPROB_LOADERS[name] = loader


def register_attention_backend(name: str, loader: Callable[[], PackedAttention]) -> None:
    _ATTENTION_LOADERS[name] = loader


def logprob_backends() -> list[str]:
    return sorted(_LOGPROB_LOADERS)


def attention_backends() -> list[str]:
    return sorted(_ATTENTION_LOADERS)


def _load(kind: str, loaders: dict, name: str):
    if name not in loaders:
        raise ValueError(f"unknown {kind} backend {name!r}; choose one of {', '.join(sorted(loaders))}")
    key = (kind, name)
    if key not in _loaded:
        _loaded[key] = loaders[name]()
    return _loaded[key]


def logprob_ops(name: str) -> LogprobOps:
    """The log-prob ops of backend `name`; raises ValueError (unknown) or BackendUnavailable."""
    return _load("log-prob", _LOGPROB_LOADERS, name)


def packed_attention(name: str) -> PackedAttention:
    """The packed causal attention of backend `name`; raises ValueError or BackendUnavailable."""
    return _load("attention", _ATTENTION_LOADERS, name)


def default_logprob_backend(device: torch.device | str) -> str:
    """The log-prob backend a model gets when it names none: `fused` where its kernels can be
    compiled for `device` (a C++ compiler, and for CUDA the toolkit, are present), else `reference`.

    Checks for the tools only and compiles nothing; asking for `fused` by name where it cannot be
    built raises BackendUnavailable instead of switching silently.
    """
    from .fused_logprob import can_build

    return "fused" if can_build(device) else "reference"


def default_attention_backend(device: torch.device | str) -> str:
    """The attention backend a model gets when it names none: the Triton kernel on CUDA, torch SDPA elsewhere."""
    if torch.device(device).type == "cuda" and importlib.util.find_spec("triton") is not None:
        return "triton"
    return "sdpa"
