"""Memorization against generalization: reference models, unintended memorization,
double descent and membership inference (PAPER.md; Morris et al. 2025, sections 4-6).

One experiment, on one data source:
- text (a UTF-8 file, a Hugging Face dataset, or the built-in corpus), tokenized with a
  byte-level BPE trained on it, cut into S-token sequences, deduplicated, with a fixed
  held-out split; or a sparse random Markov chain whose H(x | θ) is exact
  (memorize/sources.py).
- The reference θ (memorize/experiments/reference.py): a model (by default the largest of the run)
  trained on the whole training pool, a superset of every dataset the sweep trains on.
  For the Markov source the exact generator is θ, and the reference model's estimate is
  reported beside it: the check that the estimate used for text is right.
- The sweep: each model on nested prefixes of the training pool whose sizes are given as
  multiples of the model's capacity, both in bits. Capacity = α · parameters, α from the
  capacity pipeline's fit. A dataset's bits = n · H(x | θ) per sequence: exact for the
  Markov source, the reference model's mean code length on held-out text otherwise.
- Per run: train and held-out loss (bits per coded token), total memorization
  mem(X, θ̂) = Σ [H(x) - H(x | θ̂)] with H(x) = (S-1)·log2 V (the uniform code), unintended
  memorization Σ max(0, H(x | θ) - H(x | θ̂)), generalization = total - unintended, and a
  loss-threshold membership inference attack (F1, ROC AUC) on training against held-out
  sequences.
- F1 is fitted as a sigmoid of capacity / dataset size (memorize/membership.py). The law
  predicts F1 for the check runs (models and sizes outside the fit); the prediction is
  written to prediction.json before those runs train, then compared with what they give
  (memorize/experiments/generalization_summary.py).

The runs go through the sweep layer (memorize/runs/sweep.py): planned as Runs, trained by an
executor, their rows kept by the run store. The output folder holds: experiment.json, the corpus (tokenizer.json, corpus.npz,
corpus.json) or nothing for the Markov source, reference/ (model and its code lengths),
runs.jsonl (a row per finished run, rewritten atomically as each finishes),
prediction.json, summary.json, and three PNG plots (four for the Markov source).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from ..bits import model_sequence_bits, uniform_sequence_entropy_bits, unintended_memorization
from ..constants import PAPER_ALPHA
from ..errors import ConfigError
from .generalization_summary import fit_law, summarize
from ..membership import f1_law, loss_threshold_attack
from ..model import GPT, GPTConfig, count_parameters
from .options import (
    check_experiment, choose_sizes, override_training, parse_models, parse_numbers, pick_preset, reshape_models,
)
from ..outputs import content_digest
from .reference import Reference, reference_id, train_reference
from ..runtime import Backends, check_fits, resolve_backends, training_memory_bytes, use_cpu_threads
from ..schedule import RunOutcome, TrainConfig
from ..sources import SourceData, SourceSpec, check_source, load_source, read_documents
from ..runs.store import RunStore
from ..runs.sweep import Executor, LocalExecutor, Run, SweepProgress, require_rows
from ..train import StopSignal, uniform_code_signal

# α of the default capacity run (docs/default-run/summary.json: float32, 2-core CPU, 2026-11-25),
# used for capacity = α · parameters unless --alpha or --capacity-summary says otherwise.
DEFAULT_ALPHA = 2.33


@dataclass(frozen=True)
class GeneralizationExperiment:
    source: SourceSpec
    models: tuple[GPTConfig, ...]  # the sweep; the F1 law is fitted on these runs
    train: TrainConfig
    # Dataset sizes as multiples of each model's capacity, both in bits ...
    size_factors: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0)
    # ... or explicit numbers of sequences, the same for every model (overrides size_factors).
    dataset_sizes: tuple[int, ...] | None = None
    check_models: tuple[GPTConfig, ...] = ()  # runs outside the fit whose F1 the law predicts
    check_size_factors: tuple[float, ...] = (1.0,)
    reference_model: GPTConfig | None = None  # None: the largest model of the run
    reference_train: TrainConfig | None = None  # None: the same as the sweep
    n_heldout: int = 256  # sequences held out, never trained on
    n_attack: int = 256  # at most this many members and as many non-members per attack
    alpha: float = DEFAULT_ALPHA
    alpha_source: str = "default capacity run (docs/default-run/summary.json)"
    precision: str = "float32"
    device: str = "auto"
    seed: int = 0
    attention_backend: str = "auto"
    logprob_backend: str = "auto"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["models"] = [m.to_dict() for m in self.models]
        d["check_models"] = [m.to_dict() for m in self.check_models]
        d["reference_model"] = self.reference_model_config().to_dict()
        d["reference_train"] = self.reference_train_config().to_dict()
        return d

    def reference_model_config(self) -> GPTConfig:
        if self.reference_model is not None:
            return self.reference_model
        return max(self.models + self.check_models, key=count_parameters)

    def reference_train_config(self) -> TrainConfig:
        return replace(self.reference_train or self.train, precision=self.precision, seed=self.seed)

    def train_config(self) -> TrainConfig:
        return replace(self.train, precision=self.precision, seed=self.seed)


def _shape(n_layer: int, d_model: int, n_head: int, source: SourceSpec) -> GPTConfig:
    return GPTConfig(n_layer=n_layer, d_model=d_model, n_head=n_head, vocab_size=source.vocab_size, seq_len=source.seq_len)


def _default() -> GeneralizationExperiment:
    # Built-in text (2,010 sequences), V=2048 BPE, S=64: two one-layer models (18K and 27K
    # parameters, mostly embedding) on datasets from 1/4 to 8x their capacity, a third model
    # as the check, and a larger reference; about a quarter of an hour on a 2-core CPU.
    src = SourceSpec()
    return GeneralizationExperiment(
        source=src,
        models=(_shape(1, 8, 1, src), _shape(1, 12, 2, src)),
        size_factors=(0.25, 0.5, 1.0, 2.0, 4.0, 8.0),
        check_models=(_shape(1, 16, 2, src),),
        check_size_factors=(2.0, 5.0),
        reference_model=_shape(1, 32, 2, src),
        train=TrainConfig(
            lr=1e-2, warmup_steps=50, batch_size=64, max_steps=1000, cooldown_steps=250, min_steps=300, eval_every=50
        ),
        reference_train=TrainConfig(
            lr=1e-2, warmup_steps=50, batch_size=64, max_steps=2000, cooldown_steps=500, min_steps=300, eval_every=100
        ),
    )


def _markov() -> GeneralizationExperiment:
    # The default's design on a Markov chain of 256 states, 8 successors each, whose H(x | θ)
    # is exact: the reference model's estimate is checked against it.
    src = SourceSpec(kind="markov", vocab_size=256, markov_branching=8, markov_sequences=4096)
    base = _default()
    return replace(
        base,
        source=src,
        models=(_shape(1, 8, 1, src), _shape(1, 16, 2, src)),
        check_models=(_shape(1, 24, 2, src),),
        reference_model=_shape(1, 32, 2, src),
    )


def _gpu() -> GeneralizationExperiment:
    # Paper-scale for one GPU: 1-4 layers, d 64-256, V=2048, S=64, bfloat16, batch 512.
    # Give it a large corpus (--text or --hf-dataset): the built-in one is too small.
    src = SourceSpec(markov_sequences=200_000)
    return GeneralizationExperiment(
        source=src,
        models=tuple(_shape(L, d, max(1, d // 32), src) for L, d in ((1, 64), (2, 128), (4, 128), (4, 256))),
        check_models=(_shape(2, 256, 8, src),),
        check_size_factors=(0.5, 1.0, 2.0),
        size_factors=(0.125, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 4.0, 8.0),
        train=TrainConfig(
            lr=1e-3, warmup_steps=500, batch_size=512, max_steps=100_000, cooldown_steps=5000, min_steps=5000,
            eval_every=1000, plateau_window=5, plateau_rel_tol=0.002,
        ),
        n_heldout=4096,
        n_attack=2048,
        alpha=PAPER_ALPHA,
        alpha_source=f"the paper's {PAPER_ALPHA} bits/param (bfloat16); use --capacity-summary for a measured one",
        precision="bfloat16",
    )


def _smoke() -> GeneralizationExperiment:
    # Seconds-long, for tests: a small BPE, two tiny models, three sizes each.
    src = SourceSpec(vocab_size=300, seq_len=16, markov_sequences=3000)
    fast = TrainConfig(lr=1e-2, warmup_steps=5, batch_size=32, max_steps=40, cooldown_steps=10, min_steps=10, eval_every=10)
    return GeneralizationExperiment(
        source=src,
        models=(_shape(1, 8, 1, src), _shape(1, 16, 2, src)),
        check_models=(_shape(2, 8, 1, src),),
        size_factors=(0.25, 1.0, 4.0),
        train=fast,
        n_heldout=64,
        n_attack=64,
    )


PRESETS: dict[str, Callable[[], GeneralizationExperiment]] = {
    "default": _default,
    "markov": _markov,
    "gpu": _gpu,
    "smoke": _smoke,
}


def preset(name: str) -> GeneralizationExperiment:
    return pick_preset(PRESETS, name)


def validate(exp: GeneralizationExperiment) -> torch.device:
    """Check everything that can be checked before any data is read; return the device."""
    src = exp.source
    check_source(src, exp.n_heldout)
    for m in exp.models + exp.check_models + (exp.reference_model_config(),):
        if (m.vocab_size, m.seq_len) != (src.vocab_size, src.seq_len):
            raise ConfigError(f"model {m.name} does not match the data (V={src.vocab_size}, S={src.seq_len})")
    if exp.n_attack < 1:
        raise ConfigError(f"the attack needs at least 1 member and 1 non-member, got {exp.n_attack}")
    if not (exp.alpha > 0 and math.isfinite(exp.alpha)):
        raise ConfigError(f"alpha (bits per parameter) must be a positive finite number, got {exp.alpha}")
    twice = sorted({m.name for m in exp.check_models if exp.check_models.count(m) > 1})
    if twice:
        raise ConfigError(f"check model {', '.join(twice)} is named twice; give each model once")
    return check_experiment(
        models=exp.models, precisions=(exp.precision,), dataset_sizes=exp.dataset_sizes,
        size_factors={"size factors": exp.size_factors, "check size factors": exp.check_size_factors},
        seed=exp.seed, device=exp.device, attention_backend=exp.attention_backend, logprob_backend=exp.logprob_backend,
    )


def alpha_from_capacity_summary(path: Path, precision: str) -> float:
    """α through the origin from a `memk run-capacity` summary.json, for this precision."""
    try:
        summary = json.loads(Path(path).read_text())
        return float(summary["precisions"][precision]["fit"]["through_origin"]["alpha"])
    except OSError as e:
        raise ConfigError(f"cannot read capacity summary {str(path)!r} ({e.strerror}); give run-capacity's summary.json") from e
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(
            f"{str(path)!r} holds no {precision} α fit; give the summary.json of a run-capacity run in {precision}"
        ) from e


# ---------------------------------------------------------------------------------------
# Planning: which model on how many sequences


def capacity_bits(model: GPTConfig, alpha: float) -> float:
    return alpha * count_parameters(model)


def source_bits_per_sequence(data: SourceData, reference: Reference) -> float:
    """H(x | θ) of one sequence: exact for the Markov chain, the reference's held-out mean for text."""
    if data.exact is not None:
        return data.exact.sequence_entropy_bits(int(data.train_pool.shape[1]))
    return float(reference.heldout_bits.mean())


