"""Measuring on this device: a run's training step alone against an ensemble of K such runs.

`probe_step_seconds` is what `--ensemble auto` decides by (memorize/runs/packing.py's Packer),
and what --dry-run estimates wall-clock from (memorize/experiments/dry_run.py): each side's own loop
step (train.training_step: forward, backward, clip, AdamW) on random tokens, warmed up, then timed in turn.

A run decides at its batch's own rows. The dry run caps a probe's step (ProbeLimits): the
paper's 8-layer models at batch 2048 take minutes a step on a CPU, so there a step is timed
at one row and at as many rows as the cap allows, and extrapolated to the batch as a fixed
cost plus a cost per row.
"""

from __future__ import annotations

import time
from typing import Callable, NamedTuple

import torch

from ..ensemble import EnsembleStep
from ..model import GPT, training_flops_per_sequence
from ..runtime import use_cpu_threads
from ..train import AloneStep, TrainingStep, training_step
from .sweep import Run, batch_rows


def _median_seconds(steps: list[Callable[[], None]], budget_s: float, most_calls: int) -> list[float]:
    """Median seconds per call of each step function: warmed up, then called in turn (so a change
    in the machine's load hits all alike) until budget_s has passed, at least 3 and at most
    most_calls times each. Medians, because other processes' bursts lengthen a few calls a lot."""
    for step in steps:
        for _ in range(3):
            step()
    times: list[list[float]] = [[] for _ in steps]
    started = time.perf_counter()
    while len(times[0]) < most_calls and (len(times[0]) < 3 or time.perf_counter() - started < budget_s):
        for step, seconds in zip(steps, times):
            t = time.perf_counter()
            step()
            seconds.append(time.perf_counter() - t)
    return [sorted(seconds)[len(seconds) // 2] for seconds in times]


class ProbeLimits(NamedTuple):
    """How long a probe may take: each side's steps timed for about `seconds` (after warm-up), and a
    step over `most_flops` (an ensemble's: every member's rows) timed at fewer rows and
    extrapolated (probe_rows). A run decides at its batch's own rows (no cap)."""

    seconds: float = 1.0
    most_flops: float | None = None


# The dry run's probes: the 2-core CPU noisy and slow (a capped step about half a second), an
# H100 steady (a capped step some milliseconds; 20+ groups probed in the acceptance run's plan stage).
DRY_RUN_PROBE = {"cpu": ProbeLimits(1.0, 1e10), "cuda": ProbeLimits(0.25, 2e12)}


def probe_rows(run: Run, members: int, most_flops: float | None) -> int | None:
    """The rows a member's batch is timed at so that a step of `members` such runs stays within
    most_flops (at least 2, to extrapolate from); None where the batch's own rows do."""
    rows = batch_rows(run)
    per_row = members * training_flops_per_sequence(run.model)
    if most_flops is None or rows <= 2 or rows * per_row <= most_flops:
        return None
    return max(2, int(most_flops // per_row))


def probe_step_seconds(run: Run, members: int, device: torch.device, compile_mode: str | None = None,
                       limits: ProbeLimits = ProbeLimits()) -> tuple[float, float]:
    """(seconds per step of one run alone, seconds per step of an ensemble of `members` such runs),
    on random tokens in batches of the run's rows: the loop's own step (forward, backward, clip,
    AdamW) for each; the ensemble's loss compiled in `compile_mode` if one is given (compiled in
    the untimed warm-up calls)."""
    alone, together = probe_modes(run, members, device, (compile_mode,), limits)
    return alone, together[compile_mode]


def probe_modes(run: Run, members: int, device: torch.device, modes: tuple[str | None, ...],
                limits: ProbeLimits = ProbeLimits()) -> tuple[float, dict[str | None, float]]:
    """probe_step_seconds for several ways of running the ensemble's loss at once (None: eager; else
    a mode of ensemble.COMPILE_MODES): the step alone timed once, every way in turn with it."""
    rows = batch_rows(run)
    fewer = probe_rows(run, members, limits.most_flops)
    if fewer is None:
        return _probe_at(run, members, device, modes, limits.seconds, rows)
    one_alone, one = _probe_at(run, members, device, modes, limits.seconds, 1)
    some_alone, some = _probe_at(run, members, device, modes, limits.seconds, fewer)
    return (extrapolate(one_alone, some_alone, fewer, rows),
            {mode: extrapolate(one[mode], some[mode], fewer, rows) for mode in modes})


def extrapolate(at_one: float, at_some: float, some: int, rows: int) -> float:
    """Seconds a step of `rows` rows takes, from its seconds at one row and at `some` rows: a step
    as a fixed cost (launches, the optimizer) plus a cost per row (never below nothing: noise)."""
    return at_one + max(at_some - at_one, 0.0) * (rows - 1) / (some - 1)


def _probe_at(run: Run, members: int, device: torch.device, modes: tuple[str | None, ...], budget_s: float,
              rows: int) -> tuple[float, dict[str | None, float]]:
    """probe_modes with every member's batch `rows` rows (the threads still those of the run's own batch):
    the training loop's own step (train.training_step) of the run alone and of each ensemble."""
    c, cfg = run.model, run.train
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        x = torch.randint(0, c.vocab_size, (members, rows, c.seq_len), device=device)
        gpt = GPT(c, attention_backend=run.backends.attention, logprob_backend=run.backends.logprob).to(device)
        alone = AloneStep(gpt, torch.optim.AdamW(gpt.parameters(), lr=cfg.lr, betas=cfg.betas,
                                                  weight_decay=cfg.weight_decay))

        def timed(step: TrainingStep, threads_rows: int, batches: list[torch.Tensor]) -> Callable[[], None]:
            def one_step():
                use_cpu_threads(device, c, threads_rows)  # each side at the threads it would train with
                slots = len(batches)
                losses = training_step(step, device, cfg.precision, batches, [cfg.grad_clip] * slots,
                                       [cfg.lr] * slots, [cfg.weight_decay] * slots)
                losses.tolist()  # waits for the device

            return one_step

        def ensemble(mode: str | None) -> TrainingStep:
            together = EnsembleStep(c, members, run.backends.attention, run.backends.logprob, cfg.betas, device, mode)
            for k in range(members):
                together.load(k, cfg, None)
            return together

        steps = [timed(alone, batch_rows(run), [x[0]]),
                 *(timed(ensemble(mode), members * batch_rows(run), list(x)) for mode in modes)]
        alone_s, *together_s = _median_seconds(steps, budget_s, 50)
        return alone_s, dict(zip(modes, together_s))
