"""The loop that trains one GPT on one dataset, as its Schedule (memorize/schedule.py) says.

What the loop measures at each evaluation is passed in: a function giving the memorized
bits of the training set under the current model (`MemorizedBits`). Uniform data, the
Markov source and text all train through this one loop; `uniform_code_signal` is the
signal every experiment uses today (bits below the uniform code, per sequence).

At each evaluation a checkpoint is written atomically, so a killed run continues from
its last evaluation with the same batches and the same result.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from .bits import model_sequence_bits, uniform_sequence_entropy_bits, unintended_memorization
from .model import GPT, GPTConfig
from .outputs import atomic_write, read_state
from .precision import autocast_context, optimizer_for, weights_dtype
from .schedule import RunOutcome, Schedule, TrainConfig, batch_indices


class MemorizedBits(NamedTuple):
    total: float  # memorized bits of the whole training set
    mean_model_bits: float  # mean -log2 p(x | θ̂) per sequence


StopSignal = Callable[[GPT], MemorizedBits]


def uniform_code_signal(data: torch.Tensor, precision: str) -> StopSignal:
    """Σ max(0, (S-1)·log2 V - H(x | θ̂)) over the training set: mem_U against the uniform
    generator, exact for uniform random data (PAPER.md)."""
    def measure(model: GPT) -> MemorizedBits:
        config = model.config
        bits = model_sequence_bits(model, data, precision)
        reference = uniform_sequence_entropy_bits(config.vocab_size, config.seq_len)
        return MemorizedBits(float(unintended_memorization(bits, reference).sum()), float(bits.mean()))

    return measure


# torch's global generator: a run's first weights come from seeding it, and runs may start
# side by side on threads of one process (memorize/runs/workers.py), so one initialisation at a time.
GLOBAL_RNG = threading.Lock()


def seeded_gpt(config: GPTConfig, seed: int, attention_backend: str, logprob_backend: str,
               device: torch.device, dtype: torch.dtype | None = None) -> GPT:
    """The GPT a run of this seed starts from: torch.manual_seed(seed), then GPT(config), rounded to
    `dtype` where one is given (so a run's first weights depend on its precision by rounding alone)."""
    with GLOBAL_RNG:
        torch.manual_seed(seed)
        model = GPT(config, attention_backend=attention_backend, logprob_backend=logprob_backend)
    return model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)


CHECKPOINT_KEYS = {"model", "optimizer", "step", "curve", "best", "loss", "cooldown_start", "stop_reason", "train_seconds"}


def save_checkpoint(state: dict, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path, device: torch.device) -> dict:
    state = torch.load(path, map_location=device, weights_only=False)
    missing = CHECKPOINT_KEYS - set(state) if isinstance(state, dict) else CHECKPOINT_KEYS
    if missing:
        raise KeyError(f"no {', '.join(sorted(missing))}")
    return state


def train_to_saturation(
    model_config: GPTConfig,
    data: torch.Tensor,
    cfg: TrainConfig,
    device: torch.device,
    checkpoint_path: Path | None = None,
    attention_backend: str = "sdpa",
    logprob_backend: str = "reference",
    on_progress: Callable[[dict], None] | None = None,
    stop_signal: StopSignal | None = None,
) -> tuple[GPT, RunOutcome]:
    """Train a fresh GPT on `data` (n, S) until its memorized bits plateau or max_steps.

    `stop_signal` measures the model at each evaluation (default: `uniform_code_signal`
    of `data`). If checkpoint_path exists, training continues from it (same batches, same
    result up to floating-point nondeterminism as an uninterrupted run).
    """
    n = len(data)
    model = seeded_gpt(model_config, cfg.seed, attention_backend, logprob_backend, device, weights_dtype(cfg.precision))
    optimizer = optimizer_for(model.parameters(), cfg.precision, cfg.lr, cfg.betas, cfg.weight_decay)
    data_on_device = data.to(device)
    measure = stop_signal or uniform_code_signal(data_on_device, cfg.precision)

    schedule, elapsed = Schedule(cfg), 0.0

    state = None if checkpoint_path is None else read_state(
        checkpoint_path, lambda p: load_checkpoint(p, device), "checkpoint", "and the run starts over"
    )
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state)
        elapsed = state["train_seconds"]

    started = time.perf_counter() - elapsed
    model.train()
    while True:
        if schedule.evaluation_due():
            schedule.record(*measure(model))
            if checkpoint_path is not None:
                save_checkpoint(
                    {
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        **schedule.state_dict(),
                        "train_seconds": time.perf_counter() - started,
                    },
                    checkpoint_path,
                )
        if schedule.begin_cooldown_if_due():
            continue  # evaluate again at once if there is no cool-down
        if schedule.finished:
            break
        for group in optimizer.param_groups:
            group["lr"] = schedule.learning_rate()
        x = data_on_device[batch_indices(schedule.step, n, cfg.batch_size, cfg.seed).to(device)]
        with autocast_context(device, cfg.precision):
            loss = model.loss(x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        schedule.advance(float(loss.detach()))
        if on_progress is not None:
            on_progress({"step": schedule.step, "loss": schedule.loss, "bits": schedule.curve[-1][1]})

    return model, schedule.outcome(time.perf_counter() - started)