def plan(
    exp: GeneralizationExperiment, bits_per_sequence: float, pool_size: int, ref_id: str,
    backends: Backends = Backends("sdpa", "reference"),
) -> list[Run]:
    """The sweep's runs, then the check runs; ConfigError where the pool cannot hold a size."""
    train = exp.train_config()
    runs = []
    for role, models, factors in (
        ("sweep", exp.models, exp.size_factors),
        ("check", exp.check_models, exp.check_size_factors),
    ):
        for m in models:
            if exp.dataset_sizes is not None:
                sizes = [(n, None) for n in sorted(set(exp.dataset_sizes))]
            else:
                cap = capacity_bits(m, exp.alpha)
                sizes = sorted({max(1, round(f * cap / bits_per_sequence)): f for f in factors}.items())
            for n, f in sizes:
                if n > pool_size:
                    most = pool_size * bits_per_sequence / capacity_bits(m, exp.alpha)
                    bigger = "raise --markov-sequences" if exp.source.kind == "markov" else "give a larger --text or --hf-dataset"
                    raise ConfigError(
                        f"the corpus is too small for the sizes asked: {m.name} at "
                        f"{'size factor ' + format(f, 'g') if f is not None else 'size'} needs {n} training sequences, "
                        f"but the training pool holds {pool_size}; {bigger}, or keep "
                        f"size factors <= {most:.2f} for this model (--sizes / --size-factors)"
                    )
                runs.append(Run(f"{role}-{m.name}-N{n}", m, n, train, backends, role=role, size_factor=f,
                                context=(ref_id, exp.n_attack)))
    return runs


