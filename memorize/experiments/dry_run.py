"""--dry-run: an experiment's plan, printed without training anything.

Contract: it plans through the code that executes: the experiment's own validation and plan
(capacity.from_command_line and plan; generalization's source, reference and plan functions), the
run store's todo, and the `plans` of the executor the launcher factory builds for --ensemble.
Then it estimates the wall-clock from a short probe of each group's training step on this device;
a step too long to time in a second or so is timed at fewer rows and extrapolated
(ensemble_probe.DRY_RUN_PROBE). The estimate counts training steps at each run's step cap: runs
that plateau end sooner, and evaluations add a few per cent.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import torch

from . import capacity, generalization
from ..outputs import split_rows
from ..runs.ensemble_probe import DRY_RUN_PROBE, ProbeLimits, probe_rows, probe_step_seconds
from ..runs.launchers import executor_from_options
from ..runs.packing import EnsembleChoice, read_ensemble
from ..runs.store import PACKING, ROWS, RunStore, is_run_row
from ..runs.sweep import Run, batch_rows, training_flops
from ..runs.workers import workers_for
from ..runtime import cpu_threads_pinned
from .knobs import CapacityKnobs, ExecutionKnobs, GeneralizationKnobs
from .options import Checked
from .reference import reference_id, stored_reference


def wall_seconds(step_caps: list[int], slots: int, alone: float, together: float) -> float:
    """Seconds to train runs of these step caps in `slots` slots, the next run taking the first
    free slot; a step of k members costs `alone` at k = 1, `together` at k = slots, linear between."""
    def step_seconds(k: int) -> float:
        return alone if slots == 1 else alone + (together - alone) * (k - 1) / (slots - 1)

    queue, ends, now, total = list(step_caps), [], 0, 0.0
    while queue or ends:
        while queue and len(ends) < slots:
            heapq.heappush(ends, now + queue.pop(0))
        next_end = ends[0]
        total += (next_end - now) * step_seconds(len(ends))
        now = next_end
        while ends and ends[0] == now:
            heapq.heappop(ends)
    return total


def jobs_wall_seconds(jobs: list[tuple[float, float]], workers: int) -> float:
    """Seconds for jobs of (cost, seconds) on `workers` workers, as memorize/runs/workers.py runs them:
    in order on one, else the costliest first, each taken by the worker that is free first."""
    if workers <= 1:
        return sum(seconds for _, seconds in jobs)
    free_at = [0.0] * workers
    for _, seconds in sorted(jobs, key=lambda job: -job[0]):
        heapq.heapreplace(free_at, free_at[0] + seconds)
    return max(free_at)


def _runs(n: int) -> str:
    return f"{n} run" if n == 1 else f"{n} runs"


def _minutes(seconds: float) -> str:
    """3m05s; 5h20m past an hour; 4.2 days past two days."""
    whole = round(seconds)
    if whole >= 2 * 86400:
        return f"{seconds / 86400:.1f} days"
    if whole >= 3600:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 60}m{whole % 60:02d}s"


class Estimate(NamedTuple):
    text: str  # what --dry-run prints
    planned_s: float  # the wall-clock estimate as planned (ensembles, workers)
    one_at_a_time_s: float  # ... and with every run alone, one at a time


def describe(runs: list[Run], choice: EnsembleChoice | str | int, device: torch.device, title: str,
             first: Run | None = None, workers_choice: str | int = 1) -> str:
    """The plan as text: each group, its runs, its probe and the two estimates (as planned on the
    workers, one at a time); `first` is a run that trains alone before them (run-generalization's reference)."""
    return estimate(runs, choice, device, title, first, workers_choice).text


def estimate(runs: list[Run], choice: EnsembleChoice | str | int, device: torch.device, title: str,
             first: Run | None = None, workers_choice: str | int = 1, recorded: dict | None = None) -> Estimate:
    """describe's plan, with its two estimates in seconds; runs the `recorded` packing (recorded_packing)
    holds are planned as the rerun would resume them."""
    choice = read_ensemble(choice)  # as the command line read it, or as a library caller wrote it
    workers = workers_for(workers_choice, device, runs, training_flops)
    lines = [f"{title}: {_runs(len(runs))} to train on {device}, --ensemble {choice}, {workers} "
             f"{'worker' if workers == 1 else 'workers, one thread each'}"]
    before, limits = 0.0, DRY_RUN_PROBE.get(device.type, ProbeLimits())
    if first is not None:
        before = first.train.max_steps * probe_step_seconds(first, 1, device, limits=limits)[0]
        lines.append(f"  first, alone: {first.name} {first.model.name} N={first.n_sequences}, "
                     f"at most {first.train.max_steps} steps; estimate {_minutes(before)}"
                     f"{_extrapolated(first, 1, limits)}")
    with cpu_threads_pinned(1) if workers > 1 else contextlib.nullcontext():  # as the workers would train
        groups, planned, alone = _describe_groups(runs, choice, device, workers, before, limits, recorded,
                                                  workers_choice)
    return Estimate("\n".join(lines + groups), planned, alone)


def planner(choice: EnsembleChoice | str | int, device: torch.device, workers_choice: str | int, limits: ProbeLimits):
    """The executor --ensemble asks for, as the launcher factory builds it, to plan with: its `plans`
    are what it trains by. Probed eagerly, with the dry run's probe limits: compiling each group
    costs tens of seconds (a run tries it, per group). --ensemble off trains each run alone: its
    runs are shown grouped by shape, one slot each, as an ensemble of at most one member plans them."""
    choice = read_ensemble(choice)
    executor = executor_from_options("local", device, EnsembleChoice(max_members=1) if choice.off else choice,
                                     workers=workers_choice)
    return replace(executor, try_compile=False, probe_limits=limits)


def _describe_groups(runs: list[Run], choice: EnsembleChoice, device: torch.device, workers: int,
                     before: float, limits: ProbeLimits, recorded: dict | None,
                     workers_choice: str | int) -> tuple[list[str], float, float]:
    grouping = planner(choice, device, workers_choice, limits)
    # --ensemble off resumes no recorded ensemble: LocalExecutor trains every run alone
    plans = grouping.plans(runs, workers, None if choice.off else recorded)
    lines, jobs, total_alone = [], [], 0.0
    for i, plan in enumerate(plans, 1):
        first = plan.runs[0]
        if plan.probe is not None:  # --ensemble auto measured it already
            members, alone, together = plan.probe
        else:  # measure at the slots the group has, or would have as an ensemble
            members = plan.slots if plan.slots > 1 else _possible_slots(plan, grouping)
            alone, together = probe_step_seconds(plan.widest, members, device, limits=limits)
            together = together if members > 1 else None
        caps = [r.train.max_steps for r in plan.runs]
        seconds_alone = wall_seconds(caps, 1, alone, alone)
        seconds = seconds_alone if plan.slots == 1 else wall_seconds(caps, plan.slots, alone, together)
        if plan.slots == 1:  # each run a job of its own
            jobs += [(training_flops(r), r.train.max_steps * alone) for r in plan.runs]
        else:
            jobs.append((sum(map(training_flops, plan.runs)), seconds))
        total_alone += seconds_alone
        how = "one at a time" if plan.slots == 1 else f"an ensemble of {plan.slots} slots"
        capped = " (capped by the memory free)" if plan.memory_capped else ""
        capped += ", resumed as the first run packed it" if plan.job is not None else ""
        rows = batch_rows(plan.widest)
        smaller = f" (at most {rows} rows: datasets smaller than a batch)" if rows < first.train.batch_size else ""
        batch = f"batch {first.train.batch_size}{smaller}"
        lines.append(f"  group {i}: {first.model.name} {first.train.precision} {batch}, "
                     f"{_runs(len(plan.runs))}, {how}{capped}")
        probe = f"{alone * 1e3:.2f} ms/step alone"
        if together is not None:
            per_run = together / members * 1e3
            probe += f", {together * 1e3:.2f} ms/step for {members} together ({per_run:.2f} ms per run-step)"
        lines.append(f"    probe: {probe}; estimate {_minutes(seconds)}{_extrapolated(plan.widest, members, limits)}")
        for run in plan.runs:
            lines.append(f"    {run.run_id}  N={run.n_sequences}  at most {run.train.max_steps} steps")
    planned = before + jobs_wall_seconds(jobs, workers)
    eager = "; eager steps: on CUDA a run also tries torch.compile and CUDA graphs" if device.type == "cuda" else ""
    lines.append(f"estimated wall-clock at the step caps: {_minutes(planned)} as planned, "
                 f"{_minutes(before + total_alone)} one run at a time on one worker (training steps only; runs "
                 f"that plateau end sooner{eager})")
    return lines, planned, before + total_alone


def _extrapolated(run: Run, members: int, limits: ProbeLimits) -> str:
    """Where the probe timed fewer rows than the batch (ensemble_probe.probe_rows), a note saying so."""
    fewer = probe_rows(run, members, limits.most_flops)
    if fewer is None:
        return ""
    return f" (steps timed at 1 and {fewer} of the batch's {batch_rows(run)} rows and extrapolated)"


def _possible_slots(plan, grouping) -> int:
    """The slots the group would get as an ensemble with no --ensemble cap (memory still caps it)."""
    return replace(grouping, max_members=None, choose_faster=False).plans(plan.runs)[0].slots


def finished_rows(folder: Path) -> list[dict]:
    """The rows of runs.jsonl in an output folder, read without touching it.

    The run store (store.RunStore) takes the folder's lock, creates it and its checkpoints/ and sets
    damaged rows aside: not what a dry run may do to a folder another run may be writing. A line
    that does not parse is skipped here: its run is to do, as the real command would redo it.
    """
    try:
        data = (Path(folder) / ROWS).read_bytes()
    except OSError:  # no folder, no rows yet, unreadable: nothing finished that we can see
        return []
    read, _ = split_rows(data, is_run_row)
    return [row for _, _, row in read]


def recorded_packing(folder: Path | None) -> dict:
    """The packing a rerun into `folder` resumes (store.RunStore.packing), read without touching it; {} where none."""
    try:
        found = json.loads((Path(folder) / PACKING).read_text())
    except (OSError, ValueError, TypeError):  # no folder or file, damaged: the rerun plans anew
        return {}
    return found if isinstance(found, dict) else {}


def remaining_runs(runs: list[Run], folder: Path | None, experiment: str) -> list[Run]:
    """The runs the real command would still train into `folder` (RunStore.todo over its finished rows)."""
    if folder is None:
        return runs
    view = RunStore(folder, experiment)  # never entered: no lock taken, nothing created or written
    view.rows = finished_rows(folder)
    return view.todo(runs)


def capacity_command(preset_name: str, knobs: CapacityKnobs, execution: ExecutionKnobs) -> str:
    """`memk run-capacity --dry-run`: the plan of what remains to train into --out."""
    checked, out = capacity.from_command_line(preset_name, knobs)
    return _capacity_estimate(checked, execution.ensemble, execution.workers, out).text


def capacity_plan(exp: capacity.CapacityExperiment, choice: EnsembleChoice | str | int, workers: str | int = 1,
                  out_dir: Path | None = None) -> str:
    return capacity_estimate(exp, choice, workers, out_dir).text


def capacity_estimate(exp: capacity.CapacityExperiment, choice: EnsembleChoice | str | int, workers: str | int = 1,
                      out_dir: Path | None = None) -> Estimate:
    """The plan of the runs still to train into out_dir (None: all of them, as into an empty folder)."""
    return _capacity_estimate(capacity.validate(exp), choice, workers, out_dir)


def _capacity_estimate(checked: Checked[capacity.CapacityExperiment], choice: EnsembleChoice | str | int, workers: str | int,
                       out_dir: Path | None) -> Estimate:
    runs = capacity.plan(checked.experiment, checked.backends)
    todo = remaining_runs(runs, out_dir, "capacity")
    title = "run-capacity plan"
    if len(todo) < len(runs):  # a resume: say what is done already, as the real command's progress bar would
        title += f" ({len(runs) - len(todo)} of {_runs(len(runs))} finished in {out_dir})"
    if not todo:
        return Estimate(f"{title}: 0 runs to train; running it would only write the summary and plots", 0.0, 0.0)
    return estimate(todo, choice, checked.device, title, workers_choice=workers, recorded=recorded_packing(out_dir))


def generalization_command(preset_name: str, knobs: GeneralizationKnobs, execution: ExecutionKnobs) -> str:
    """`memk run-generalization --dry-run`: the reference (where --out holds none trained), then the runs."""
    checked, out = generalization.from_command_line(preset_name, knobs)
    return _generalization_plan(checked, execution.ensemble, out, execution.workers)


def generalization_plan(exp: generalization.GeneralizationExperiment, choice: EnsembleChoice | str | int, out_dir: Path,
                        workers: str | int = 1) -> str:
    return _generalization_plan(generalization.validate(exp), choice, out_dir, workers)


def _generalization_plan(checked: Checked[generalization.GeneralizationExperiment], choice: EnsembleChoice | str | int,
                         out_dir: Path, workers: str | int) -> str:
    """The sweep and check runs. Their sizes need H(x | θ) per sequence: exact for the Markov chain,
    the reference model's where --out holds it trained, else the most a sequence can carry (the
    smallest sizes the plan can have)."""
    exp = checked.experiment
    with tempfile.TemporaryDirectory() as scratch:  # a text corpus is prepared here, not in --out
        data = generalization.source_data(exp, Path(scratch))
    first = generalization.reference_run(checked, data)
    ref_id = reference_id(first.model, first.train, data)
    trained = stored_reference(out_dir, first.model, ref_id, set_aside=False)  # read, never set aside
    bits = generalization.source_bits_per_sequence(data, trained)
    if data.exact is not None:
        basis = "exact (Markov chain)"
    elif trained is not None:
        basis = "the trained reference in --out"
    else:
        basis = "at most, until the reference is trained: the sizes are the smallest"
    runs = generalization.plan(exp, bits, len(data.train_pool), ref_id, checked.backends)
    title = f"run-generalization plan (H(x | θ) = {bits:.1f} bits per sequence, {basis})"
    return describe(runs, choice, checked.device, title, first=None if trained else first, workers_choice=workers)
