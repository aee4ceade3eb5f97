"""What the command line gives an experiment: presets, model and number lists, training
overrides, and the checks every experiment makes before it starts.

Every problem is a ConfigError whose message names the option and the fix.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Iterable, TypeVar

import torch

from .errors import ConfigError
from .model import GPTConfig
from .runtime import check_backends, resolve_device
from .schedule import PRECISIONS, TrainConfig

E = TypeVar("E")


def pick_preset(presets: dict[str, Callable[[], E]], name: str) -> E:
    if name not in presets:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(presets)}")
    return presets[name]()


def parse_models(spec: str, vocab_size: int, seq_len: int) -> tuple[GPTConfig, ...]:
    """'1x32,2x64x4' -> GPTConfigs: LAYERSxD_MODEL[xHEADS]; heads default to d_model // 32 (at least 1)."""
    models = []
    for item in spec.split(","):
        parts = item.strip().lower().split("x")
        try:
            numbers = [int(p) for p in parts]
        except ValueError:
            numbers = []
        if len(numbers) not in (2, 3):
            raise ConfigError(f"cannot read model {item.strip()!r}: write LAYERSxD_MODEL or LAYERSxD_MODELxHEADS, e.g. 2x64x2")
        n_layer, d_model = numbers[:2]
        n_head = numbers[2] if len(numbers) == 3 else max(1, d_model // 32)
        try:
            models.append(
                GPTConfig(n_layer=n_layer, d_model=d_model, n_head=n_head, vocab_size=vocab_size, seq_len=seq_len)
            )
        except ValueError as e:
            raise ConfigError(f"model {item.strip()!r}: {e}") from e
    return tuple(models)


def reshape_models(models: Iterable[GPTConfig], vocab_size: int, seq_len: int) -> tuple[GPTConfig, ...]:
    """The same shapes for another vocabulary or sequence length."""
    try:
        return tuple(replace(m, vocab_size=vocab_size, seq_len=seq_len) for m in models)
    except ValueError as e:
        raise ConfigError(str(e)) from e


def parse_numbers(spec: str, kind: type, what: str) -> tuple:
    try:
        return tuple(kind(s) for s in spec.split(",") if s.strip())
    except ValueError as e:
        raise ConfigError(f"cannot read {what} {spec!r}: give comma-separated numbers, e.g. 10,20,40") from e


def override_training(
    train: TrainConfig,
    max_steps: int | None = None,
    cooldown_steps: int | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
) -> TrainConfig:
    """The command line's changes to a preset's schedule: a new step cap keeps the preset's
    proportions (cool-down share, min_steps within the cap) unless the cool-down is given."""
    try:
        if max_steps is not None:
            train = train.with_step_cap(max_steps, cooldown_steps)
        elif cooldown_steps is not None:
            train = replace(train, cooldown_steps=cooldown_steps)
        return replace(train, **{k: v for k, v in (("lr", lr), ("batch_size", batch_size)) if v is not None})
    except ValueError as e:
        raise ConfigError(str(e)) from e


def check_experiment(
    *,
    models: tuple[GPTConfig, ...],
    precisions: Iterable[str],
    dataset_sizes: tuple[int, ...] | None,
    size_factors: dict[str, tuple[float, ...]],
    device: str,
    attention_backend: str,
    logprob_backend: str,
) -> torch.device:
    """The checks both experiments make before they start; returns the device.

    size_factors maps a name for the message ("size factors") to the factors; they are
    checked only where no explicit dataset_sizes replace them.
    """
    if not models:
        raise ConfigError("no models to train: give at least one with --models")
    for m in models:
        if m.seq_len < 2:
            raise ConfigError(f"seq_len must be >= 2 (the first token is context, the rest are coded), got {m.seq_len}")
    for p in precisions:
        if p not in PRECISIONS:
            raise ConfigError(f"unknown precision {p!r}; choose from {', '.join(PRECISIONS)}")
    if dataset_sizes is not None:
        if not dataset_sizes or any(n < 1 for n in dataset_sizes):
            raise ConfigError(f"dataset sizes must be >= 1 sequence, got {list(dataset_sizes)}")
    else:
        for what, factors in size_factors.items():
            if not factors or any(not f > 0 for f in factors):
                raise ConfigError(f"{what} must be positive numbers, got {list(factors)}")
    dev = resolve_device(device)
    check_backends(attention_backend, logprob_backend)
    return dev
