"""Capacity experiments: sweep dataset sizes per model, take the plateau, fit bits per parameter.

For each model config and precision, train on uniform random datasets whose sizes
bracket the capacity expected at 3.6 bits per parameter (PAPER.md), on both sides.
Capacity is the plateau of memorized bits: the most bits any dataset size got
memorized (Capacity(θ̂) = max over X of mem(X, θ̂)). α, bits per parameter, is fitted
across model sizes, through the origin and with an intercept.

The output folder holds: experiment.json (what was asked), runs.jsonl (a row per
finished run, rewritten atomically as each finishes), checkpoints/ (the run in
progress), summary.json, capacity_curves.png, capacity_vs_params.png.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from scipy import stats

from memk import kernels

from .bits import uniform_sequence_entropy_bits
from .data import uniform_random_sequences
from .errors import ConfigError
from .model import GPTConfig, count_parameters
from .outputs import atomic_write_text, load_rows, output_dir, write_rows
from .train import PRECISIONS, TrainConfig, train_to_saturation

PAPER_ALPHA = 3.6  # bits per parameter, GPT-family models (Morris et al. 2025)


@dataclass(frozen=True)
class CapacityExperiment:
    models: tuple[GPTConfig, ...]
    train: TrainConfig
    precisions: tuple[str, ...] = ("float32",)
    # Dataset sizes as multiples of the expected capacity (3.6 bits/param), in bits ...
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


PRESETS: dict[str, Callable[[], CapacityExperiment]] = {
    # Four one-layer models (1.7K to 16K parameters) on V=64, S=32: 20 runs that finish
    # in about ten minutes on a 2-core CPU. The step cap stops them short of full
    # saturation, so α comes out below the paper's (README says by how much).
    "default": lambda: CapacityExperiment(
        models=tuple(_model(1, d, h, 64, 32) for d, h in ((8, 1), (16, 2), (24, 2), (32, 2))),
        train=TrainConfig(
            lr=1e-2, warmup_steps=100, batch_size=64, max_steps=3000, cooldown_steps=600, min_steps=500, eval_every=100
        ),
    ),
    # The paper's grid: GPT-2 with 1-8 layers and d_model 32-512, V=2048, S=64, batch
    # 2048, bfloat16. For GPUs: it takes days; narrow it with --models.
    "paper": lambda: CapacityExperiment(
        models=tuple(_model(L, d, max(1, d // 32), 2048, 64) for L in (1, 2, 4, 8) for d in (32, 64, 128, 256, 512)),
        train=TrainConfig(
            lr=1e-3, warmup_steps=1000, batch_size=2048, max_steps=1_000_000, cooldown_steps=20_000,
            min_steps=10_000, eval_every=1000, plateau_window=10, plateau_rel_tol=0.002,
        ),
        precisions=("bfloat16",),
    ),
    # Seconds-long, for tests and a first look: two tiny models, three sizes each.
    "smoke": lambda: CapacityExperiment(
        models=(_model(1, 8, 1, 16, 8), _model(1, 16, 2, 16, 8)),
        train=TrainConfig(
            lr=1e-2, warmup_steps=5, batch_size=32, max_steps=30, cooldown_steps=6, min_steps=10, eval_every=10
        ),
        size_factors=(0.5, 2.0),
    ),
}


def preset(name: str) -> CapacityExperiment:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]()


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but this torch sees no CUDA device; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {device!r} is not supported: use cpu or cuda")
    return dev


def dataset_sizes_for(model: GPTConfig, exp: CapacityExperiment) -> list[int]:
    """Numbers of sequences to train this model on, smallest first."""
    if exp.dataset_sizes is not None:
        return sorted(set(exp.dataset_sizes))
    bits_per_sequence = uniform_sequence_entropy_bits(model.vocab_size, model.seq_len)
    expected = PAPER_ALPHA * count_parameters(model)
    return sorted({max(1, round(f * expected / bits_per_sequence)) for f in exp.size_factors})


def validate(exp: CapacityExperiment) -> torch.device:
    """Check everything that can be checked before training; return the device."""
    if not exp.models:
        raise ConfigError("no models to train: give at least one with --models")
    for p in exp.precisions:
        if p not in PRECISIONS:
            raise ConfigError(f"unknown precision {p!r}; choose from {', '.join(PRECISIONS)} or 'both'")
    if exp.dataset_sizes is not None:
        bad = [n for n in exp.dataset_sizes if n < 1]
        if bad or not exp.dataset_sizes:
            raise ConfigError(f"dataset sizes must be >= 1 sequence, got {list(exp.dataset_sizes)}")
    elif not exp.size_factors or any(not f > 0 for f in exp.size_factors):
        raise ConfigError(f"size factors must be positive, got {list(exp.size_factors)}")
    for m in exp.models:
        if m.seq_len < 2:
            raise ConfigError(f"seq_len must be >= 2 (the first token is context, the rest are coded), got {m.seq_len}")
    device = resolve_device(exp.device)
    check_backends(exp.attention_backend, exp.logprob_backend)
    return device


def check_backends(attention_backend: str, logprob_backend: str) -> None:
    """Backend names must be 'auto' or registered in memk.kernels."""
    for kind, name, known in (
        ("attention", attention_backend, kernels.attention_backends()),
        ("log-prob", logprob_backend, kernels.logprob_backends()),
    ):
        if name != "auto" and name not in known:
            raise ConfigError(f"unknown {kind} backend {name!r}; choose auto or one of {', '.join(known)}")


def resolve_backends(device: torch.device, attention_backend: str, logprob_backend: str) -> tuple[str, str]:
    """'auto' becomes the best backend memk.kernels has for the device."""
    return (
        kernels.default_attention_backend(device) if attention_backend == "auto" else attention_backend,
        kernels.default_logprob_backend(device) if logprob_backend == "auto" else logprob_backend,
    )


def run_id(model: GPTConfig, n: int, precision: str, exp: CapacityExperiment) -> str:
    """A name that changes whenever anything that shapes the run's result changes."""
    train = replace(exp.train, precision=precision, seed=exp.seed).to_dict()
    digest = hashlib.sha1(json.dumps([model.to_dict(), n, train], sort_keys=True).encode()).hexdigest()[:8]
    return f"{model.name}-N{n}-{precision}-seed{exp.seed}-{digest}"