# ---------------------------------------------------------------------------------------
# Training and measuring one run


@dataclass
class SourceWorkload:
    """Runs on prefixes of the training pool, measured against the reference θ (and the exact
    generator where there is one) and attacked with held-out sequences."""

    exp: GeneralizationExperiment
    data: SourceData
    reference: Reference
    bits_per_sequence: float  # H(x | θ) per sequence, for dataset sizes in bits

    def training_data(self, run: Run) -> torch.Tensor:
        return self.data.train_pool[: run.n_sequences]

    def stop_signal(self, run: Run, data: torch.Tensor) -> StopSignal:
        # The uniform code, as for random data: total memorization, clipped per sequence.
        return uniform_code_signal(data, run.train.precision)

    def result(self, run: Run, model: GPT, outcome: RunOutcome, data: torch.Tensor) -> dict:
        return {
            "run_id": run.run_id,
            "role": run.role,
            "model": run.model.to_dict(),
            "model_name": run.model.name,
            "parameters": count_parameters(run.model),
            "n_sequences": run.n_sequences,
            "size_factor": run.size_factor,
            **measure(model, data, self.data, self.reference, self.bits_per_sequence, self.exp, run.train.precision),
            "steps": outcome.steps,
            "stop_reason": outcome.stop_reason,
            "train_seconds": outcome.train_seconds,
            "train_config": run.train.to_dict(),
        }


