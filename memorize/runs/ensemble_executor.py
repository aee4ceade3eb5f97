"""The ensemble executor: runs of one shape trained together, each exactly as it would train alone.

`EnsembleExecutor` takes the runs an experiment hands any executor (memorize/runs/sweep.py),
groups those that can share an `EnsembleGPT` (memorize/ensemble.py): the same GPTConfig,
precision, batch size, Adam betas and kernel backends, on this executor's device; a group
is split so that no member's batches hold less than half the rows of the widest (smaller
ones are padded). A group trains in up to K slots (K from --ensemble, capped by the memory
free on the device); each slot holds one run, a *member*, with everything a run decides
by itself:

- its data and its batches: batch_indices(step, n, batch_size, seed) of its own run;
- its Schedule (memorize/schedule.py): warm-up, evaluations, plateau rule, cool-down, stop;
- its AdamW moments and step count, its learning rate, its gradient clip by its own norm;
- its evaluations: the workload's stop_signal on the member exported as a plain GPT, so
  the bits curve is measured by the very code the single-model loop uses.

Members need not be in step with each other: a member that finishes is recorded at once
(workload.result on its exported GPT, plus provenance) and the next queued run of the
group takes its slot, fresh or from its checkpoint. When no queued run is left, finished
members' slots are dropped (repacked) so they cost nothing.

On CUDA the ensemble's loss runs eagerly, under torch.compile, or under torch.compile with
its kernels replayed as CUDA graphs, whichever a probe measures fastest (unverified: written
without a GPU). On CPU it runs eagerly, and with `--workers` above 1
ensembles (and the runs of groups trained one at a time) train side by side, one thread
each (memorize/runs/workers.py): on the CPU that, not stacking, is what gains the most.

Checkpoints: at each evaluation a member writes its own checkpoint, in exactly the format
train_to_saturation writes (model and torch AdamW state dicts, schedule, seconds), to the
store's checkpoint path of its run. The ensemble's checkpoint is the set of its members'
files, and a run checkpointed by either executor resumes under the other. Before training,
the executor records in the store how each run trains (RunStore.packing: its ensemble, slots,
compile mode and CPU threads); a rerun trains each unfinished run as recorded, probing no
more, so a killed sweep resumes in the same arithmetic: float32 rounds differently alone and
in an ensemble and on another thread count, though alike in any slot of any K (tested), and
a resumed run then ends where the uninterrupted one does, to the last digit, as far as its
checkpoint holds everything (tests/test_ensemble.py).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..precision import autocast_context, weights_dtype
from ..ensemble import COMPILE_MODES, EnsembleAdamW, EnsembleGPT, compiled_losses
from .ensemble_probe import ProbeLimits, probe_modes, probe_step_seconds
from ..errors import ConfigError
from ..model import GPT, count_parameters
from ..runtime import cpu_threads_for, cpu_threads_pinned, free_memory_bytes, use_cpu_threads
from ..schedule import Schedule, batch_indices
from .store import RunStore, provenance
from .sweep import Run, SweepProgress, Workload, alone_threads, batch_rows, run_job, training_flops
from ..train import GLOBAL_RNG, StopSignal, save_checkpoint, seeded_gpt
from .workers import Job, run_jobs, workers_for

MEMORY_FRACTION = 0.5  # of the memory free on the device, the most an ensemble may plan to use
# --ensemble auto stacks a group where the probe's member-step takes at most this share of a step
# alone: the probe leaves out what a real ensemble adds (padded rows, K members' evaluations, and
# side by side, workers contending for memory bandwidth): side by side, the generalization preset's
# ensembles made the run slower, 526.9 s against 469.9 s with none (generalization-default-wall-2core.json).
ENSEMBLE_STEP_AT_MOST = 0.9


# ---------------------------------------------------------------------------------------
# --ensemble: what the user asks for


def parse_ensemble(value: str) -> str | int:
    """'auto', 'off', or a number of members K >= 1; anything else is a ConfigError."""
    text = str(value).strip().lower()
    if text in ("auto", "off"):
        return text
    try:
        k = int(text)
    except ValueError:
        k = 0
    if k < 1 or str(k) != text:
        raise ConfigError(
            f"--ensemble must be auto, off or a whole number of members >= 1, got {value!r}; "
            "e.g. --ensemble 8, or --ensemble off to train runs one at a time"
        )
    return k


# ---------------------------------------------------------------------------------------
# Planning: which runs share an ensemble, and how many slots it gets


def ensemble_key(run: Run) -> tuple:
    """What runs of one ensemble must share: the stacked shape and everything applied to all members at once."""
    return (run.model, run.train.precision, run.train.batch_size, tuple(run.train.betas), run.backends)


def member_bytes(run: Run) -> int:
    """A generous estimate of one member's memory: weights, gradients, AdamW moments and the
    copies a step makes of them, plus one batch's activations and logits (twice, for backward),
    in the dtype members are built in (torch's default, as GPT's)."""
    c = run.model
    size = torch.tensor([]).element_size()
    weights = 6 * count_parameters(c)
    rows = run.train.batch_size * (c.seq_len - 1)
    per_row = c.n_layer * (17 * c.d_model + c.n_head * c.seq_len) + 2 * c.d_model + 3 * c.vocab_size
    return 2 * (weights + rows * per_row) * size


@dataclass
class EnsemblePlan:
    """Runs of one ensemble key, trained in `slots` slots (1: the local executor trains them)."""

    runs: list[Run]
    slots: int
    memory_capped: bool = False  # fewer slots than asked, because of the memory free
    probe: tuple[int, float, float] | None = None  # (members, s/step alone, s/step together) where measured
    compile_mode: str | None = None  # one of COMPILE_MODES, chosen on CUDA where it measures faster; None: eager
    threads: int | None = None  # CPU threads its jobs train with; None: the thread policy's (runtime.cpu_threads_for)
    job: str | None = None  # the packing's name for it (its first run's id) where it resumes a recorded plan

    @property
    def key(self) -> tuple:
        return ensemble_key(self.runs[0])

    @property
    def widest(self) -> Run:
        """The run with the most rows a batch: every member's batch is padded to its width."""
        return max(self.runs, key=batch_rows)


