"""The ensemble executor: runs of one shape trained together, each exactly as it would train alone.

`EnsembleExecutor` takes the runs an experiment hands any executor (memorize/runs/sweep.py)
and trains each group that memorize/runs/packing.py packs into one `EnsembleGPT`
(memorize/ensemble.py) in its slots; each slot holds one run, a *member*, with everything a run decides
by itself:

- its data and its batches: batch_indices(step, n, batch_size, seed) of its own run;
- its Schedule (memorize/schedule.py): warm-up, evaluations, plateau rule, cool-down, stop;
- its AdamW moments and step count, its learning rate, its gradient clip by its own norm;
- its evaluations: the workload's stop_signal on the member exported as a plain GPT, so
  the bits curve is measured by the very code the single-model loop uses.

`EnsembleTrainer` trains a group in the loop a run alone trains in (memorize/train.py's
TrainingLoop), over memorize/ensemble.py's EnsembleStep instead of train.AloneStep.

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
checkpoint holds everything (tests/test_ensemble_executor.py).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections import deque
from dataclasses import dataclass, field

import torch

from ..ensemble import EnsembleStep
from .ensemble_probe import ProbeLimits
from ..model import GPT
from ..runtime import cpu_threads_pinned, use_cpu_threads
from ..schedule import RunOutcome
from .packing import EnsembleChoice, EnsemblePlan, Packer, packing_entries, plan_threads
from .store import JobStore, RunStore, provenance
from .sweep import Run, SweepProgress, Workload, batch_rows, run_job, training_flops
from ..train import Member, TrainingLoop, start_member
from .workers import Job, run_jobs, workers_for


# ---------------------------------------------------------------------------------------
# Training one plan


class EnsembleTrainer:
    """Trains one plan's runs in its slots until every run is recorded: memorize/train.py's TrainingLoop
    over an EnsembleStep (memorize/ensemble.py), each run a member from its checkpoint or its start."""

    def __init__(self, plan: EnsemblePlan, workload: Workload, store: JobStore, progress: SweepProgress,
                 device: torch.device, repack_fraction: float):
        first = plan.runs[0]
        self.plan, self.workload, self.store, self.progress, self.device = plan, workload, store, progress, device
        self.step = EnsembleStep(first.model, plan.slots, first.backends.attention, first.backends.logprob,
                                 first.train.betas, device, plan.compile_mode)
        self.model = self.step.model
        repack_at = max(1, math.ceil(repack_fraction * plan.slots))  # empty slots that trigger a repack
        self.loop = TrainingLoop(self.step, device, first.train.precision,
                                 deque(functools.partial(self._join, run) for run in plan.runs), repack_at)

    @property
    def most_members(self) -> int:
        """The most members ever trained at once (tests check the memory cap with it)."""
        return self.loop.most_members

    def train(self) -> None:
        # One ensemble step does the work of its members' steps: it takes the threads such a step needs
        # (or, resumed, the threads it started with).
        if self.plan.threads is not None and self.device.type == "cpu":
            torch.set_num_threads(self.plan.threads)
        else:
            use_cpu_threads(self.device, self.plan.widest.model, self.plan.slots * batch_rows(self.plan.widest))
        self.loop.run()

    def _join(self, run: Run, k: int) -> Member:
        """The run takes slot k, with its step bar; as it finishes, its row is recorded at once."""
        data = self.workload.training_data(run).to(self.device)
        on_step, close_bar = self.progress.run_started(run)

        def record(gpt: GPT, outcome: RunOutcome) -> None:
            row = self.workload.result(run, gpt, outcome, data)
            close_bar()
            self.store.record({**row, **provenance(run.backends, self.device, f"ensemble of {self.plan.slots}")})
            self.progress.run_finished()

        return start_member(self.step, k, run.train, data, self.workload.stop_signal(run, data), self.device,
                            self.store.checkpoint_path(run.run_id), on_step=on_step, on_finish=record,
                            on_abort=close_bar)


# ---------------------------------------------------------------------------------------
# The executor


@dataclass
class EnsembleExecutor:
    """Trains runs in this process as its `packer` packs them (memorize/runs/packing.py), placed on
    `workers` (auto or a number, memorize/runs/workers.py) jobs at once, an ensemble or a run each."""

    device: torch.device
    # The packing (packing.Packer's): K, --ensemble auto, the memory budget, the probes.
    max_members: int | None = None  # K; None: as many as a group has and memory holds
    choose_faster: bool = False  # --ensemble auto
    memory_budget: int | None = None  # bytes; None: MEMORY_FRACTION of the memory free at the start, shared by the workers
    repack_fraction: float | None = None  # frozen share of the slots that triggers a repack; None: the device's
    workers: str | int = 1
    try_compile: bool = True  # on CUDA, probe the compiled modes too (the dry run leaves them out: tens of seconds each)
    probe_limits: ProbeLimits = ProbeLimits()  # how long a probe may take (the dry run's are shorter)
    trained: list[dict] = field(default_factory=list, repr=False)  # per ensemble: runs, slots, most members at once

    @property
    def packer(self) -> Packer:
        return Packer(self.device, EnsembleChoice(max_members=self.max_members, choose_faster=self.choose_faster),
                      self.memory_budget, try_compile=self.try_compile, probe_limits=self.probe_limits)

    def plans(self, runs: list[Run], workers: int = 1, recorded: dict[str, dict] | None = None) -> list[EnsemblePlan]:
        """The packer's plans (Packer.plans): `workers` jobs at once share the memory budget."""
        return self.packer.plans(runs, workers, recorded)

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