@dataclass
class PlannedRun:
    run_id: str
    model: GPTConfig
    n: int
    precision: str


def plan(exp: CapacityExperiment) -> list[PlannedRun]:
    return [
        PlannedRun(run_id(m, n, p, exp), m, n, p)
        for p in exp.precisions
        for m in exp.models
        for n in dataset_sizes_for(m, exp)
    ]


def run_capacity(
    exp: CapacityExperiment,
    out_dir: Path,
    progress: bool = True,
    on_run_done: Callable[[dict], None] | None = None,
) -> dict:
    """Run (or resume) every planned run, then fit and write the summary and plots."""
    device = validate(exp)
    with output_dir(out_dir) as out_dir:
        return _run_locked(exp, out_dir, device, progress, on_run_done)


def _run_locked(exp, out_dir, device, progress, on_run_done) -> dict:
    attention_backend, logprob_backend = resolve_backends(device, exp.attention_backend, exp.logprob_backend)
    atomic_write_text(out_dir / "experiment.json", json.dumps(exp.to_dict(), indent=2) + "\n")

    runs_path = out_dir / "runs.jsonl"
    rows = load_rows(runs_path)
    done = {r["run_id"] for r in rows}
    planned = plan(exp)
    todo = [r for r in planned if r.run_id not in done]

    bar = progress_bar(total=len(planned), initial=len(planned) - len(todo), desc="sweep", disable=not progress)
    for run in todo:
        bar.set_postfix_str(f"{run.model.name} N={run.n} {run.precision}")
        row = _train_one(run, exp, device, out_dir, attention_backend, logprob_backend, progress)
        rows.append(row)
        write_rows(runs_path, rows)
        (out_dir / "checkpoints" / f"{run.run_id}.pt").unlink(missing_ok=True)
        if on_run_done is not None:
            on_run_done(row)
        bar.update(1)
    bar.close()

    wanted = {r.run_id for r in planned}
    summary = summarize([r for r in rows if r["run_id"] in wanted])
    summary["experiment"] = exp.to_dict()
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    from .plots import plot_capacity_curves, plot_capacity_vs_params  # matplotlib only when needed

    plot_capacity_curves(summary, out_dir / "capacity_curves.png")
    plot_capacity_vs_params(summary, out_dir / "capacity_vs_params.png")
    return summary


