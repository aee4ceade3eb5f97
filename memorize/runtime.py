"""Where runs execute: the device, the kernel backends for it, and progress bars.

Shared by every experiment and executor; the backends come from memk.kernels' registry
through its public functions only.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from memk import kernels

from .errors import ConfigError


class Backends(NamedTuple):
    """The memk.kernels backends a model is built with."""

    attention: str
    logprob: str


def resolve_device(device: str) -> torch.device:
    """'auto' (CUDA where torch sees one, else the CPU), cpu, cuda or cuda:N; ConfigError otherwise."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but this torch sees no CUDA device; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {device!r} is not supported: use cpu or cuda")
    return dev


def check_backends(attention_backend: str, logprob_backend: str) -> None:
    """Backend names must be 'auto' or registered in memk.kernels."""
    for kind, name, known in (
        ("attention", attention_backend, kernels.attention_backends()),
        ("log-prob", logprob_backend, kernels.logprob_backends()),
    ):
        if name != "auto" and name not in known:
            raise ConfigError(f"unknown {kind} backend {name!r}; choose auto or one of {', '.join(known)}")


def resolve_backends(device: torch.device, attention_backend: str, logprob_backend: str) -> Backends:
    """'auto' becomes the best backend memk.kernels has for the device."""
    return Backends(
        kernels.default_attention_backend(device) if attention_backend == "auto" else attention_backend,
        kernels.default_logprob_backend(device) if logprob_backend == "auto" else logprob_backend,
    )


def progress_bar(**kwargs):
    from tqdm.auto import tqdm

    return tqdm(dynamic_ncols=True, leave=kwargs.pop("leave", True), **kwargs)


def step_progress(bar, max_steps: int) -> Callable[[dict], None]:
    """train_to_saturation's on_progress for a step bar: moved every 10 steps, loss and bits shown."""
    last = [0]

    def on_progress(p: dict) -> None:
        if p["step"] % 10 == 0 or p["step"] == max_steps:
            bar.update(p["step"] - last[0])
            last[0] = p["step"]
            bar.set_postfix(loss=f"{p['loss']:.3f}", bits=f"{p['bits']:.0f}")

    return on_progress
