"""The training loop: runs stepped each as its Schedule (memorize/schedule.py) says, one alone or K together.

`TrainingLoop` is the one loop: for each run in a slot it evaluates and checkpoints when due,
begins the cool-down, finishes the run; then it steps every run still training, each on its own
batch (batch_indices) at its own learning rate: loss, backward, clip by the run's own gradient
norm, AdamW. How the slots' models and optimizers are held and stepped is a `TrainingStep`'s:
`AloneStep` (one GPT and its torch optimizer, what `train_to_saturation` trains) or
memorize/ensemble.py's `EnsembleStep` (K GPTs stacked, memorize/runs/ensemble_executor.py).

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
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple, Protocol

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


# ---------------------------------------------------------------------------------------
# The loop, and the steps it drives


class TrainingStep(Protocol):
    """K slots, each one run's model and optimizer state, stepped together by TrainingLoop.

    Each step the loop asks `losses` of the slots' batches (None: an empty slot), `zero_grad`,
    backpropagates the losses' sum (slots never mix: each slot's gradient is its own run's),
    `clip_gradients` by each slot's own norm and `step`s the active slots. A slot takes a run
    with `load` and is measured and recorded as a plain GPT (`gpt`), checkpointed as a GPT and
    a torch AdamW state dict (`checkpoint`) and dropped by `keep`."""

    @property
    def slots(self) -> int: ...

    def load(self, k: int, cfg: TrainConfig, checkpoint: dict | None) -> None:
        """Slot k takes a run: from a checkpoint (load_checkpoint's dict), or None: from the start."""

    def gpt(self, k: int) -> GPT:
        """Slot k's model as a plain GPT."""

    def checkpoint(self, k: int, gpt: GPT, cfg: TrainConfig, lr: float) -> dict:
        """{"model": a GPT state dict, "optimizer": a torch AdamW state dict} of slot k (gpt: self.gpt(k),
        lr: its param group's, where one must be made)."""

    def losses(self, batches: list[torch.Tensor | None]) -> torch.Tensor:
        """Each slot's mean next-token loss on its batch (K,), 0 for an empty slot."""

    def zero_grad(self) -> None: ...

    def clip_gradients(self, max_norm: list[float]) -> None:
        """Scale slot k's gradients to a joint 2-norm of at most max_norm[k] (0: no clipping)."""

    def step(self, lr: list[float], weight_decay: list[float], active: list[bool]) -> None:
        """One AdamW step of the active slots, slot k at lr[k] and weight_decay[k]; the others untouched."""

    def keep(self, slots: list[int]) -> None:
        """Only these slots remain, in this order."""


@dataclass
class Member:
    """A run in a slot: everything it decides by itself, and what its owner does as it ends."""

    cfg: TrainConfig
    data: torch.Tensor  # its training sequences, on the device
    measure: StopSignal
    schedule: Schedule
    clock_start: float  # perf_counter() at which its train_seconds count from (earlier when resumed)
    checkpoint_path: Path | None
    on_step: Callable[[dict], None] = field(repr=False, default=lambda progress: None)
    on_finish: Callable[[GPT, RunOutcome], None] = field(repr=False, default=lambda gpt, outcome: None)
    on_abort: Callable[[], None] = field(repr=False, default=lambda: None)  # the loop stopped (killed, failed) first

    def batch(self, device: torch.device) -> torch.Tensor:
        """This step's sequences: batch_indices of its step, dataset size, batch size and seed."""
        cfg = self.cfg
        return self.data[batch_indices(self.schedule.step, len(self.data), cfg.batch_size, cfg.seed).to(device)]


def start_member(step: TrainingStep, k: int, cfg: TrainConfig, data: torch.Tensor, measure: StopSignal,
                 device: torch.device, checkpoint_path: Path | None, **callbacks) -> Member:
    """A run takes slot k of `step`: from its checkpoint where one can be read (a damaged one is set
    aside and the run starts over), else from the start. `callbacks`: Member's on_* fields."""
    state = None if checkpoint_path is None else read_state(
        checkpoint_path, lambda p: load_checkpoint(p, device), "checkpoint", "and the run starts over"
    )
    step.load(k, cfg, state)
    schedule = Schedule(cfg)
    if state is not None:
        schedule.load_state_dict(state)
    elapsed = 0.0 if state is None else state["train_seconds"]
    return Member(cfg, data, measure, schedule, time.perf_counter() - elapsed, checkpoint_path, **callbacks)


def training_step(step: TrainingStep, device: torch.device, precision: str, batches: list[torch.Tensor | None],
                  grad_clip: list[float], lr: list[float], weight_decay: list[float]) -> torch.Tensor:
    """One step of every slot with a batch (None: an empty slot, left untouched): the losses under
    the precision's autocast, backward, each slot's gradient clipped to its own norm (0: none),
    AdamW at its own learning rate. The losses, one a slot. The loop steps so; the ensemble probe
    (memorize/runs/ensemble_probe.py) times this very step."""
    with autocast_context(device, precision):
        losses = step.losses(batches)
    step.zero_grad()
    losses.sum().backward()
    step.clip_gradients(grad_clip)
    step.step(lr=lr, weight_decay=weight_decay, active=[b is not None for b in batches])
    return losses


class TrainingLoop:
    """Trains queued runs in a TrainingStep's slots until none is left. `queue` holds a function per
    run that starts it in a given slot (start_member); a slot whose run finished takes the next.
    Where `repack_at` slots or more stand empty, they are dropped (TrainingStep.keep)."""

    def __init__(self, step: TrainingStep, device: torch.device, precision: str,
                 queue: deque[Callable[[int], Member]], repack_at: int | None = None):
        self.step, self.device, self.precision, self.queue, self.repack_at = step, device, precision, queue, repack_at
        self.members: list[Member | None] = []
        self.most_members = 0  # the most runs ever trained at once

    def run(self) -> None:
        try:
            self.members = [self._next(k) for k in range(self.step.slots)]
            while True:
                for k in range(len(self.members)):
                    while self.members[k] is not None and self._settle(k):
                        self._finish(k)
                        self.members[k] = self._next(k)
                active = [m is not None for m in self.members]
                if not any(active):
                    return
                if self.repack_at is not None and len(active) - sum(active) >= self.repack_at:
                    keep = [k for k, a in enumerate(active) if a]
                    self.step.keep(keep)
                    self.members = [self.members[k] for k in keep]
                self.most_members = max(self.most_members, sum(active))
                self._train_one_step()
        finally:  # killed or failed: tell the runs still training
            for member in self.members:
                if member is not None:
                    member.on_abort()

    def _next(self, k: int) -> Member | None:
        return self.queue.popleft()(k) if self.queue else None

    def _settle(self, k: int) -> bool:
        """Before a step: evaluate when due (and checkpoint), begin the cool-down when due
        (evaluating again at once if it has no length); True if the run is finished."""
        member = self.members[k]
        schedule = member.schedule
        while True:
            if schedule.evaluation_due():
                gpt = self.step.gpt(k)
                schedule.record(*member.measure(gpt))
                if member.checkpoint_path is not None:
                    save_checkpoint(
                        {
                            **self.step.checkpoint(k, gpt, member.cfg, schedule.learning_rate()),
                            **schedule.state_dict(),
                            "train_seconds": time.perf_counter() - member.clock_start,
                        },
                        member.checkpoint_path,
                    )
            if not schedule.begin_cooldown_if_due():
                return schedule.finished

    def _finish(self, k: int) -> None:
        member = self.members[k]
        outcome = member.schedule.outcome(time.perf_counter() - member.clock_start)
        member.on_finish(self.step.gpt(k), outcome)

    def _train_one_step(self) -> None:
        members = self.members
        losses = training_step(
            self.step, self.device, self.precision,
            batches=[m.batch(self.device) if m is not None else None for m in members],
            grad_clip=[m.cfg.grad_clip if m is not None else 0.0 for m in members],
            lr=[m.schedule.learning_rate() if m is not None else 0.0 for m in members],
            weight_decay=[m.cfg.weight_decay if m is not None else 0.0 for m in members],
        )
        for m, loss in zip(members, losses.tolist()):
            if m is not None:
                m.schedule.advance(loss)
                m.on_step({"step": m.schedule.step, "loss": m.schedule.loss, "bits": m.schedule.curve[-1][1]})


class AloneStep:
    """TrainingStep of one run: its GPT and its torch optimizer (precision.optimizer_for), one slot.
    It holds the run from its start: load(None) keeps the GPT and optimizer it was made with."""

    slots = 1

    def __init__(self, model: GPT, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def load(self, k: int, cfg: TrainConfig, checkpoint: dict | None) -> None:
        if checkpoint is not None:
            self.model.load_state_dict(checkpoint["model"])
            self.optimizer.load_state_dict(checkpoint["optimizer"])

    def gpt(self, k: int) -> GPT:
        return self.model  # the model itself: train_to_saturation returns it

    def checkpoint(self, k: int, gpt: GPT, cfg: TrainConfig, lr: float) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def losses(self, batches: list[torch.Tensor | None]) -> torch.Tensor:
        return self.model.loss(batches[0]).reshape(1)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def clip_gradients(self, max_norm: list[float]) -> None:
        if max_norm[0]:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm[0])

    def step(self, lr: list[float], weight_decay: list[float], active: list[bool]) -> None:
        if active[0]:
            for group in self.optimizer.param_groups:
                group["lr"], group["weight_decay"] = lr[0], weight_decay[0]
            self.optimizer.step()

    def keep(self, slots: list[int]) -> None:
        if slots != [0]:  # the loop stops when its one slot is empty
            raise ValueError(f"a run alone has one slot, 0; got {slots}")


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
    model = seeded_gpt(model_config, cfg.seed, attention_backend, logprob_backend, device, weights_dtype(cfg.precision))
    step = AloneStep(model, optimizer_for(model.parameters(), cfg.precision, cfg.lr, cfg.betas, cfg.weight_decay))
    data_on_device = data.to(device)
    measure = stop_signal or uniform_code_signal(data_on_device, cfg.precision)
    outcomes: list[RunOutcome] = []

    def start(k: int) -> Member:
        return start_member(step, k, cfg, data_on_device, measure, device, checkpoint_path,
                            on_step=on_progress or (lambda progress: None),
                            on_finish=lambda gpt, outcome: outcomes.append(outcome))

    model.train()
    TrainingLoop(step, device, cfg.precision, deque([start])).run()
    return model, outcomes[0]