def progress_bar(**kwargs):
    from tqdm.auto import tqdm

    return tqdm(dynamic_ncols=True, leave=kwargs.pop("leave", True), **kwargs)


def step_progress(bar, max_steps: int) -> Callable[[dict], None]:
    """train_to_saturation's on_progress for a step bar: moved every 10 steps, loss and bits shown."""
    last = [0]

    def on_progress(p: dict) -> None:
        if p["step"] % 10 == 0 or p["step"] == max_steps:
            bar.update(p["step"] - last[0])
            last[0] = p["step"]
            bar.set_postfix(loss=f"{p['loss']:.3f}", bits=f"{p['bits']:.0f}")

    return on_progress


def _train_one(run, exp, device, out_dir, attention_backend, logprob_backend, progress) -> dict:
    data = uniform_random_sequences(run.n, run.model.vocab_size, run.model.seq_len, seed=exp.seed)
    train_cfg = replace(exp.train, precision=run.precision, seed=exp.seed)
    bar = progress_bar(total=train_cfg.max_steps, desc=f"  N={run.n}", leave=False, disable=not progress)
    on_progress = step_progress(bar, train_cfg.max_steps)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    _, outcome = train_to_saturation(
        run.model,
        data,
        train_cfg,
        device,
        checkpoint_path=out_dir / "checkpoints" / f"{run.run_id}.pt",
        attention_backend=attention_backend,
        logprob_backend=logprob_backend,
        on_progress=on_progress,
    )
    bar.close()
    dataset_bits = run.n * uniform_sequence_entropy_bits(run.model.vocab_size, run.model.seq_len)
    return {
        "run_id": run.run_id,
        "model": run.model.to_dict(),
        "model_name": run.model.name,
        "parameters": count_parameters(run.model),
        "n_sequences": run.n,
        "precision": run.precision,
        "seed": exp.seed,
        "dataset_bits": dataset_bits,
        "memorized_bits": outcome.memorized_bits,
        "memorized_bits_final": outcome.memorized_bits_final,
        "fraction_memorized": outcome.memorized_bits / dataset_bits,
        "model_bits_per_sequence": outcome.model_bits_per_sequence,
        "steps": outcome.steps,
        "stop_reason": outcome.stop_reason,
        "final_loss": outcome.final_loss,
        "train_seconds": outcome.train_seconds,
        "bits_curve": outcome.curve,
        "train_config": train_cfg.to_dict(),
        "device": str(device),
        "attention_backend": attention_backend,
        "logprob_backend": logprob_backend,
        "torch": torch.__version__,
        "finished_at": started,
    }


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


