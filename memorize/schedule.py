"""One run's training schedule, apart from the model it steps.

AdamW (betas 0.9/0.98, weight decay 0 by default, as the paper's Adam) on a
warmup-stable-decay schedule: the learning rate rises linearly from 0 over
`warmup_steps`, holds, and ends with a cool-down, a linear decay to 0 over
`cooldown_steps`. The horizon is not known in advance, so the cool-down starts when
the bits curve saturates (`doubling_gain`: a doubling of the steps raised the bits by less
than `saturation_gain`; the capacity experiments' rule) or flattens over a window
(`plateau_reached`; the others'), or `cooldown_steps` before the step cap `max_steps`,
whichever comes first; the run ends when the cool-down does. Annealing
the rate lets the model settle into the minimum the constant rate only circles, so it
stores more bits.

`Schedule` holds everything a run decides by itself: its step, its evaluations and the
best of them, when its cool-down began and why, and whether it is done. It knows no
model, so the single-model loop (memorize/train.py) and an ensemble of K runs can
both drive it, and its state is a plain dict a checkpoint stores.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

import torch

from .precision import check_precision


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
    # The saturation rule, where set, replaces the plateau rule: the cool-down begins once the bits
    # gained over the last doubling of steps fall below this share (doubling_gain).
    saturation_gain: float | None = None

    def __post_init__(self):
        check_precision(self.precision)
        if not 0 <= self.cooldown_steps <= self.max_steps:
            raise ValueError(f"cooldown_steps must lie in [0, max_steps={self.max_steps}], got {self.cooldown_steps}")
        for name in ("warmup_steps", "min_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("batch_size", "max_steps", "eval_every", "plateau_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be positive and finite, got {self.lr}")
        if self.saturation_gain is not None and not 0 < self.saturation_gain < 1:
            raise ValueError(f"saturation_gain must lie in (0, 1), e.g. 0.02, got {self.saturation_gain}")

    def to_dict(self) -> dict:
        """Its fields, less those added since run ids were first taken while they hold their defaults
        (a run's id digests this dict: folders of earlier memk resume under the same ids)."""
        d = asdict(self)
        for name, default in ADDED_FIELDS.items():
            if d[name] == default:
                del d[name]
        return d

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


# A run is called saturated when a doubling of its steps (before the cool-down) raised its bits by
# less than this share: more training would not raise them materially (issue 21).
SATURATED_BELOW = 0.02
ADDED_FIELDS = {"saturation_gain": None}  # TrainConfig fields newer than the first run ids, with their defaults


def doubling_gain(curve: list[tuple[int, float]], until: int | None = None) -> float | None:
    """The relative gain of the best memorized bits over the last doubling of steps:
    (best up to step T - best up to T/2) / best up to T/2, with T the last evaluated step (or the
    last at or before `until`). Best-so-far values make it robust to the curve's noise. None where
    it cannot be judged: fewer than two evaluated steps in (0, T], or nothing memorized by T/2."""
    points = [(step, bits) for step, bits in curve if until is None or step <= until]
    if not points or points[-1][0] <= 0:
        return None
    last = points[-1][0]
    half = [bits for step, bits in points if step <= last / 2]
    if not half or not any(0 < step <= last / 2 for step, _ in points):
        return None
    before = max(half)
    if before <= 0:
        return None
    return (max(bits for _, bits in points) - before) / before


def saturated(gain: float | None, below: float = SATURATED_BELOW) -> bool:
    """The saturation verdict on a doubling gain: judged, and below the threshold."""
    return gain is not None and gain < below


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


@dataclass(frozen=True)
class Evaluation:
    """One point of the bits curve."""

    step: int
    memorized_bits: float  # of the whole training set
    mean_model_bits: float  # mean -log2 p(x | θ̂) per training sequence


@dataclass
class RunOutcome:
    steps: int
    stop_reason: str  # "saturated", "plateau" or "step_cap"
    memorized_bits: float  # best total on the bits curve (the model at that evaluation)
    memorized_bits_final: float
    model_bits_per_sequence: float  # mean -log2 p(x|θ̂) at the best evaluation
    final_loss: float
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, memorized bits)
    train_seconds: float = 0.0
    # doubling_gain of the curve up to the cool-down's start: how far from saturation the run stopped
    saturation_gain: float | None = None