def measure(model: GPT, x: torch.Tensor, data: SourceData, reference: Reference, bits_per_sequence: float,
            exp: GeneralizationExperiment, precision: str) -> dict:
    """Everything one trained model tells: losses, the split of its memorization, the attack."""
    n, seq_len = x.shape
    coded = seq_len - 1
    vocab = model.config.vocab_size
    train_bits = model_sequence_bits(model, x, precision)
    heldout_bits = model_sequence_bits(model, data.heldout, precision)
    total = float((uniform_sequence_entropy_bits(vocab, seq_len) - train_bits).sum())
    reference_bits = reference.pool_bits[:n]
    unintended_ref = float(unintended_memorization(train_bits, reference_bits).sum())
    cap = capacity_bits(model.config, exp.alpha)
    out = {
        "capacity_bits": cap,
        "dataset_bits": n * bits_per_sequence,
        "dataset_over_capacity": n * bits_per_sequence / cap,
        "capacity_over_dataset": cap / (n * bits_per_sequence),
        "train_bits_per_token": float(train_bits.mean() / coded),
        "heldout_bits_per_token": float(heldout_bits.mean() / coded),
        "total_memorization_bits": total,
        "unintended_reference_bits": unintended_ref,
    }
    if data.exact is not None:  # θ known exactly: it defines mem_U, the reference model estimates it
        exact_bits = data.exact.sequence_bits(x)
        unintended = float(unintended_memorization(train_bits, exact_bits).sum())
        out["unintended_exact_bits"] = unintended
    else:
        unintended = unintended_ref
    out["unintended_bits"] = unintended
    out["generalization_bits"] = total - unintended
    k = min(n, exp.n_attack, len(data.heldout))
    # Members: the first k training sequences (the pool is shuffled); non-members: k held-out.
    attack = loss_threshold_attack(train_bits[:k], heldout_bits[:k])
    out["attack"] = attack
    out["f1"] = attack["f1"]
    out["auc"] = attack["auc"]
    return out


# ---------------------------------------------------------------------------------------
# The F1 law's prediction, made before the check runs train


