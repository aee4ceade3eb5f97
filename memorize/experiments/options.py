"""What the command line gives an experiment and gets back: presets, model and number lists,
training overrides, the checks every experiment makes before it starts (once), what they resolve
(`Checked`) and what a command prints (`CommandResult`).

Every problem is a ConfigError whose message names the option and the fix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Generic, Iterable, TypeVar

import torch

from ..constants import PRECISIONS
from ..errors import ConfigError, warn
from ..model import GPTConfig
from ..precision import bfloat16_cpu_note
from ..runtime import Backends, check_backends, resolve_backends, resolve_device
from ..schedule import TrainConfig
from ..runs.launchers import executor_from_options
from .knobs import ExecutionKnobs, TrainingKnobs

E = TypeVar("E")
SEED_LIMIT = 2**32  # seeds feed numpy's and torch's generators, and batch seeds scale them by ~10^6


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


def override_training(train: TrainConfig, knobs: TrainingKnobs, cooldown_steps: int | None = None) -> TrainConfig:
    """The command line's changes to a preset's schedule: a new step cap keeps the preset's
    proportions (cool-down share, min_steps within the cap) unless the cool-down is given."""
    max_steps, lr = knobs.max_steps, knobs.lr
    if max_steps is not None and max_steps < 1:
        raise ConfigError(f"--max-steps must be >= 1 (the step cap, cool-down included), got {max_steps}")
    if lr is not None and not (lr > 0 and math.isfinite(lr)):
        raise ConfigError(f"--lr must be a positive finite number, got {lr}")
    try:
        if max_steps is not None:
            train = train.with_step_cap(max_steps, cooldown_steps)
        elif cooldown_steps is not None:
            train = replace(train, cooldown_steps=cooldown_steps)
        return replace(train, **{k: v for k, v in (("lr", lr), ("batch_size", knobs.batch_size)) if v is not None})
    except ValueError as e:
        raise ConfigError(str(e)) from e


def override_common(changes: dict, knobs: TrainingKnobs, seed: int | None) -> dict:
    """`changes` to an experiment, with the knobs every experiment has as a field of its own (device,
    kernel backends, seed) where given."""
    for key, value in (("device", knobs.device), ("seed", seed), ("attention_backend", knobs.attention_backend),
                       ("logprob_backend", knobs.logprob_backend)):
        if value is not None:
            changes[key] = value
    return changes


def choose_sizes(sizes: str | None, size_factors: str | None) -> dict:
    """--sizes or --size-factors (never both: one would be silently ignored) as experiment fields."""
    if sizes is not None and size_factors is not None:
        raise ConfigError("give either --sizes (sequences) or --size-factors (multiples of capacity), not both")
    if sizes is not None:
        return {"dataset_sizes": parse_numbers(sizes, int, "dataset sizes")}
    if size_factors is not None:
        return {"size_factors": parse_numbers(size_factors, float, "size factors")}
    return {}


def output_folder(out: str | None, default: Path) -> Path:
    """--out as a folder; an empty one would silently mean the current folder."""
    if out is None:
        return default
    if not out.strip():
        raise ConfigError("--out is empty; give the folder to write to (or leave --out out for the default)")
    return Path(out)


def check_experiment(
    *,
    models: tuple[GPTConfig, ...],
    precisions: Iterable[str],
    dataset_sizes: tuple[int, ...] | None,
    size_factors: dict[str, tuple[float, ...]],
    seed: int,
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
    named_twice = sorted({m.name for m in models if models.count(m) > 1})
    if named_twice:
        raise ConfigError(f"model {', '.join(named_twice)} is named twice; give each model once")
    for m in models:
        if m.seq_len < 2:
            raise ConfigError(f"seq_len must be >= 2 (the first token is context, the rest are coded), got {m.seq_len}")
        if m.vocab_size < 2:
            raise ConfigError(f"vocab size must be >= 2: with {m.vocab_size} token a sequence carries no bits")
    if not 0 <= seed < SEED_LIMIT:
        raise ConfigError(f"--seed must lie in [0, 2^32), got {seed}")
    for p in precisions:
        if p not in PRECISIONS:
            raise ConfigError(f"unknown precision {p!r}; choose from {', '.join(PRECISIONS)}")
    if dataset_sizes is not None:
        if not dataset_sizes or any(n < 1 for n in dataset_sizes):
            raise ConfigError(f"dataset sizes must be >= 1 sequence, got {list(dataset_sizes)}")
    else:
        for what, factors in size_factors.items():
            if not factors or any(not (f > 0 and math.isfinite(f)) for f in factors):
                raise ConfigError(f"{what} must be positive finite numbers, got {list(factors)}")
    dev = resolve_device(device)
    note = bfloat16_cpu_note(dev.type, list(precisions))
    if note:  # said once: an experiment is checked once
        warn(note)
    check_backends(attention_backend, logprob_backend)
    return dev


@dataclass(frozen=True)
class Checked(Generic[E]):
    """An experiment validated once, with what its checks resolved: the device and the kernel backends."""

    experiment: E
    device: torch.device
    backends: Backends

    @classmethod
    def of(cls, experiment: E, device: torch.device) -> Checked[E]:
        """The experiment on its validated device, with the backends its options pick there."""
        return cls(experiment, device, resolve_backends(device, experiment.attention_backend,
                                                        experiment.logprob_backend))


@dataclass(frozen=True)
class CommandResult:
    """What an experiment command hands back to the command line: the text it prints, its output
    folder, and its summary (whose failed_runs a rerun retries)."""

    text: str
    out: Path
    summary: dict


def executor_for(execution: ExecutionKnobs, device: torch.device):
    """The executor a command's execution knobs ask for, on the device its one check resolved."""
    return executor_from_options(execution.executor_name, device, execution.ensemble, execution.ray_address,
                                 execution.gpus_per_task, execution.cpus_per_task, execution.workers)