class Schedule:
    """Where one run stands: its step, bits curve, best evaluation, cool-down and stop.

    The loop that steps a model asks, at each step: `evaluation_due()` (then `record` the
    evaluation), `begin_cooldown_if_due()` (then ask again: a zero-length cool-down is
    evaluated at once), `finished`; otherwise it trains one step at `learning_rate()`
    and calls `advance(loss)`.
    """

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.step = 0
        self.curve: list[tuple[int, float]] = []
        self.best: Evaluation | None = None
        self.cooldown_start: int | None = None  # the step the learning-rate decay began
        self.stop_reason: str | None = None  # why it began: "saturated", "plateau" or "step_cap"
        self.loss = math.nan  # of the last step taken

    @property
    def cooldown_end(self) -> int | None:
        return None if self.cooldown_start is None else self.cooldown_start + self.cfg.cooldown_steps

    @property
    def finished(self) -> bool:
        end = self.cooldown_end
        return end is not None and self.step >= end

    def evaluation_due(self) -> bool:
        """Every eval_every steps, at the step cap and at the end of the cool-down; once per step."""
        cfg, end = self.cfg, self.cooldown_end
        on_cadence = self.step % cfg.eval_every == 0 or self.step >= cfg.max_steps or (end is not None and self.step >= end)
        return on_cadence and not (self.curve and self.curve[-1][0] == self.step)

    def record(self, memorized_bits: float, mean_model_bits: float) -> Evaluation:
        evaluation = Evaluation(self.step, memorized_bits, mean_model_bits)
        self.curve.append((self.step, memorized_bits))
        if self.best is None or memorized_bits > self.best.memorized_bits:
            self.best = evaluation
        return evaluation

    def begin_cooldown_if_due(self) -> bool:
        """In the stable phase, start the cool-down at saturation (the saturation rule, where the
        config sets it) or else on a plateau (judged at an evaluation, after min_steps), or when only
        the cool-down is left before the cap; True if it began now."""
        if self.cooldown_start is not None:
            return False
        cfg = self.cfg
        evaluated_now = bool(self.curve) and self.curve[-1][0] == self.step
        if evaluated_now and self.step >= cfg.min_steps and self._flattened():
            self.stop_reason = "saturated" if cfg.saturation_gain is not None else "plateau"
            self.cooldown_start = self.step
        elif self.step >= cfg.max_steps - cfg.cooldown_steps:
            self.stop_reason, self.cooldown_start = "step_cap", self.step
        return self.cooldown_start is not None

    def _flattened(self) -> bool:
        """The config's rule on the curve so far: saturation where it sets one, else the plateau rule."""
        cfg = self.cfg
        if cfg.saturation_gain is not None:
            return saturated(doubling_gain(self.curve), cfg.saturation_gain)
        return plateau_reached([bits for _, bits in self.curve], cfg.plateau_window, cfg.plateau_rel_tol)

    def learning_rate(self) -> float:
        return learning_rate(self.step, self.cfg, self.cooldown_start)

    def advance(self, loss: float) -> None:
        self.step += 1
        self.loss = loss
        if not math.isfinite(loss):
            raise FloatingPointError(f"training diverged at step {self.step} (loss {loss}); lower the learning rate")

    def outcome(self, train_seconds: float) -> RunOutcome:
        best = self.best
        return RunOutcome(
            steps=self.step,
            stop_reason=self.stop_reason,
            memorized_bits=best.memorized_bits if best else -1.0,
            memorized_bits_final=self.curve[-1][1],
            model_bits_per_sequence=best.mean_model_bits if best else math.nan,
            final_loss=self.loss,
            curve=self.curve,
            train_seconds=train_seconds,
            saturation_gain=doubling_gain(self.curve, until=self.cooldown_start),
        )

    def state_dict(self) -> dict:
        """What a checkpoint keeps of the schedule (the keys memk has always written)."""
        best = self.best
        return {
            "step": self.step,
            "curve": self.curve,
            # (memorized bits, step, mean code length), as earlier checkpoints hold it
            "best": (-1.0, None, math.nan) if best is None else (best.memorized_bits, best.step, best.mean_model_bits),
            "loss": self.loss,
            "cooldown_start": self.cooldown_start,
            "stop_reason": self.stop_reason,
        }

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.curve = [tuple(c) for c in state["curve"]]
        bits, step, mean_bits = state["best"]
        self.best = None if step is None else Evaluation(step, bits, mean_bits)
        self.loss = state["loss"]
        self.cooldown_start, self.stop_reason = state["cooldown_start"], state["stop_reason"]
