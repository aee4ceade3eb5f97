"""Capacity experiments: sweep dataset sizes per model, take the plateau, fit bits per parameter.

For each model config and precision, train on uniform random datasets whose sizes
bracket the capacity expected at 3.6 bits per parameter (PAPER.md), on both sides.
Capacity is the plateau of memorized bits: the most bits any dataset size got
memorized (Capacity(θ̂) = max over X of mem(X, θ̂)). α, bits per parameter, is fitted
across model sizes, through the origin and with an intercept.

The output folder holds: experiment.json (what was asked), runs.jsonl (a `CapacityRow`
per finished run, rewritten atomically as each finishes), checkpoints/ (the run in
progress), summary.json, capacity_curves.png, capacity_vs_params.png.

`memk run-capacity` enters here once (`run_command`): its knobs over a preset, validated once,
planned, handed to the executor the launcher factory builds, summarized and printed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from scipy import stats

from ..bits import uniform_sequence_entropy_bits
from ..constants import BOTH_PRECISIONS, PAPER_ALPHA
from ..data import uniform_random_sequences
from ..model import GPT, GPTConfig, count_parameters
from ..runtime import Backends, check_fits, training_memory_bytes
from ..schedule import SATURATED_BELOW, RunOutcome, TrainConfig, doubling_gain, saturated
from ..runs.store import RunStore
from ..runs.sweep import Executor, LocalExecutor, Run, SweepProgress, require_rows
from ..train import StopSignal, uniform_code_signal
from .knobs import CapacityKnobs, ExecutionKnobs
from .options import (
    Checked, CommandResult, check_experiment, choose_sizes, executor_for, output_folder, override_common, override_training,
    parse_models, pick_preset, reshape_models,
)

@dataclass(frozen=True)
class CapacityExperiment:
    models: tuple[GPTConfig, ...]
    train: TrainConfig
    precisions: tuple[str, ...] = ("float32",)
    # Dataset sizes as multiples of the expected capacity (PAPER_ALPHA bits/param), in bits ...
    size_factors: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)
    # ... or explicit numbers of sequences, the same for every model (overrides size_factors).
    dataset_sizes: tuple[int, ...] | None = None
    device: str = "auto"
    seed: int = 0
    attention_backend: str = "auto"
    logprob_backend: str = "auto"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["models"] = [m.to_dict() for m in self.models]
        return d


def _model(n_layer: int, d_model: int, n_head: int, vocab_size: int, seq_len: int) -> GPTConfig:
    return GPTConfig(n_layer=n_layer, d_model=d_model, n_head=n_head, vocab_size=vocab_size, seq_len=seq_len)


# memk's recipe (docs/capacity-study.md: no change of learning rate, clipping, β2, warm-up, weight
# decay or batch moved the bits stored at a fixed step budget by more than 5%): AdamW at lr 1e-2,
# β (0.9, 0.98), 100 warm-up steps, clip 1, no weight decay, batch 64, a 20% linear cool-down,
# started early only by the saturation rule (a doubling of the steps gained under 2%).
RECIPE = TrainConfig(lr=1e-2, warmup_steps=100, batch_size=64, betas=(0.9, 0.98), grad_clip=1.0,
                     max_steps=3000, cooldown_steps=600, min_steps=500, eval_every=100,
                     saturation_gain=SATURATED_BELOW)

PRESETS: dict[str, Callable[[], CapacityExperiment]] = {
    # Four one-layer models (1.7K to 16K parameters) on V=64, S=32, 20 runs, for a laptop CPU.
    # The step cap stops them short of saturation: each row says by how much (README).
    "default": lambda: CapacityExperiment(
        models=tuple(_model(1, d, h, 64, 32) for d, h in ((8, 1), (16, 2), (24, 2), (32, 2))),
        train=RECIPE,
    ),
    # The paper's grid: GPT-2 with 1-8 layers and d_model 32-512, V=2048, S=64, batch
    # 2048, bfloat16. For GPUs: it takes days; narrow it with --models.
    "paper": lambda: CapacityExperiment(
        models=tuple(_model(L, d, max(1, d // 32), 2048, 64) for L in (1, 2, 4, 8) for d in (32, 64, 128, 256, 512)),
        train=TrainConfig(
            lr=1e-3, warmup_steps=1000, batch_size=2048, max_steps=1_000_000, cooldown_steps=20_000,
            min_steps=10_000, eval_every=1000, saturation_gain=SATURATED_BELOW,
        ),
        precisions=("bfloat16",),
    ),
    # The paper's 1x32 model at V 2048, S 64 (80,352 parameters; the paper: 4.23 bits/param in
    # float32, 3.93 in bfloat16) on 400 and 980 sequences (0.96x and 2.3x its capacity at 3.6
    # bits/param, 0.8x and 2x at the paper's 4.23), batch 64, 30,000 steps: two runs side by side.
    "paper-1x32": lambda: CapacityExperiment(
        models=(_model(1, 32, 1, 2048, 64),),
        train=replace(RECIPE, max_steps=30_000, cooldown_steps=6000, min_steps=4000, eval_every=500),
        dataset_sizes=(400, 980),
    ),
    # Seconds-long, for tests and a first look: two tiny models, two sizes each.
    "smoke": lambda: CapacityExperiment(
        models=(_model(1, 8, 1, 16, 8), _model(1, 16, 2, 16, 8)),
        train=replace(RECIPE, warmup_steps=5, batch_size=32, max_steps=30, cooldown_steps=6, min_steps=10, eval_every=10),
        size_factors=(0.5, 2.0),
    ),
}


def preset(name: str) -> CapacityExperiment:
    return pick_preset(PRESETS, name)


def dataset_sizes_for(model: GPTConfig, exp: CapacityExperiment) -> list[int]:
    """Numbers of sequences to train this model on, smallest first."""
    if exp.dataset_sizes is not None:
        return sorted(set(exp.dataset_sizes))
    bits_per_sequence = uniform_sequence_entropy_bits(model.vocab_size, model.seq_len)
    expected = PAPER_ALPHA * count_parameters(model)
    return sorted({max(1, round(f * expected / bits_per_sequence)) for f in exp.size_factors})


def validate(exp: CapacityExperiment) -> Checked[CapacityExperiment]:
    """Check everything that can be checked before training, once; the experiment with its device and backends."""
    return Checked.of(exp, check_experiment(
        models=exp.models, precisions=exp.precisions, dataset_sizes=exp.dataset_sizes,
        size_factors={"size factors": exp.size_factors}, seed=exp.seed, device=exp.device,
        attention_backend=exp.attention_backend, logprob_backend=exp.logprob_backend,
    ))


def plan(exp: CapacityExperiment, backends: Backends) -> list[Run]:
    """Every (precision, model, dataset size) run, in the order they train."""
    runs = []
    for precision in exp.precisions:
        train = replace(exp.train, precision=precision, seed=exp.seed)
        for m in exp.models:
            for n in dataset_sizes_for(m, exp):
                runs.append(Run(f"{m.name}-N{n}-{precision}-seed{exp.seed}", m, n, train, backends, role="capacity"))
    return runs


@dataclass(frozen=True, kw_only=True)
class CapacityRow:
    """One capacity run's row of runs.jsonl, in the order of its keys there (the store adds its
    provenance after them: memorize/runs/store.py)."""

    run_id: str
    model: dict  # GPTConfig.to_dict()
    model_name: str
    parameters: int
    n_sequences: int
    precision: str
    seed: int
    dataset_bits: float  # n_sequences · (S-1)·log2 V: exact for uniform tokens
    memorized_bits: float  # the best evaluation's: the run's capacity estimate
    memorized_bits_final: float
    fraction_memorized: float
    model_bits_per_sequence: float
    steps: int
    stop_reason: str
    # how far from saturation it stopped: the bits gained over the last doubling of steps
    # before the cool-down, as a share (schedule.doubling_gain); saturated below SATURATED_BELOW
    saturation_gain: float | None
    saturated: bool
    final_loss: float
    train_seconds: float
    bits_curve: list  # (step, memorized bits) at each evaluation
    train_config: dict  # TrainConfig.to_dict()

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, row: dict) -> CapacityRow:
        """A row as runs.jsonl holds it, its provenance left out. Rows of earlier memk lack the saturation
        verdict: it is computed from their curve up to their cool-down's start, which is unknown there,
        so the whole curve stands in."""
        if "saturation_gain" not in row:
            gain = doubling_gain([tuple(point) for point in row.get("bits_curve", [])])
            row = {**row, "saturation_gain": gain, "saturated": saturated(gain)}
        return cls(**{f.name: row[f.name] for f in fields(cls)})


@dataclass(frozen=True)
class UniformWorkload:
    """Runs on uniform random tokens: run k's data is the first n sequences of the seeded stream,
    whose H(x | θ) = (S-1)·log2 V per sequence is exact."""

    def training_data(self, run: Run) -> torch.Tensor:
        return uniform_random_sequences(run.n_sequences, run.model.vocab_size, run.model.seq_len, seed=run.train.seed)

    def stop_signal(self, run: Run, data: torch.Tensor) -> StopSignal:
        return uniform_code_signal(data, run.train.precision)

    def result(self, run: Run, model: GPT, outcome: RunOutcome, data: torch.Tensor) -> dict:
        dataset_bits = run.n_sequences * uniform_sequence_entropy_bits(run.model.vocab_size, run.model.seq_len)
        return CapacityRow(
            run_id=run.run_id, model=run.model.to_dict(), model_name=run.model.name,
            parameters=count_parameters(run.model), n_sequences=run.n_sequences, precision=run.train.precision,
            seed=run.train.seed, dataset_bits=dataset_bits, memorized_bits=outcome.memorized_bits,
            memorized_bits_final=outcome.memorized_bits_final,
            fraction_memorized=outcome.memorized_bits / dataset_bits,
            model_bits_per_sequence=outcome.model_bits_per_sequence, steps=outcome.steps,
            stop_reason=outcome.stop_reason, saturation_gain=outcome.saturation_gain,
            saturated=saturated(outcome.saturation_gain), final_loss=outcome.final_loss,
            train_seconds=outcome.train_seconds, bits_curve=outcome.curve, train_config=run.train.to_dict(),
        ).to_dict()


def run_capacity(exp: CapacityExperiment | Checked[CapacityExperiment], out_dir: Path, progress: bool = True,
                 executor: Executor | None = None) -> dict:
    """Run (or resume) every planned run, then fit and write the summary and plots. The experiment is
    validated here unless it comes validated already (a `Checked`, as the command line's does)."""
    checked = exp if isinstance(exp, Checked) else validate(exp)
    exp, device = checked.experiment, checked.device
    runs = plan(exp, checked.backends)
    largest = max(runs, key=lambda r: training_memory_bytes(r.model, r.n_sequences, r.train.batch_size))
    check_fits(training_memory_bytes(largest.model, largest.n_sequences, largest.train.batch_size), device,
               f"{largest.model.name} on {largest.n_sequences:,} sequences",
               "train on fewer sequences (--sizes / --size-factors) or with a smaller --batch-size")
    with RunStore(out_dir, "capacity") as store:
        store.write_experiment(exp.to_dict())
        todo = store.todo(runs)
        bar = SweepProgress(total=len(runs), done=len(runs) - len(todo), desc="sweep", enabled=progress)
        try:
            (executor or LocalExecutor(device)).execute(todo, UniformWorkload(), store, bar)
        finally:
            bar.close()
        rows, failures = store.rows_of(runs), store.failures_of(runs)
        require_rows(rows, failures)
        summary = summarize(rows)
        summary["failed_runs"] = failures  # an executor that goes on past failures lists them
        summary["experiment"] = exp.to_dict()
        store.write_json("summary.json", summary)
        from .plots import plot_capacity_curves, plot_capacity_vs_params  # matplotlib only when needed

        plot_capacity_curves(summary, store.path("capacity_curves.png"))
        plot_capacity_vs_params(summary, store.path("capacity_vs_params.png"))
    return summary


def fit_alpha(parameters: Iterable[float], capacities: Iterable[float], confidence: float = 0.95) -> dict:
    """Least-squares fits of capacity = α · parameters (through the origin) and = α · P + b.

    Confidence intervals are Student-t intervals on the slope (n-1 degrees of freedom
    through the origin, n-2 with an intercept); None where there are too few points.
    R² is 1 - SS_res / SS_tot with SS_tot centred on the mean in both fits, so the two
    are comparable (the uncentred R² usual for origin fits flatters them).
    """
    x = np.asarray(list(parameters), dtype=np.float64)
    y = np.asarray(list(capacities), dtype=np.float64)
    n = len(x)
    if n == 0:
        raise ValueError("fit_alpha needs at least one (parameters, capacity) point")
    ss_tot = float(((y - y.mean()) ** 2).sum())
    q = 0.5 + confidence / 2

    alpha = float((x * y).sum() / (x * x).sum())
    ss_res = float(((y - alpha * x) ** 2).sum())
    origin = {"alpha": alpha, "r2": 1 - ss_res / ss_tot if ss_tot > 0 else None, "ci": None, "stderr": None}
    if n >= 2:
        se = math.sqrt(ss_res / (n - 1) / float((x * x).sum()))
        t = float(stats.t.ppf(q, n - 1))
        origin.update(stderr=se, ci=[alpha - t * se, alpha + t * se])

    intercept = None
    if n >= 2 and np.ptp(x) > 0:
        fit = stats.linregress(x, y)
        intercept = {"alpha": float(fit.slope), "intercept": float(fit.intercept), "r2": float(fit.rvalue**2)}
        if n >= 3:
            t = float(stats.t.ppf(q, n - 2))
            intercept.update(stderr=float(fit.stderr), ci=[fit.slope - t * fit.stderr, fit.slope + t * fit.stderr])
        else:
            intercept.update(stderr=None, ci=None)
    return {"n_models": n, "confidence": confidence, "through_origin": origin, "with_intercept": intercept}


def summarize(rows: Iterable[dict]) -> dict:
    """Capacity per (precision, model) and the α fits, one per precision, from rows as runs.jsonl holds them."""
    rows = [CapacityRow.from_dict(r) for r in rows]
    out: dict = {"paper_alpha": PAPER_ALPHA, "precisions": {}}
    for precision in sorted({r.precision for r in rows}):
        models = []
        for name in dict.fromkeys(r.model_name for r in rows if r.precision == precision):
            runs = sorted((r for r in rows if r.precision == precision and r.model_name == name),
                          key=lambda r: r.n_sequences)
            best = max(runs, key=lambda r: r.memorized_bits)
            parameters = runs[0].parameters
            models.append(
                {
                    "model_name": name,
                    "model": runs[0].model,
                    "parameters": parameters,
                    "capacity_bits": best.memorized_bits,
                    "bits_per_parameter": best.memorized_bits / parameters,
                    "capacity_at_n_sequences": best.n_sequences,
                    # The plateau is seen when some dataset held clearly more bits than the model stored.
                    "plateau_seen": runs[-1].dataset_bits >= 1.5 * best.memorized_bits,
                    # The capacity is a lower bound unless the run that set it was trained to saturation.
                    "saturation_gain": best.saturation_gain,
                    "saturated": saturated(best.saturation_gain),
                    "points": [
                        {"n_sequences": r.n_sequences, "dataset_bits": r.dataset_bits,
                         "memorized_bits": r.memorized_bits, "fraction_memorized": r.fraction_memorized,
                         "steps": r.steps, "stop_reason": r.stop_reason, "saturation_gain": r.saturation_gain}
                        for r in runs
                    ],
                }
            )
        fit = fit_alpha([m["parameters"] for m in models], [m["capacity_bits"] for m in models])
        out["precisions"][precision] = {"models": models, "fit": fit}
    return out


def format_table(summary: dict) -> str:
    """The table printed at the end of a run."""
    lines = []
    for precision, block in summary["precisions"].items():
        lines.append(f"precision {precision}")
        lines.append(f"  {'model':<24}{'params':>9}{'capacity bits':>15}{'bits/param':>12}  plateau  at N"
                     "  last doubling")
        for m in block["models"]:
            gain = m.get("saturation_gain")
            verdict = "n/a" if gain is None else f"+{gain:.1%}" + ("" if m["saturated"] else " (lower bound)")
            lines.append(
                f"  {m['model_name']:<24}{m['parameters']:>9}{m['capacity_bits']:>15.0f}{m['bits_per_parameter']:>12.3f}"
                f"  {'yes' if m['plateau_seen'] else 'NO ':<7}  {m['capacity_at_n_sequences']:<5} {verdict}"
            )
        fit = block["fit"]
        o = fit["through_origin"]
        lines.append(f"  α through origin: {_alpha_text(o)}")
        if fit["with_intercept"] is not None:
            w = fit["with_intercept"]
            lines.append(f"  α with intercept: {_alpha_text(w)}, intercept {w['intercept']:.0f} bits")
        lines.append(f"  (paper: {PAPER_ALPHA} bits/param; {int(fit['confidence'] * 100)}% intervals; last doubling: bits"
                     f" gained over the last doubling of steps; saturated below +{SATURATED_BELOW:.0%})")
    return "\n".join(lines)


def _alpha_text(f: dict) -> str:
    ci = f"[{f['ci'][0]:.3f}, {f['ci'][1]:.3f}]" if f.get("ci") else "[interval needs more models]"
    r2 = f"{f['r2']:.3f}" if f.get("r2") is not None else "n/a"
    return f"{f['alpha']:.3f} bits/param {ci}, R² {r2}"


def experiment_from_options(preset_name: str, knobs: CapacityKnobs = CapacityKnobs()) -> CapacityExperiment:
    """A preset with the command line's knobs applied (validate checks the result); a knob that
    cannot be read is a ConfigError."""
    exp = preset(preset_name)
    base = exp.models[0]
    vocab = knobs.vocab_size if knobs.vocab_size is not None else base.vocab_size
    length = knobs.seq_len if knobs.seq_len is not None else base.seq_len
    changes: dict = {}
    if knobs.models is not None:
        changes["models"] = parse_models(knobs.models, vocab, length)
    elif knobs.vocab_size is not None or knobs.seq_len is not None:
        changes["models"] = reshape_models(exp.models, vocab, length)
    changes.update(choose_sizes(knobs.sizes, knobs.size_factors))
    if knobs.precision is not None:
        changes["precisions"] = BOTH_PRECISIONS if knobs.precision == "both" else (knobs.precision,)
    override_common(changes, knobs.training, knobs.seed)
    changes["train"] = override_training(exp.train, knobs.training, knobs.cooldown_steps)
    return replace(exp, **changes)


def from_command_line(preset_name: str, knobs: CapacityKnobs) -> tuple[Checked[CapacityExperiment], Path]:
    """`memk run-capacity`'s experiment, validated once, and its output folder (its run and its dry
    run both start here)."""
    checked = validate(experiment_from_options(preset_name, knobs))
    return checked, output_folder(knobs.out, Path("runs") / f"capacity-{preset_name}")


def run_command(preset_name: str, knobs: CapacityKnobs, execution: ExecutionKnobs) -> CommandResult:
    """`memk run-capacity`: the experiment trained by the executor the command line asks for, and its table."""
    checked, out = from_command_line(preset_name, knobs)
    executor = executor_for(execution, checked.device)
    summary = run_capacity(checked, out, execution.progress, executor)
    text = (f"{format_table(summary)}\n"
            f"results in {out}/: runs.jsonl, summary.json, capacity_curves.png, capacity_vs_params.png")
    return CommandResult(text, out, summary)
