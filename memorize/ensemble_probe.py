"""Measuring on this device: a run's training step alone against an ensemble of K such runs.

`probe_step_seconds` is what `--ensemble auto` decides by (memorize/ensemble_executor.py),
and what --dry-run estimates wall-clock from (memorize/dry_run.py): each side's own loop
step (forward, backward, clip, AdamW) on random tokens, warmed up, then timed in turn.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import torch

from .bits import autocast_context
from .ensemble import EnsembleAdamW, EnsembleGPT, compiled_losses
from .model import GPT
from .runtime import use_cpu_threads
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


def probe_step_seconds(run: Run, members: int, device: torch.device, budget_s: float = 1.0,
                       compile_mode: str | None = None) -> tuple[float, float]:
    """(seconds per step of one run alone, seconds per step of an ensemble of `members` such runs),
    on random tokens in batches of the run's rows: the loop's own step (forward, backward, clip,
    AdamW) for each; the ensemble's loss compiled in `compile_mode` if one is given (compiled in
    the untimed warm-up calls)."""
    alone, together = probe_modes(run, members, device, (compile_mode,), budget_s)
    return alone, together[compile_mode]


def probe_modes(run: Run, members: int, device: torch.device, modes: tuple[str | None, ...],
                budget_s: float = 1.0) -> tuple[float, dict[str | None, float]]:
    """probe_step_seconds for several ways of running the ensemble's loss at once (None: eager; else
    a mode of ensemble.COMPILE_MODES): the step alone timed once, every way in turn with it."""
    c, cfg = run.model, run.train
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        gpt = GPT(c, attention_backend=run.backends.attention, logprob_backend=run.backends.logprob).to(device)
        optimizer = torch.optim.AdamW(gpt.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        x = torch.randint(0, c.vocab_size, (members, batch_rows(run), c.seq_len), device=device)

        def single_step():
            use_cpu_threads(device, c, batch_rows(run))  # each side at the threads it would train with
            with autocast_context(device, cfg.precision):
                loss = gpt.loss(x[0])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(gpt.parameters(), cfg.grad_clip or math.inf)
            optimizer.step()
            float(loss.detach())

        ensemble = EnsembleGPT(c, members, run.backends.attention, run.backends.logprob, device,
                               torch.get_default_dtype())
        for k in range(members):
            ensemble.import_member(k, gpt.state_dict())
        ensemble_optimizer = EnsembleAdamW(ensemble, cfg.betas)
        rows = torch.full((members,), batch_rows(run), device=device)

        def ensemble_step(mode: str | None) -> Callable[[], None]:
            member_losses = ensemble.member_losses if mode is None else compiled_losses(ensemble, mode)

            def step():
                use_cpu_threads(device, c, members * batch_rows(run))
                with autocast_context(device, cfg.precision):
                    losses = member_losses(x, rows)
                ensemble_optimizer.zero_grad()
                losses.sum().backward()
                ensemble_optimizer.clip_gradients([cfg.grad_clip] * members)
                ensemble_optimizer.step([cfg.lr] * members, [cfg.weight_decay] * members, [True] * members)
                losses.tolist()

            return step

        alone, *together = _median_seconds([single_step, *map(ensemble_step, modes)], budget_s, 50)
        return alone, dict(zip(modes, together))