def predict_checks(sweep_rows: list[dict], planned: list[Run], exp, bits_per_sequence: float) -> dict:
    """F1 the law fitted on the sweep predicts for every check run, written before they train."""
    law = fit_law(sweep_rows)
    predictions = []
    for run in planned:
        if run.role != "check":
            continue
        ratio = capacity_bits(run.model, exp.alpha) / (run.n_sequences * bits_per_sequence)
        predictions.append(
            {
                "run_id": run.run_id,
                "model_name": run.model.name,
                "n_sequences": run.n_sequences,
                "capacity_over_dataset": ratio,
                "predicted_f1": None if law is None else float(f1_law(ratio, law["c1"], law["c2"], law["c3"])),
            }
        )
    return {"law": law, "predictions": predictions, "made_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


# ---------------------------------------------------------------------------------------
# Running


def run_generalization(
    exp: GeneralizationExperiment, out_dir: Path, progress: bool = True, executor: Executor | None = None
) -> dict:
    """Run (or resume) the reference, the sweep, the prediction and the check runs; summarise."""
    device = validate(exp)
    backends = resolve_backends(device, exp.attention_backend, exp.logprob_backend)
    if exp.source.kind == "markov":  # the chain is sampled, deduplicated and split on the CPU: ~4 copies at once
        check_fits(4 * exp.source.markov_sequences * exp.source.seq_len * 8, torch.device("cpu"),
                   f"drawing {exp.source.markov_sequences:,} Markov sequences", "lower --markov-sequences")
    documents = read_documents(exp.source)  # a missing --text or an unloadable dataset: refused before --out is made
    with RunStore(out_dir, "generalization") as store:
        store.write_experiment(exp.to_dict())
        data = load_source(exp.source, exp.n_heldout, exp.seed, store.folder, documents)
        del documents  # the corpus is tokenized: the text itself is not needed again
        # Fail before training the reference where the pool cannot hold the sizes even at the
        # most bits a sequence can carry.
        plan(exp, data.most_bits_per_sequence(), len(data.train_pool), ref_id="")
        ref_config, ref_train = exp.reference_model_config(), exp.reference_train_config()
        ref_checkpoint = store.checkpoint_path(f"reference-{reference_id(ref_config, ref_train, data)}")
        use_cpu_threads(device, ref_config, ref_train.batch_size)
        reference = train_reference(ref_config, ref_train, data, store.folder, ref_checkpoint, device, backends, progress)
        store.keep()  # the trained reference is work a rerun reuses, whatever fails next
        bits_per_sequence = source_bits_per_sequence(data, reference)
        runs = plan(exp, bits_per_sequence, len(data.train_pool), reference.reference_id, backends)
        for run in runs:  # datasets are views of the pool, already in memory
            check_fits(training_memory_bytes(run.model, run.n_sequences, run.train.batch_size, dataset_copies=0), device,
                       f"{run.model.name} at batch {run.train.batch_size}", "use a smaller --batch-size")
        workload = SourceWorkload(exp, data, reference, bits_per_sequence)
        executor = executor or LocalExecutor(device)

        sweep = [r for r in runs if r.role == "sweep"]
        checks = [r for r in runs if r.role == "check"]
        todo = store.todo(runs)
        bar = SweepProgress(total=len(runs), done=len(runs) - len(todo), desc="runs", enabled=progress)
        try:
            executor.execute(store.todo(sweep), workload, store, bar)  # the sweep first: the law predicts the checks
            prediction = _prediction(store, runs, exp, bits_per_sequence) if checks else None
            executor.execute(store.todo(checks), workload, store, bar)
        finally:
            bar.close()

        rows, failures = store.rows_of(runs), store.failures_of(runs)
        require_rows(rows, failures)
        summary = summarize(rows, prediction)
        summary["failed_runs"] = failures  # an executor that goes on past failures lists them
        summary["source"] = data.description
        summary["reference"] = reference.description
        summary["source_bits_per_sequence"] = bits_per_sequence
        summary["alpha"] = {"value": exp.alpha, "source": exp.alpha_source}
        summary["experiment"] = exp.to_dict()
        store.write_json("summary.json", summary)
        from .plots import plot_generalization  # matplotlib only when needed

        plot_generalization(summary, store.folder)
    return summary


def _prediction(store: RunStore, runs: list[Run], exp, bits_per_sequence: float) -> dict:
    """The stored prediction for this plan, or a new one from the sweep's rows, written at once."""
    plan_id = content_digest(sorted(r.run_id for r in runs))
    prediction = store.read_json("prediction.json", then="and the prediction is made again from the sweep")
    if prediction is None or prediction["plan_id"] != plan_id:  # none yet, or made for another plan
        sweep_rows = store.rows_of(r for r in runs if r.role == "sweep")
        prediction = {"plan_id": plan_id, **predict_checks(sweep_rows, runs, exp, bits_per_sequence)}
        store.write_json("prediction.json", prediction)
    return prediction


# ---------------------------------------------------------------------------------------
# The command line's options


def experiment_from_options(
    preset_name: str,
    source: str | None = None,
    text: str | None = None,
    hf_dataset: str | None = None,
    hf_split: str | None = None,
    hf_column: str | None = None,
    vocab_size: int | None = None,
    seq_len: int | None = None,
    markov_branching: int | None = None,
    markov_sequences: int | None = None,
    models: str | None = None,
    check_models: str | None = None,
    reference_model: str | None = None,
    sizes: str | None = None,
    size_factors: str | None = None,
    check_size_factors: str | None = None,
    heldout: int | None = None,
    alpha: float | None = None,
    capacity_summary: str | None = None,
    precision: str | None = None,
    device: str | None = None,
    max_steps: int | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    seed: int | None = None,
    attention_backend: str | None = None,
    logprob_backend: str | None = None,
) -> GeneralizationExperiment:
    """A preset with the command line's overrides applied; every problem is a ConfigError."""
    exp = preset(preset_name)
    src_changes: dict = {}
    if source is not None:
        src_changes["kind"] = source
        if source == "markov" and exp.source.kind != "markov":  # the chain of the markov preset
            chain = PRESETS["markov"]().source
            src_changes.update(vocab_size=chain.vocab_size, markov_branching=chain.markov_branching)
    if text is not None or hf_dataset is not None:
        src_changes.setdefault("kind", "text")
    for key, value in (("text_path", text), ("hf_dataset", hf_dataset), ("hf_split", hf_split), ("hf_column", hf_column),
                       ("vocab_size", vocab_size), ("seq_len", seq_len), ("markov_branching", markov_branching),
                       ("markov_sequences", markov_sequences)):
        if value is not None:
            src_changes[key] = value
    src = replace(exp.source, **src_changes)
    changes: dict = {"source": src}

    def shapes(spec: str | None, current: tuple[GPTConfig, ...]) -> tuple[GPTConfig, ...]:
        if spec is not None:
            return parse_models(spec, src.vocab_size, src.seq_len) if spec.strip() else ()
        return reshape_models(current, src.vocab_size, src.seq_len)

    changes["models"] = shapes(models, exp.models)
    changes["check_models"] = shapes(check_models, exp.check_models)
    if reference_model is not None:
        parsed = parse_models(reference_model, src.vocab_size, src.seq_len)
        if len(parsed) != 1:
            raise ConfigError(f"--reference-model takes one model, got {reference_model!r}")
        changes["reference_model"] = parsed[0]
    elif exp.reference_model is not None:
        changes["reference_model"] = shapes(None, (exp.reference_model,))[0]
    changes.update(choose_sizes(sizes, size_factors))
    if check_size_factors is not None:
        changes["check_size_factors"] = parse_numbers(check_size_factors, float, "check size factors")
    if heldout is not None:
        changes["n_heldout"] = heldout
        changes["n_attack"] = min(exp.n_attack, heldout)
    if precision is not None:
        changes["precision"] = precision
    if alpha is not None and capacity_summary is not None:
        raise ConfigError("give either --alpha or --capacity-summary, not both")
    if alpha is not None:
        changes.update(alpha=alpha, alpha_source="--alpha")
    if capacity_summary is not None:
        changes.update(
            alpha=alpha_from_capacity_summary(Path(capacity_summary), precision or exp.precision),
            alpha_source=f"fit in {capacity_summary}",
        )
    for key, value in (("device", device), ("seed", seed), ("attention_backend", attention_backend),
                       ("logprob_backend", logprob_backend)):
        if value is not None:
            changes[key] = value
    changes["train"] = override_training(exp.train, max_steps, None, lr, batch_size)
    if exp.reference_train is not None and max_steps is not None:
        changes["reference_train"] = override_training(exp.reference_train, max_steps)
    exp = replace(exp, **changes)
    validate(exp)
    return exp
