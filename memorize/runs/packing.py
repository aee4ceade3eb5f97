"""Packing: which runs train together in one ensemble, in how many slots, on how many CPU threads.

Contract: `Packer.plans` turns runs into `EnsemblePlan`s, each a group of runs that can share an
`EnsembleGPT` (memorize/ensemble.py: the same GPTConfig, precision, batch size, Adam betas and kernel
backends) in up to K slots (K from --ensemble, read once into an `EnsembleChoice`; capped by the memory
free on the device), or a run alone; a plan is trained wherever placement puts it (memorize/runs/workers.py's
threads through the ensemble executor, or a Ray task). A rerun packs each run as the first run recorded it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ensemble import COMPILE_MODES
from ..errors import ConfigError
from ..model import count_parameters
from ..precision import weights_dtype
from ..runtime import cpu_threads_for, free_memory_bytes
from .ensemble_probe import ProbeLimits, probe_modes, probe_step_seconds
from .sweep import Run, alone_threads, batch_rows

MEMORY_FRACTION = 0.5  # of the memory free on the device, the most an ensemble may plan to use
# --ensemble auto stacks a group where the probe's member-step takes at most this share of a step
# alone: the probe leaves out what a real ensemble adds (padded rows, K members' evaluations, and
# side by side, workers contending for memory bandwidth): side by side, the generalization preset's
# ensembles made the run slower, 526.9 s against 469.9 s with none (generalization-default-wall-2core.json).
ENSEMBLE_STEP_AT_MOST = 0.9


# ---------------------------------------------------------------------------------------
# --ensemble: what the user asks for


@dataclass(frozen=True)
class EnsembleChoice:
    """--ensemble, read: `off` (each run alone: the local executor), or runs of a group stacked in up to
    `max_members` slots (None: as many as the group has and memory holds), and with `choose_faster`
    (auto) only where a short probe on the device measures the ensemble clearly faster."""

    off: bool = False
    max_members: int | None = None
    choose_faster: bool = False

    def __str__(self) -> str:
        """The option as the command line writes it: off, auto or K."""
        if self.off or self.choose_faster:
            return "off" if self.off else "auto"
        return "as many as memory holds" if self.max_members is None else str(self.max_members)


def read_ensemble(value: EnsembleChoice | str | int) -> EnsembleChoice:
    """The one reading of --ensemble: 'auto', 'off' or a number of members K >= 1 (an EnsembleChoice
    is returned as it is); anything else is a ConfigError."""
    if isinstance(value, EnsembleChoice):
        return value
    text = str(value).strip().lower()
    if text == "off":
        return EnsembleChoice(off=True)
    if text == "auto":
        return EnsembleChoice(choose_faster=True)
    try:
        k = int(text)
    except ValueError:
        k = 0
    if k < 1 or str(k) != text:
        raise ConfigError(
            f"--ensemble must be auto, off or a whole number of members >= 1, got {value!r}; "
            "e.g. --ensemble 8, or --ensemble off to train runs one at a time"
        )
    return EnsembleChoice(max_members=k)


def parse_ensemble(value: str) -> str | int:
    """'auto', 'off', or a number of members K >= 1 (read_ensemble's reading, as the option is written)."""
    choice = read_ensemble(value)
    return choice.max_members if choice.max_members is not None else str(choice)


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
# The packer: the piece every executor packs runs with


@dataclass(frozen=True)
class Packer:
    """Packs runs for `device` as `choice` asks (see the module docstring); the executors place its plans."""

    device: torch.device
    choice: EnsembleChoice
    memory_budget: int | None = None  # bytes; None: MEMORY_FRACTION of the memory free when planning, times memory_share
    memory_share: float = 1.0  # of the device's memory, what the jobs planned here share (a Ray task: its CPUs' or GPU's)
    try_compile: bool = True  # on CUDA, probe the compiled modes too (the dry run leaves them out: tens of seconds each)
    probe_limits: ProbeLimits = ProbeLimits()  # how long a probe may take (the dry run's are shorter)

    def plans(self, runs: list[Run], workers: int = 1, recorded: dict[str, dict] | None = None) -> list[EnsemblePlan]:
        """The groups and their slots; `workers` jobs training at once share the memory budget. Runs
        the `recorded` packing (RunStore.packing) holds resume as it planned them, probed no more.
        With --ensemble off, each run a plan of its own."""
        if self.choice.off:
            return [EnsemblePlan([run], 1) for run in runs]
        resumed, runs = recorded_plans(runs, recorded or {})
        budget = self.memory_budget
        if budget is None:
            free = free_memory_bytes(self.device)
            budget = None if free is None else int(MEMORY_FRACTION * free * self.memory_share)
        if budget is not None:
            budget //= workers
        plans = plan_ensembles(runs, self.choice.max_members, budget)
        for plan in plans:
            if plan.slots > 1 and self.device.type == "cuda" and self.try_compile:  # whichever measures fastest
                alone, together = probe_modes(plan.widest, plan.slots, self.device, (None, *COMPILE_MODES),
                                              self.probe_limits)
                plan.compile_mode = min(together, key=lambda mode: together[mode])
                plan.probe = (plan.slots, alone, together[plan.compile_mode])
            if plan.slots > 1 and self.choice.choose_faster:
                if plan.probe is None:
                    plan.probe = (plan.slots, *probe_step_seconds(plan.widest, plan.slots, self.device,
                                                                  limits=self.probe_limits))
                members, alone, together = plan.probe
                if together / members >= ENSEMBLE_STEP_AT_MOST * alone:
                    plan.slots = 1
        return resumed + plans