def split_by_batch_rows(runs: list[Run]) -> list[list[Run]]:
    """Runs whose batches hold at least half the rows of the widest batch among them, together
    (widest first, plan order kept within each): an ensemble pads every member's batch to the
    widest, and padding a narrower batch would spend more compute on padding than on the run."""
    buckets: list[list[Run]] = []
    for run in sorted(runs, key=batch_rows, reverse=True):
        if buckets and 2 * batch_rows(run) >= batch_rows(buckets[-1][0]):
            buckets[-1].append(run)
        else:
            buckets.append([run])
    position = {run.run_id: i for i, run in enumerate(runs)}
    return [sorted(bucket, key=lambda run: position[run.run_id]) for bucket in buckets]


def plan_ensembles(runs: list[Run], max_members: int | None, memory_budget: int | None) -> list[EnsemblePlan]:
    """Group the runs by ensemble_key (groups in order of first appearance), split each group by
    batch rows, and give each part min(runs, max_members, what memory_budget holds) slots, at least one.
    Runs with bfloat16 weights train alone (a plan of one slot each, before the groups)."""
    groups: dict[tuple, list[Run]] = {}
    plans = []
    for run in runs:
        if weights_dtype(run.train.precision) is not None:  # EnsembleGPT stacks weights of torch's default dtype only
            plans.append(EnsemblePlan([run], 1))
        else:
            groups.setdefault(ensemble_key(run), []).append(run)
    for group in groups.values():
        for members in split_by_batch_rows(group):
            wanted = min(len(members), max_members or len(members))
            fits = wanted if memory_budget is None else max(1, memory_budget // member_bytes(members[0]))
            plans.append(EnsemblePlan(members, min(wanted, fits), memory_capped=fits < wanted))
    return plans


# ---------------------------------------------------------------------------------------
# Resuming in the same packing: float32 rounding differs between a run trained alone and in an
# ensemble, and between thread counts (the same member in any slot of any K rounds alike), so
# a rerun trains each unfinished run of a recorded plan as that plan did (RunStore.packing).


def packing_entries(plan: EnsemblePlan, threads: dict[str, int | None]) -> dict[str, dict]:
    """How the plan's runs train, by run id, as RunStore.record_packing keeps it: an ensemble's runs
    under one job (its slots, compile mode and threads); runs alone each a job of their own."""
    if plan.slots == 1:
        return {run.run_id: {"job": run.run_id, "slots": 1, "threads": threads[run.run_id]} for run in plan.runs}
    job = plan.job or plan.runs[0].run_id
    entry = {"job": job, "slots": plan.slots, "compile_mode": plan.compile_mode, "threads": threads.get(job)}
    return {run.run_id: entry for run in plan.runs}


def recorded_plans(runs: list[Run], recorded: dict[str, dict]) -> tuple[list[EnsemblePlan], list[Run]]:
    """The plans a rerun resumes (the recorded job, slots, compile mode and threads of each of `runs`
    the packing holds, in plan order) and the runs it holds nothing of."""
    jobs: dict[str, EnsemblePlan] = {}
    fresh = []
    for run in runs:
        entry = recorded.get(run.run_id)
        try:
            job, slots, threads = str(entry["job"]), int(entry["slots"]), entry.get("threads")
            threads = None if threads is None else int(threads)
        except (TypeError, KeyError, ValueError):  # nothing recorded, or an entry no memk wrote
            fresh.append(run)
            continue
        if slots > 1 and job in jobs:
            jobs[job].runs.append(run)
        else:
            key = job if slots > 1 else run.run_id
            jobs[key] = EnsemblePlan([run], max(1, slots), compile_mode=entry.get("compile_mode") if slots > 1 else None,
                                     threads=threads, job=job)
    return list(jobs.values()), fresh


def plan_threads(plan: EnsemblePlan, device: torch.device, workers: int) -> dict[str, int | None]:
    """The CPU threads each job of the plan trains with (by the job's name: the ensemble's first run,
    or each run alone): the recorded count of a resumed plan; one side by side; else the policy's."""
    if plan.slots == 1:
        return {run.run_id: plan.threads if plan.threads is not None else alone_threads(run, device, workers)
                for run in plan.runs}
    job = plan.job or plan.runs[0].run_id
    if plan.threads is not None or device.type != "cpu":
        return {job: plan.threads}
    return {job: 1 if workers > 1 else cpu_threads_for(plan.widest.model, plan.slots * batch_rows(plan.widest))}


# ---------------------------------------------------------------------------------------
# One member: a run in a slot


@dataclass
class Member:
    run: Run
    data: torch.Tensor  # its training sequences, on the device
    measure: StopSignal  # the workload's, measured on the member exported as a GPT
    schedule: Schedule
    clock_start: float  # perf_counter() at which its train_seconds count from (earlier when resumed)
    on_step: Callable[[dict], None] = field(repr=False, default=lambda p: None)
    close_bar: Callable[[], None] = field(repr=False, default=lambda: None)

    def batch(self, device: torch.device) -> torch.Tensor:
        """This step's sequences: exactly the batch train_to_saturation draws at this step."""
        cfg = self.schedule.cfg
        return self.data[batch_indices(self.schedule.step, len(self.data), cfg.batch_size, cfg.seed).to(device)]


def fresh_gpt_state(run: Run, device: torch.device) -> dict[str, torch.Tensor]:
    """The weights train_to_saturation starts this run from: torch.manual_seed(seed), then GPT(config)."""
    return seeded_gpt(run.model, run.train.seed, run.backends.attention, run.backends.logprob, device).state_dict()


def torch_adamw_state(gpt: GPT, run: Run, lr: float, step: int, exp_avg: dict, exp_avg_sq: dict) -> dict:
    """A torch.optim.AdamW state dict for `gpt` holding these moments: what train_to_saturation checkpoints."""
    optimizer = torch.optim.AdamW(gpt.parameters(), lr=lr, betas=run.train.betas, weight_decay=run.train.weight_decay)
    if step > 0:  # AdamW creates its state on the first step; a checkpoint at step 0 has none
        for name, p in gpt.named_parameters():
            optimizer.state[p] = {"step": torch.tensor(float(step)), "exp_avg": exp_avg[name],
                                  "exp_avg_sq": exp_avg_sq[name]}
    return optimizer.state_dict()


def moments_from_adamw_state(state: dict, names: list[str]) -> tuple[int, dict, dict] | None:
    """(step, exp_avg, exp_avg_sq) by parameter name from a torch AdamW state dict; None before the first step."""
    per_index = state["state"]
    if not per_index:
        return None
    order = state["param_groups"][0]["params"]  # the indices of GPT.parameters(), in order
    step = int(per_index[order[0]]["step"])
    return (step, {n: per_index[i]["exp_avg"] for n, i in zip(names, order)},
            {n: per_index[i]["exp_avg_sq"] for n, i in zip(names, order)})


# ---------------------------------------------------------------------------------------
# Training one plan


class EnsembleTrainer:
    """Trains one plan's runs in its slots until every run is recorded."""

    def __init__(self, plan: EnsemblePlan, workload: Workload, store: RunStore, progress: SweepProgress,
                 device: torch.device, repack_fraction: float):
        first = plan.runs[0]
        self.plan, self.workload, self.store, self.progress, self.device = plan, workload, store, progress, device
        self.precision = first.train.precision
        self.repack_at = max(1, math.ceil(repack_fraction * plan.slots))  # frozen slots that trigger a repack
        self.queue = deque(plan.runs)
        # GPT's parameters take torch's default dtype; the members must too, to start from its weights.
        self.model = EnsembleGPT(first.model, plan.slots, first.backends.attention, first.backends.logprob,
                                 device=device, dtype=torch.get_default_dtype())
        self.optimizer = EnsembleAdamW(self.model, first.train.betas)
        self.member_losses = (self.model.member_losses if plan.compile_mode is None
                              else compiled_losses(self.model, plan.compile_mode))
        self.names = list(self.model.params)
        with GLOBAL_RNG, torch.random.fork_rng(devices=[]):  # building it must not move the global generator
            self.template = GPT(first.model, attention_backend=first.backends.attention,
                                logprob_backend=first.backends.logprob).to(device=device, dtype=self.model.dtype)
        self.members: list[Member | None] = [None] * plan.slots
        self.most_members = 0  # the most members ever trained at once (tests check the memory cap with it)

    def train(self) -> None:
        # One ensemble step does the work of its members' steps: it takes the threads such a step needs
        # (or, resumed, the threads it started with).
        if self.plan.threads is not None and self.device.type == "cpu":
            torch.set_num_threads(self.plan.threads)
        else:
            use_cpu_threads(self.device, self.plan.widest.model, self.plan.slots * batch_rows(self.plan.widest))
        try:
            for k in range(len(self.members)):
                self.members[k] = self._join(k) if self.queue else None
            while True:
                for k in range(len(self.members)):
                    while self.members[k] is not None and self._settle(self.members[k], k):
                        self._finish(k)
                        self.members[k] = self._join(k) if self.queue else None
                active = [m is not None for m in self.members]
                if not any(active):
                    return
                if len(active) - sum(active) >= self.repack_at:
                    self._repack([k for k, a in enumerate(active) if a])
                self.most_members = max(self.most_members, sum(active))
                self._step()
        finally:  # killed or failed: close the step bars of the members still training
            for member in self.members:
                if member is not None:
                    member.close_bar()

    # ---- a member's life: join, settle (evaluate, cool down, stop), finish

    def member_gpt(self, k: int) -> GPT:
        """Member k as a plain GPT of its own (later steps do not change it)."""
        gpt = copy.deepcopy(self.template)
        gpt.load_state_dict(self.model.export_member(k))
        return gpt

    def _join(self, k: int) -> Member:
        """The next queued run takes slot k: from its checkpoint where there is one, else fresh."""
        run = self.queue.popleft()
        data = self.workload.training_data(run).to(self.device)
        schedule, elapsed = Schedule(run.train), 0.0
        checkpoint = self.store.checkpoint_path(run.run_id)
        if checkpoint.exists():
            state = torch.load(checkpoint, map_location=self.device, weights_only=False)
            self.model.import_member(k, state["model"])
            moments = moments_from_adamw_state(state["optimizer"], self.names)
            if moments is None:
                self.optimizer.reset_member(k)
            else:
                self.optimizer.import_member(k, *moments)
            schedule.load_state_dict(state)
            elapsed = state["train_seconds"]
        else:
            self.model.import_member(k, fresh_gpt_state(run, self.device))
            self.optimizer.reset_member(k)
        on_step, close_bar = self.progress.run_started(run)
        return Member(run, data, self.workload.stop_signal(run, data), schedule, time.perf_counter() - elapsed,
                      on_step, close_bar)

    def _settle(self, member: Member, k: int) -> bool:
        """What the single-model loop does before a step: evaluate when due (and checkpoint), begin
        the cool-down when due (evaluating again at once if it has no length); True if finished."""
        schedule = member.schedule
        while True:
            if schedule.evaluation_due():
                gpt = self.member_gpt(k)
                schedule.record(*member.measure(gpt))
                self._checkpoint(member, k, gpt)
            if not schedule.begin_cooldown_if_due():
                return schedule.finished

    def _checkpoint(self, member: Member, k: int, gpt: GPT) -> None:
        step, exp_avg, exp_avg_sq = self.optimizer.export_member(k)
        save_checkpoint(
            {
                "model": gpt.state_dict(),
                "optimizer": torch_adamw_state(gpt, member.run, member.schedule.learning_rate(), step, exp_avg,
                                               exp_avg_sq),
                **member.schedule.state_dict(),
                "train_seconds": time.perf_counter() - member.clock_start,
            },
            self.store.checkpoint_path(member.run.run_id),
        )

    def _finish(self, k: int) -> None:
        member = self.members[k]
        outcome = member.schedule.outcome(time.perf_counter() - member.clock_start)
        row = self.workload.result(member.run, self.member_gpt(k), outcome, member.data)
        member.close_bar()
        self.store.record({**row, **provenance(member.run.backends, self.device, f"ensemble of {self.plan.slots}")})
        self.progress.run_finished()

    def _repack(self, keep: list[int]) -> None:
        """Drop the slots of finished members: they would cost a share of every step."""
        self.model.keep_members(keep)
        self.optimizer.keep_members(keep)
        self.members = [self.members[k] for k in keep]

    # ---- one step of every member that is training

    def _step(self) -> None:
        members, device = self.members, self.device
        batches = [m.batch(device) if m is not None else None for m in members]
        rows = [len(b) if b is not None else 0 for b in batches]
        width = max(rows)
        filler = next(b for b in batches if b is not None)[:1]
        # Members with fewer sequences than the widest batch (n < batch_size) are padded with
        # rows whose targets the loss ignores; frozen slots are all padding.
        x = torch.stack([
            torch.cat([b if b is not None else filler[:0], filler.expand(width - r, -1)]) for b, r in zip(batches, rows)
        ])
        with autocast_context(device, self.precision):
            losses = self.member_losses(x, torch.tensor(rows, device=device))
        self.optimizer.zero_grad()
        losses.sum().backward()
        active = [m is not None for m in members]
        self.optimizer.clip_gradients([m.run.train.grad_clip if m is not None else 0.0 for m in members])
        self.optimizer.step(
            lr=[m.schedule.learning_rate() if m is not None else 0.0 for m in members],
            weight_decay=[m.run.train.weight_decay if m is not None else 0.0 for m in members],
            active=active,
        )
        for m, loss in zip(members, losses.tolist()):
            if m is not None:
                m.schedule.advance(loss)
                m.on_step({"step": m.schedule.step, "loss": m.schedule.loss, "bits": m.schedule.curve[-1][1]})


# ---------------------------------------------------------------------------------------
# The executor


@dataclass
class EnsembleExecutor:
    """Trains runs in ensembles (see the module docstring); with choose_faster, each group in the
    ensemble only where a short probe on this device measures it clearly faster (ENSEMBLE_STEP_AT_MOST)
    than one run at a time;
    `workers` (auto or a number, memorize/runs/workers.py) jobs at once, an ensemble or a run each."""

    device: torch.device
    max_members: int | None = None  # K; None: as many as a group has and memory holds
    choose_faster: bool = False  # --ensemble auto
    memory_budget: int | None = None  # bytes; None: MEMORY_FRACTION of the memory free at the start, shared by the workers
    repack_fraction: float | None = None  # frozen share of the slots that triggers a repack; None: the device's
    workers: str | int = 1
    try_compile: bool = True  # on CUDA, probe the compiled modes too (the dry run leaves them out: tens of seconds each)
    probe_limits: ProbeLimits = ProbeLimits()  # how long a probe may take (the dry run's are shorter)
    trained: list[dict] = field(default_factory=list, repr=False)  # per ensemble: runs, slots, most members at once

    def plans(self, runs: list[Run], workers: int = 1, recorded: dict[str, dict] | None = None) -> list[EnsemblePlan]:
        """The groups and their slots; `workers` jobs training at once share the memory budget. Runs
        the `recorded` packing (RunStore.packing) holds resume as it planned them, probed no more."""
        resumed, runs = recorded_plans(runs, recorded or {})
        budget = self.memory_budget
        if budget is None:
            free = free_memory_bytes(self.device)
            budget = None if free is None else int(MEMORY_FRACTION * free)
        if budget is not None:
            budget //= workers
        plans = plan_ensembles(runs, self.max_members, budget)
        for plan in plans:
            if plan.slots > 1 and self.device.type == "cuda" and self.try_compile:  # whichever measures fastest
                alone, together = probe_modes(plan.widest, plan.slots, self.device, (None, *COMPILE_MODES),
                                              self.probe_limits)
                plan.compile_mode = min(together, key=lambda mode: together[mode])
                plan.probe = (plan.slots, alone, together[plan.compile_mode])
            if plan.slots > 1 and self.choose_faster:
                if plan.probe is None:
                    plan.probe = (plan.slots, *probe_step_seconds(plan.widest, plan.slots, self.device,
                                                                  limits=self.probe_limits))
                members, alone, together = plan.probe
                if together / members >= ENSEMBLE_STEP_AT_MOST * alone:
                    plan.slots = 1
        return resumed + plans

    def execute(self, runs: list[Run], workload: Workload, store: RunStore, progress: SweepProgress) -> None:
        workers = workers_for(self.workers, self.device, runs, training_flops)
        # Side by side, every job trains on one thread: the probes measure them so.
        with cpu_threads_pinned(1) if workers > 1 else contextlib.nullcontext():
            plans = self.plans(runs, workers, store.packing())
        jobs, packing = [], {}
        for plan in plans:
            threads = plan_threads(plan, self.device, workers)
            packing.update(packing_entries(plan, threads))
            if plan.slots == 1:
                jobs += [run_job(run, workload, store, self.device, threads[run.run_id]) for run in plan.runs]
            else:
                plan.threads = threads[plan.job or plan.runs[0].run_id]
                jobs.append(self.ensemble_job(plan, workload, store))
        store.record_packing(packing)
        run_jobs(jobs, workers, progress)

    def ensemble_job(self, plan: EnsemblePlan, workload: Workload, store: RunStore) -> Job:
        fraction = repack_fraction_for(self.device) if self.repack_fraction is None else self.repack_fraction

        def train(progress: SweepProgress) -> None:
            trainer = EnsembleTrainer(plan, workload, store, progress, self.device, fraction)
            trainer.train()
            self.trained.append({"runs": len(plan.runs), "slots": plan.slots, "most_members": trainer.most_members})

        return Job(f"{plan.runs[0].model.name}: an ensemble of {plan.slots}", sum(map(training_flops, plan.runs)), train,
                   plan.threads)


def repack_fraction_for(device: torch.device) -> float:
    """The frozen share of an ensemble's slots that triggers a repack on this device. On CPU a
    frozen slot costs its share of every step and a repack one copy of the weights: repack at
    once. On CUDA a step costs about the same for any K: wait for a quarter."""
    return 0.25 if device.type == "cuda" else 0.0