def summarize(rows: list[dict]) -> dict:
    """Capacity per (precision, model) and the α fits, one per precision."""
    out: dict = {"paper_alpha": PAPER_ALPHA, "precisions": {}}
    for precision in sorted({r["precision"] for r in rows}):
        models = []
        for name in dict.fromkeys(r["model_name"] for r in rows if r["precision"] == precision):
            runs = sorted(
                (r for r in rows if r["precision"] == precision and r["model_name"] == name),
                key=lambda r: r["n_sequences"],
            )
            best = max(runs, key=lambda r: r["memorized_bits"])
            parameters = runs[0]["parameters"]
            models.append(
                {
                    "model_name": name,
                    "model": runs[0]["model"],
                    "parameters": parameters,
                    "capacity_bits": best["memorized_bits"],
                    "bits_per_parameter": best["memorized_bits"] / parameters,
                    "capacity_at_n_sequences": best["n_sequences"],
                    # The plateau is seen when some dataset held clearly more bits than the model stored.
                    "plateau_seen": runs[-1]["dataset_bits"] >= 1.5 * best["memorized_bits"],
                    "points": [
                        {
                            k: r[k]
                            for k in ("n_sequences", "dataset_bits", "memorized_bits", "fraction_memorized", "steps", "stop_reason")
                        }
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
        lines.append(f"  {'model':<24}{'params':>9}{'capacity bits':>15}{'bits/param':>12}  plateau  at N")
        for m in block["models"]:
            lines.append(
                f"  {m['model_name']:<24}{m['parameters']:>9}{m['capacity_bits']:>15.0f}{m['bits_per_parameter']:>12.3f}"
                f"  {'yes' if m['plateau_seen'] else 'NO ':<7}  {m['capacity_at_n_sequences']}"
            )
        fit = block["fit"]
        o = fit["through_origin"]
        lines.append(f"  α through origin: {_alpha_text(o)}")
        if fit["with_intercept"] is not None:
            w = fit["with_intercept"]
            lines.append(f"  α with intercept: {_alpha_text(w)}, intercept {w['intercept']:.0f} bits")
        lines.append(f"  (paper: {PAPER_ALPHA} bits/param; {int(fit['confidence'] * 100)}% intervals)")
    return "\n".join(lines)


def _alpha_text(f: dict) -> str:
    ci = f"[{f['ci'][0]:.3f}, {f['ci'][1]:.3f}]" if f.get("ci") else "[interval needs more models]"
    r2 = f"{f['r2']:.3f}" if f.get("r2") is not None else "n/a"
    return f"{f['alpha']:.3f} bits/param {ci}, R² {r2}"


def parse_models(spec: str, vocab_size: int, seq_len: int) -> tuple[GPTConfig, ...]:
    """'1x32,2x64x4' -> GPTConfigs: LAYERSxD_MODEL[xHEADS]; heads default to d_model // 32 (at least 1)."""
    models = []
    for item in spec.split(","):
        parts = item.strip().lower().split("x")
        try:
            numbers = [int(p) for p in parts]
        except ValueError:
            numbers = []
        if len(numbers) not in (2, 3):
            raise ConfigError(f"cannot read model {item.strip()!r}: write LAYERSxD_MODEL or LAYERSxD_MODELxHEADS, e.g. 2x64x2")
        n_layer, d_model = numbers[:2]
        n_head = numbers[2] if len(numbers) == 3 else max(1, d_model // 32)
        try:
            models.append(_model(n_layer, d_model, n_head, vocab_size, seq_len))
        except ValueError as e:
            raise ConfigError(f"model {item.strip()!r}: {e}") from e
    return tuple(models)


def parse_numbers(spec: str, kind: type, what: str) -> tuple:
    try:
        return tuple(kind(s) for s in spec.split(",") if s.strip())
    except ValueError as e:
        raise ConfigError(f"cannot read {what} {spec!r}: give comma-separated numbers, e.g. 10,20,40") from e


def experiment_from_options(
    preset_name: str,
    models: str | None = None,
    vocab_size: int | None = None,
    seq_len: int | None = None,
    sizes: str | None = None,
    size_factors: str | None = None,
    precision: str | None = None,
    device: str | None = None,
    max_steps: int | None = None,
    cooldown_steps: int | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    seed: int | None = None,
    attention_backend: str | None = None,
    logprob_backend: str | None = None,
) -> CapacityExperiment:
    """A preset with the command line's overrides applied; every problem is a ConfigError."""
    exp = preset(preset_name)
    base = exp.models[0]
    vocab = vocab_size if vocab_size is not None else base.vocab_size
    length = seq_len if seq_len is not None else base.seq_len
    changes: dict = {}
    if models is not None:
        changes["models"] = parse_models(models, vocab, length)
    elif vocab_size is not None or seq_len is not None:
        try:
            changes["models"] = tuple(replace(m, vocab_size=vocab, seq_len=length) for m in exp.models)
        except ValueError as e:
            raise ConfigError(str(e)) from e
    if sizes is not None:
        changes["dataset_sizes"] = parse_numbers(sizes, int, "dataset sizes")
    if size_factors is not None:
        changes["size_factors"] = parse_numbers(size_factors, float, "size factors")
    if precision is not None:
        changes["precisions"] = PRECISIONS if precision == "both" else (precision,)
    if device is not None:
        changes["device"] = device
    if seed is not None:
        changes["seed"] = seed
    if attention_backend is not None:
        changes["attention_backend"] = attention_backend
    if logprob_backend is not None:
        changes["logprob_backend"] = logprob_backend
    try:
        train = exp.train
        if max_steps is not None:
            train = train.with_step_cap(max_steps, cooldown_steps)  # the preset's proportions unless told otherwise
        elif cooldown_steps is not None:
            train = replace(train, cooldown_steps=cooldown_steps)
        train = replace(train, **{k: v for k, v in (("lr", lr), ("batch_size", batch_size)) if v is not None})
    except ValueError as e:
        raise ConfigError(str(e)) from e
    changes["train"] = train
    exp = replace(exp, **changes)
    validate(exp)
    return exp
