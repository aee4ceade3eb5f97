"""Training to saturation: AdamW on one dataset until memorized bits stop rising.

Schedule: AdamW (betas 0.9/0.98, weight decay 0 by default, as the paper's Adam),
learning rate rising linearly from 0 over `warmup_steps`, then constant, then a
cool-down: a linear decay to 0 over `cooldown_steps` (warmup-stable-decay). The
horizon is not known in advance, so the cool-down starts when the bits curve flattens
(`plateau_reached`), or `cooldown_steps` before the step cap `max_steps`, whichever
comes first; the run ends when the cool-down does. Annealing the rate lets the model
settle into the minimum the constant rate only circles, so it stores more bits.

Every `eval_every` steps the memorized bits of the whole training set are measured and
a checkpoint is written atomically, so a killed run continues from its last evaluation.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from .bits import autocast_context, model_sequence_bits, uniform_sequence_entropy_bits, unintended_memorization
from .model import GPT, GPTConfig
from .outputs import atomic_write

PRECISIONS = ("float32", "bfloat16")


@dataclass(frozen=True)
class TrainConfig:
    lr: float = 1e-3
    warmup_steps: int = 100
    batch_size: int = 64
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0
    max_steps: int = 3000  # the step cap, cool-down included
    cooldown_steps: int = 0  # linear decay of the learning rate to 0 that ends every run
    min_steps: int = 500  # never stop on a plateau before this
    eval_every: int = 100  # steps between measurements of the bits curve
    plateau_window: int = 5  # evaluations the plateau rule looks back over
    plateau_rel_tol: float = 0.005  # smallest relative gain over the window that counts as rising
    precision: str = "float32"
    seed: int = 0

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not 0 <= self.cooldown_steps <= self.max_steps:
            raise ValueError(f"cooldown_steps must lie in [0, max_steps={self.max_steps}], got {self.cooldown_steps}")
        for name in ("warmup_steps", "min_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("batch_size", "max_steps", "eval_every", "plateau_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")

    def to_dict(self) -> dict:
        return asdict(self)

    def with_step_cap(self, max_steps: int, cooldown_steps: int | None = None) -> TrainConfig:
        """The same schedule under another step cap: the cool-down keeps its share of the
        cap unless given, and min_steps stays within the cap."""
        if cooldown_steps is None:
            cooldown_steps = round(max_steps * self.cooldown_steps / self.max_steps)
        return replace(self, max_steps=max_steps, cooldown_steps=cooldown_steps, min_steps=min(self.min_steps, max_steps))


def learning_rate(step: int, cfg: TrainConfig, cooldown_start: int | None = None) -> float:
    """Linear warm-up over warmup_steps, constant, then (from cooldown_start) linear decay to 0."""
    if cooldown_start is not None and step >= cooldown_start:
        return cfg.lr * max(0.0, 1.0 - (step - cooldown_start) / cfg.cooldown_steps)
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return cfg.lr


def plateau_reached(curve: list[float], window: int, rel_tol: float) -> bool:
    """The stopping rule on a bits curve (memorized bits at successive evaluations).

    Memorized bits have stopped rising when the best value of the last `window`
    evaluations beats the best value before them by less than `rel_tol` of the latter.
    Taking the best rather than the last value makes the rule robust to noise. Needs
    more than `window` evaluations; a curve that never rose above zero has not plateaued.
    """
    if len(curve) <= window:
        return False
    before = max(curve[:-window])
    recent = max(curve[-window:])
    if before <= 0:
        return False
    return recent - before < rel_tol * before


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> torch.Tensor:
    """Indices of the sequences in step's batch: epochs of seeded permutations, stateless.

    Depends only on (step, n, batch_size, seed), so a resumed run sees exactly the batches
    an uninterrupted one would. With n <= batch_size every step is the full dataset.
    """
    if n <= batch_size:
        return torch.arange(n)
    start = step * batch_size
    out = []
    while start < (step + 1) * batch_size:
        epoch, offset = divmod(start, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        take = min(n - offset, (step + 1) * batch_size - start)
        out.append(perm[offset : offset + take])
        start += take
    return torch.cat(out)


@dataclass
class RunOutcome:
    steps: int
    stop_reason: str  # "plateau" or "step_cap"
    memorized_bits: float  # best total mem_U on the bits curve (the model at that evaluation)
    memorized_bits_final: float
    model_bits_per_sequence: float  # mean -log2 p(x|θ̂) at the best evaluation
    final_loss: float
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, memorized bits)
    train_seconds: float = 0.0


def save_checkpoint(state: dict, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def train_to_saturation(
    model_config: GPTConfig,
    data: torch.Tensor,
    cfg: TrainConfig,
    device: torch.device,
    checkpoint_path: Path | None = None,
    attention_backend: str = "sdpa",
    logprob_backend: str = "reference",
    on_progress: Callable[[dict], None] | None = None,
) -> tuple[GPT, RunOutcome]:
    """Train a fresh GPT on `data` (n, S) until memorized bits plateau or max_steps.

    If checkpoint_path exists, training continues from it (same batches, same result
    up to floating-point nondeterminism as an uninterrupted run).
    """
    n = len(data)
    entropy = uniform_sequence_entropy_bits(model_config.vocab_size, model_config.seq_len)
    torch.manual_seed(cfg.seed)
    model = GPT(model_config, attention_backend=attention_backend, logprob_backend=logprob_backend).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    data_on_device = data.to(device)

    step, curve, best, elapsed, loss_value = 0, [], (-1.0, None, math.nan), 0.0, math.nan
    cooldown_start, stop_reason = None, None  # the step the learning-rate decay began, and why
    if checkpoint_path is not None and checkpoint_path.exists():
        state = torch.load(checkpoint_path, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, curve, elapsed = state["step"], [tuple(c) for c in state["curve"]], state["train_seconds"]
        best, loss_value = tuple(state["best"]), state["loss"]
        cooldown_start, stop_reason = state["cooldown_start"], state["stop_reason"]

    def evaluate() -> tuple[float, float]:
        bits = model_sequence_bits(model, data_on_device, cfg.precision)
        return float(unintended_memorization(bits, entropy).sum()), float(bits.mean())

    started = time.perf_counter() - elapsed
    model.train()
    while True:
        end = None if cooldown_start is None else cooldown_start + cfg.cooldown_steps
        if step % cfg.eval_every == 0 or step >= cfg.max_steps or (end is not None and step >= end):
            if not curve or curve[-1][0] != step:
                mem, mean_bits = evaluate()
                curve.append((step, mem))
                if mem > best[0]:
                    best = (mem, step, mean_bits)
                if checkpoint_path is not None:
                    save_checkpoint(
                        {
                            "model": model.state_dict(),
                            "optimizer": optimizer.state_dict(),
                            "step": step,
                            "curve": curve,
                            "best": best,
                            "loss": loss_value,
                            "cooldown_start": cooldown_start,
                            "stop_reason": stop_reason,
                            "train_seconds": time.perf_counter() - started,
                        },
                        checkpoint_path,
                    )
        if cooldown_start is None:  # still in the stable phase: has it ended?
            evaluated_now = curve[-1][0] == step
            if evaluated_now and step >= cfg.min_steps and plateau_reached(
                [b for _, b in curve], cfg.plateau_window, cfg.plateau_rel_tol
            ):
                stop_reason, cooldown_start = "plateau", step
            elif step >= cfg.max_steps - cfg.cooldown_steps:
                stop_reason, cooldown_start = "step_cap", step
            if cooldown_start is not None:
                continue  # evaluate again at once if there is no cooldown
        if end is not None and step >= end:
            break
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, cfg, cooldown_start)
        x = data_on_device[batch_indices(step, n, cfg.batch_size, cfg.seed).to(device)]
        with autocast_context(device, cfg.precision):
            loss = model.loss(x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        step += 1
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"training diverged at step {step} (loss {loss_value}); lower the learning rate")
        if on_progress is not None:
            on_progress({"step": step, "loss": loss_value, "bits": curve[-1][1]})

    return model, RunOutcome(
        steps=step,
        stop_reason=stop_reason,
        memorized_bits=best[0],
        memorized_bits_final=curve[-1][1],
        model_bits_per_sequence=best[2],
        final_loss=loss_value,
        curve=curve,
        train_seconds=time.perf_counter() - started,
    )
