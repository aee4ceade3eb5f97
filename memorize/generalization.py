"""Memorization against generalization: reference models, unintended memorization,
double descent and membership inference (PAPER.md; Morris et al. 2025, sections 4-6).

One experiment, on one data source:
- text (a UTF-8 file, a Hugging Face dataset, or the built-in corpus), tokenized with a
  byte-level BPE trained on it, cut into S-token sequences, deduplicated, with a fixed
  held-out split (memorize/corpus.py); or a sparse random Markov chain whose H(x | θ)
  is exact (memorize/markov.py).
- The reference θ: a model (by default the largest of the run) trained on the whole
  training pool, a superset of every dataset the sweep trains on. For the Markov source
  the exact generator is θ, and the reference model's estimate is reported beside it:
  the check that the estimate used for text is right.
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
  written to prediction.json before those runs train, then compared with what they give.

The output folder holds: experiment.json, the corpus (tokenizer.json, corpus.npz,
corpus.json) or nothing for the Markov source, reference/ (model and its code lengths),
runs.jsonl (a row per finished run, rewritten atomically as each finishes),
prediction.json, summary.json, and four PNG plots.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import corpus as corpus_lib
from .bits import model_sequence_bits, uniform_sequence_entropy_bits, unintended_memorization
from .capacity import (
    check_backends,
    parse_models,
    parse_numbers,
    progress_bar,
    resolve_backends,
    resolve_device,
    step_progress,
)
from .errors import ConfigError
from .markov import MarkovSource
from .membership import f1_law, fit_f1_law, loss_threshold_attack
from .model import GPT, GPTConfig, count_parameters
from .outputs import atomic_write, atomic_write_npz, atomic_write_text, load_rows, output_dir, write_rows
from .train import PRECISIONS, TrainConfig, train_to_saturation

# α of the default capacity run (docs/default-run/summary.json: float32, 2-core CPU, 2026-11-25),
# used for capacity = α · parameters unless --alpha or --capacity-summary says otherwise.
DEFAULT_ALPHA = 2.33
SOURCES = ("text", "markov")


@dataclass(frozen=True)
class SourceSpec:
    """Where the sequences come from."""

    kind: str = "text"  # "text" or "markov"
    text_path: str | None = None  # a UTF-8 file; None (and no hf_dataset) = the built-in corpus
    hf_dataset: str | None = None  # a Hugging Face dataset name, or a folder saved with save_to_disk
    hf_split: str = "train"
    hf_column: str = "text"
    vocab_size: int = 2048  # the BPE vocabulary, or the Markov chain's states
    seq_len: int = 64
    markov_branching: int = 4  # non-zero successors per Markov state
    markov_sequences: int = 4096  # sequences drawn from the chain: training pool + held-out

    @property
    def name(self) -> str:
        if self.kind == "markov":
            return f"markov(V={self.vocab_size}, branching={self.markov_branching})"
        if self.hf_dataset is not None:
            return f"hf:{self.hf_dataset}[{self.hf_split}].{self.hf_column}"
        if self.text_path is not None:
            return f"text:{self.text_path}"
        return corpus_lib.BUILTIN_CORPUS


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
        alpha=3.6,
        alpha_source="the paper's 3.6 bits/param (bfloat16); use --capacity-summary for a measured one",
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
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]()


def validate(exp: GeneralizationExperiment) -> torch.device:
    """Check everything that can be checked before any data is read; return the device."""
    src = exp.source
    if src.kind not in SOURCES:
        raise ConfigError(f"unknown source {src.kind!r}; choose one of {', '.join(SOURCES)}")
    if src.text_path is not None and src.hf_dataset is not None:
        raise ConfigError("give either --text or --hf-dataset, not both")
    if src.seq_len < 2:
        raise ConfigError(f"seq_len must be >= 2 (the first token is context, the rest are coded), got {src.seq_len}")
    if not exp.models:
        raise ConfigError("no models to train: give at least one with --models")
    for m in exp.models + exp.check_models + (exp.reference_model_config(),):
        if (m.vocab_size, m.seq_len) != (src.vocab_size, src.seq_len):
            raise ConfigError(f"model {m.name} does not match the data (V={src.vocab_size}, S={src.seq_len})")
    if exp.precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {exp.precision!r}; choose from {', '.join(PRECISIONS)}")
    if exp.dataset_sizes is not None:
        if not exp.dataset_sizes or any(n < 1 for n in exp.dataset_sizes):
            raise ConfigError(f"dataset sizes must be >= 1 sequence, got {list(exp.dataset_sizes)}")
    else:
        for what, factors in (("size factors", exp.size_factors), ("check size factors", exp.check_size_factors)):
            if not factors or any(not f > 0 for f in factors):
                raise ConfigError(f"{what} must be positive numbers, got {list(factors)}")
    if exp.n_heldout < 2:
        raise ConfigError(f"the held-out split needs at least 2 sequences, got --heldout {exp.n_heldout}")
    if exp.n_attack < 1:
        raise ConfigError(f"the attack needs at least 1 member and 1 non-member, got {exp.n_attack}")
    if not exp.alpha > 0:
        raise ConfigError(f"alpha (bits per parameter) must be positive, got {exp.alpha}")
    if src.kind == "markov":
        if src.text_path is not None or src.hf_dataset is not None:
            raise ConfigError("--text and --hf-dataset are text sources; drop them or use --source text")
        if not 1 <= src.markov_branching <= src.vocab_size:
            raise ConfigError(f"Markov branching must lie in [1, V={src.vocab_size}], got {src.markov_branching}")
        if src.markov_sequences <= exp.n_heldout:
            raise ConfigError(
                f"the Markov pool ({src.markov_sequences} sequences) must exceed the held-out split ({exp.n_heldout})"
            )
    device = resolve_device(exp.device)
    check_backends(exp.attention_backend, exp.logprob_backend)
    return device


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
# Data: the training pool, the held-out split, and the exact generator where there is one


@dataclass
class SourceData:
    train_pool: torch.Tensor  # (n_train, S) int64; datasets are its prefixes
    heldout: torch.Tensor  # (n_heldout, S) int64; never trained on
    exact: MarkovSource | None  # the true generator, where known
    description: dict
    fingerprint: str  # changes whenever the sequences would


def load_source(exp: GeneralizationExperiment, out_dir: Path) -> SourceData:
    src = exp.source
    if src.kind == "markov":
        chain = MarkovSource(src.vocab_size, branching=src.markov_branching, seed=exp.seed)
        drawn = chain.sample(src.markov_sequences, src.seq_len, seed=exp.seed + 1).numpy()
        # Exact repeats are removed as for text, so no held-out sequence is also a training one.
        sequences, removed = corpus_lib.deduplicate(drawn)
        train_pool, heldout = corpus_lib.split_heldout(sequences, exp.n_heldout, exp.seed)
        description = {
            "source": src.name, **chain.describe(), "seq_len": src.seq_len, "n_sequences": len(drawn),
            "duplicates_removed": removed, "n_train": len(train_pool), "n_heldout": len(heldout),
        }
        fingerprint = _digest([description, exp.seed])
        return SourceData(torch.from_numpy(train_pool).long(), torch.from_numpy(heldout).long(), chain, description, fingerprint)
    if src.hf_dataset is not None:
        documents = corpus_lib.hf_dataset_documents(src.hf_dataset, split=src.hf_split, column=src.hf_column)
    elif src.text_path is not None:
        documents = corpus_lib.text_file_documents(src.text_path)
    else:
        documents = corpus_lib.builtin_documents()
    corpus = corpus_lib.prepare_corpus(
        documents, src.name, src.vocab_size, src.seq_len, exp.n_heldout, exp.seed, out_dir
    )
    if corpus.vocab_size != src.vocab_size:
        raise ConfigError(
            f"the corpus is too small for a {src.vocab_size}-token vocabulary: BPE found only {corpus.vocab_size} "
            f"tokens; pass --vocab-size {corpus.vocab_size} (or less), or give more text"
        )
    description = corpus.describe()
    fingerprint = _digest([description, hashlib.sha1(corpus.train_pool.tobytes()).hexdigest()])
    return SourceData(
        torch.from_numpy(corpus.train_pool).long(), torch.from_numpy(corpus.heldout).long(), None, description, fingerprint
    )


def _digest(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:8]


# ---------------------------------------------------------------------------------------
# The reference model θ


@dataclass
class Reference:
    config: GPTConfig
    pool_bits: np.ndarray  # H(x | θ) per training-pool sequence, float64
    heldout_bits: np.ndarray  # H(x | θ) per held-out sequence
    description: dict


def train_reference(exp, data: SourceData, out_dir: Path, device, backends, progress) -> Reference:
    """Train θ on the whole training pool (or load it), and code every sequence with it."""
    config, cfg = exp.reference_model_config(), exp.reference_train_config()
    ref_id = _digest([config.to_dict(), cfg.to_dict(), data.fingerprint])
    folder = out_dir / "reference"
    folder.mkdir(exist_ok=True)
    meta_path, weights_path, bits_path = folder / "reference.json", folder / "model.pt", folder / "bits.npz"
    if meta_path.exists() and json.loads(meta_path.read_text()).get("reference_id") == ref_id and bits_path.exists():
        bits = np.load(bits_path)
        return Reference(config, bits["pool"], bits["heldout"], json.loads(meta_path.read_text()))

    bar = progress_bar(total=cfg.max_steps, desc=f"reference {config.name}", leave=False, disable=not progress)
    model, outcome = train_to_saturation(
        config, data.train_pool, cfg, device,
        checkpoint_path=out_dir / "checkpoints" / f"reference-{ref_id}.pt",
        attention_backend=backends[0], logprob_backend=backends[1], on_progress=step_progress(bar, cfg.max_steps),
    )
    bar.close()
    pool_bits = model_sequence_bits(model, data.train_pool, cfg.precision)
    heldout_bits = model_sequence_bits(model, data.heldout, cfg.precision)
    atomic_write(weights_path, lambda tmp: torch.save(model.state_dict(), tmp))
    atomic_write_npz(bits_path, pool=pool_bits, heldout=heldout_bits)
    coded = config.seq_len - 1
    description = {
        "reference_id": ref_id,
        "model": config.to_dict(),
        "model_name": config.name,
        "parameters": count_parameters(config),
        "trained_on_sequences": len(data.train_pool),
        "steps": outcome.steps,
        "stop_reason": outcome.stop_reason,
        "train_seconds": outcome.train_seconds,
        "pool_bits_per_token": float(pool_bits.mean() / coded),
        "heldout_bits_per_token": float(heldout_bits.mean() / coded),
        "train_config": cfg.to_dict(),
    }
    if data.exact is not None:
        description["exact_bits_per_token"] = data.exact.entropy_rate_bits()
    atomic_write_text(meta_path, json.dumps(description, indent=2) + "\n")
    (out_dir / "checkpoints" / f"reference-{ref_id}.pt").unlink(missing_ok=True)
    return Reference(config, pool_bits, heldout_bits, description)


def load_reference_model(out_dir: Path, device="cpu") -> GPT:
    """The stored reference θ, for reuse (e.g. as the reference of another experiment)."""
    meta = json.loads((Path(out_dir) / "reference" / "reference.json").read_text())
    model = GPT(GPTConfig(**meta["model"]))
    model.load_state_dict(torch.load(Path(out_dir) / "reference" / "model.pt", map_location=device))
    return model.to(device)


# ---------------------------------------------------------------------------------------
# Planning: which model on how many sequences


@dataclass
class PlannedRun:
    run_id: str
    role: str  # "sweep" (fitted) or "check" (predicted, then run)
    model: GPTConfig
    n: int
    size_factor: float | None


def capacity_bits(model: GPTConfig, alpha: float) -> float:
    return alpha * count_parameters(model)


def source_bits_per_sequence(data: SourceData, reference: Reference) -> float:
    """H(x | θ) of one sequence: exact for the Markov chain, the reference's held-out mean for text."""
    if data.exact is not None:
        return data.exact.sequence_entropy_bits(int(data.train_pool.shape[1]))
    return float(reference.heldout_bits.mean())


def plan(exp: GeneralizationExperiment, bits_per_sequence: float, pool_size: int, ref_id: str) -> list[PlannedRun]:
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
                train = exp.train_config().to_dict()
                rid = _digest([m.to_dict(), n, train, ref_id, exp.n_attack])
                runs.append(PlannedRun(f"{role}-{m.name}-N{n}-{rid}", role, m, n, f))
    return runs


# ---------------------------------------------------------------------------------------
# Running


def run_generalization(
    exp: GeneralizationExperiment,
    out_dir: Path,
    progress: bool = True,
    on_run_done: Callable[[dict], None] | None = None,
) -> dict:
    """Run (or resume) the reference, the sweep, the prediction and the check runs; summarise."""
    device = validate(exp)
    with output_dir(out_dir) as out_dir:
        return _run_locked(exp, out_dir, device, progress, on_run_done)


def _run_locked(exp, out_dir, device, progress, on_run_done) -> dict:
    backends = resolve_backends(device, exp.attention_backend, exp.logprob_backend)
    atomic_write_text(out_dir / "experiment.json", json.dumps(exp.to_dict(), indent=2) + "\n")
    data = load_source(exp, out_dir)
    # Fail before training the reference where the pool cannot hold the sizes even at the
    # most bits a sequence can carry (exact for Markov; log2 V per token bounds text's entropy).
    seq_len = exp.source.seq_len
    most_bits = data.exact.sequence_entropy_bits(seq_len) if data.exact is not None else uniform_sequence_entropy_bits(
        exp.source.vocab_size, seq_len
    )
    plan(exp, most_bits, len(data.train_pool), ref_id="")
    reference = train_reference(exp, data, out_dir, device, backends, progress)
    bits_per_sequence = source_bits_per_sequence(data, reference)
    planned = plan(exp, bits_per_sequence, len(data.train_pool), reference.description["reference_id"])

    runs_path = out_dir / "runs.jsonl"
    rows = load_rows(runs_path)
    done = {r["run_id"] for r in rows}
    bar = progress_bar(total=len(planned), initial=sum(r.run_id in done for r in planned), desc="runs", disable=not progress)
    prediction_path = out_dir / "prediction.json"
    plan_id = _digest(sorted(r.run_id for r in planned))
    prediction = json.loads(prediction_path.read_text()) if prediction_path.exists() else None
    if prediction is not None and prediction["plan_id"] != plan_id:
        prediction = None  # made for another plan
    sweep_ids = {r.run_id for r in planned if r.role == "sweep"}
    for run in sorted(planned, key=lambda r: r.role != "sweep"):  # the sweep first: the law predicts the checks
        if run.role == "check" and prediction is None:
            sweep_rows = [r for r in rows if r["run_id"] in sweep_ids]
            prediction = {"plan_id": plan_id, **predict_checks(sweep_rows, planned, exp, bits_per_sequence)}
            atomic_write_text(prediction_path, json.dumps(prediction, indent=2) + "\n")
        if run.run_id in done:
            continue
        bar.set_postfix_str(f"{run.role} {run.model.name} N={run.n}")
        row = _train_one(run, exp, data, reference, bits_per_sequence, device, backends, out_dir, progress)
        rows.append(row)
        write_rows(runs_path, rows)
        (out_dir / "checkpoints" / f"{run.run_id}.pt").unlink(missing_ok=True)
        if on_run_done is not None:
            on_run_done(row)
        bar.update(1)
    bar.close()

    wanted = {r.run_id for r in planned}
    summary = summarize([r for r in rows if r["run_id"] in wanted], prediction)
    summary["source"] = data.description
    summary["reference"] = reference.description
    summary["source_bits_per_sequence"] = bits_per_sequence
    summary["alpha"] = {"value": exp.alpha, "source": exp.alpha_source}
    summary["experiment"] = exp.to_dict()
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    from .plots import plot_generalization  # matplotlib only when needed

    plot_generalization(summary, out_dir)
    return summary


def _train_one(run, exp, data, reference, bits_per_sequence, device, backends, out_dir, progress) -> dict:
    cfg = exp.train_config()
    x = data.train_pool[: run.n]
    bar = progress_bar(total=cfg.max_steps, desc=f"  {run.model.name} N={run.n}", leave=False, disable=not progress)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    model, outcome = train_to_saturation(
        run.model, x, cfg, device,
        checkpoint_path=out_dir / "checkpoints" / f"{run.run_id}.pt",
        attention_backend=backends[0], logprob_backend=backends[1], on_progress=step_progress(bar, cfg.max_steps),
    )
    bar.close()
    row = {
        "run_id": run.run_id,
        "role": run.role,
        "model": run.model.to_dict(),
        "model_name": run.model.name,
        "parameters": count_parameters(run.model),
        "n_sequences": run.n,
        "size_factor": run.size_factor,
        **measure(model, x, data, reference, bits_per_sequence, exp, cfg.precision),
        "steps": outcome.steps,
        "stop_reason": outcome.stop_reason,
        "train_seconds": outcome.train_seconds,
        "train_config": cfg.to_dict(),
        "device": str(device),
        "attention_backend": backends[0],
        "logprob_backend": backends[1],
        "torch": torch.__version__,
        "finished_at": started,
    }
    return row


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
# The F1 law and its prediction


def fit_law(sweep_rows: list[dict]) -> dict | None:
    """The F1 law fitted on the sweep; None where there are too few runs or the fit fails."""
    if len(sweep_rows) < 4:
        return None
    try:
        return fit_f1_law([r["capacity_over_dataset"] for r in sweep_rows], [r["f1"] for r in sweep_rows])
    except (ValueError, RuntimeError):
        return None


def predict_checks(sweep_rows: list[dict], planned: list[PlannedRun], exp, bits_per_sequence: float) -> dict:
    """F1 the law fitted on the sweep predicts for every check run, written before they train."""
    law = fit_law(sweep_rows)
    predictions = []
    for run in planned:
        if run.role != "check":
            continue
        ratio = capacity_bits(run.model, exp.alpha) / (run.n * bits_per_sequence)
        predictions.append(
            {
                "run_id": run.run_id,
                "model_name": run.model.name,
                "n_sequences": run.n,
                "capacity_over_dataset": ratio,
                "predicted_f1": None if law is None else float(f1_law(ratio, law["c1"], law["c2"], law["c3"])),
            }
        )
    return {"law": law, "predictions": predictions, "made_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


# ---------------------------------------------------------------------------------------
# Summary


def summarize(rows: list[dict], prediction: dict | None) -> dict:
    """Per model: the curves and the double-descent peak; the F1 law; the check; the Markov check."""
    sweep = [r for r in rows if r["role"] == "sweep"]
    models = []
    for name in dict.fromkeys(r["model_name"] for r in rows):
        runs = sorted((r for r in rows if r["model_name"] == name), key=lambda r: r["n_sequences"])
        peak = max(runs, key=lambda r: r["heldout_bits_per_token"])
        mem_peak = max(runs, key=lambda r: r["unintended_bits"])
        models.append(
            {
                "model_name": name,
                "role": runs[0]["role"],
                "parameters": runs[0]["parameters"],
                "capacity_bits": runs[0]["capacity_bits"],
                # The double-descent peak: the dataset size (over capacity) with the worst held-out loss.
                "heldout_peak_dataset_over_capacity": peak["dataset_over_capacity"],
                "heldout_peak_bits_per_token": peak["heldout_bits_per_token"],
                "heldout_peak_is_interior": peak is not runs[0] and peak is not runs[-1],
                "unintended_peak_dataset_over_capacity": mem_peak["dataset_over_capacity"],
                "unintended_peak_bits": mem_peak["unintended_bits"],
                "points": [_point(r) for r in runs],
            }
        )
    out: dict = {"models": models, "f1_law": fit_law(sweep)}
    if prediction is not None:
        measured = {r["run_id"]: r for r in rows}
        checks = []
        for p in prediction["predictions"]:
            r = measured.get(p["run_id"])
            checks.append({**p, "measured_f1": None if r is None else r["f1"],
                           "error": None if r is None or p["predicted_f1"] is None else r["f1"] - p["predicted_f1"]})
        out["prediction_check"] = {"law_used": prediction["law"], "made_at": prediction["made_at"], "checks": checks}
    if rows and "unintended_exact_bits" in rows[0]:
        exact = np.array([r["unintended_exact_bits"] for r in rows])
        estimate = np.array([r["unintended_reference_bits"] for r in rows])
        out["reference_check"] = {
            "total_unintended_exact_bits": float(exact.sum()),
            "total_unintended_reference_bits": float(estimate.sum()),
            "relative_error_of_total": float((estimate.sum() - exact.sum()) / exact.sum()) if exact.sum() else None,
            "median_relative_error_per_run": float(np.median(np.abs(estimate - exact) / np.maximum(exact, 1e-9))),
        }
    return out


def _point(r: dict) -> dict:
    keys = (
        "n_sequences", "size_factor", "dataset_bits", "dataset_over_capacity", "capacity_over_dataset",
        "train_bits_per_token", "heldout_bits_per_token", "total_memorization_bits", "unintended_bits",
        "unintended_reference_bits", "unintended_exact_bits", "generalization_bits", "f1", "auc", "steps", "stop_reason",
    )
    return {k: r[k] for k in keys if k in r}


def format_summary(summary: dict) -> str:
    """The text printed at the end of a run."""
    lines = [f"source: {summary['source']['source']}; H(x|θ) = {summary['source_bits_per_sequence']:.1f} bits/sequence"
             f"; α = {summary['alpha']['value']:g} bits/param ({summary['alpha']['source']})"]
    ref = summary["reference"]
    line = f"reference θ: {ref['model_name']} on {ref['trained_on_sequences']} sequences, held-out {ref['heldout_bits_per_token']:.3f} bits/token"
    if "exact_bits_per_token" in ref:
        line += f" (exact entropy rate {ref['exact_bits_per_token']:.3f})"
    lines.append(line)
    header = f"  {'N':>6}{'data/cap':>9}{'train b/t':>10}{'held b/t':>9}{'total mem':>11}{'unintended':>11}{'general.':>10}{'F1':>6}{'AUC':>6}"
    for m in summary["models"]:
        lines.append(f"{m['role']} {m['model_name']} ({m['parameters']:,} params, capacity {m['capacity_bits']:,.0f} bits)")
        lines.append(header)
        for p in m["points"]:
            lines.append(
                f"  {p['n_sequences']:>6}{p['dataset_over_capacity']:>9.2f}{p['train_bits_per_token']:>10.3f}"
                f"{p['heldout_bits_per_token']:>9.3f}{p['total_memorization_bits']:>11.0f}{p['unintended_bits']:>11.0f}"
                f"{p['generalization_bits']:>10.0f}{p['f1']:>6.2f}{p['auc']:>6.2f}"
            )
        lines.append(
            f"  held-out loss peaks at data/capacity {m['heldout_peak_dataset_over_capacity']:.2f}"
            f"{'' if m['heldout_peak_is_interior'] else ' (an end of the sweep: no interior peak)'}; "
            f"unintended memorization peaks at {m['unintended_peak_dataset_over_capacity']:.2f}"
        )
    law = summary.get("f1_law")
    if law is not None:
        lines.append(f"F1 law: {law['form']} with c1={law['c1']:.3f}, c2={law['c2']:.3f}, c3={law['c3']:.3f} (R² {law['r2']:.3f})")
    for c in summary.get("prediction_check", {}).get("checks", []):
        if c["predicted_f1"] is not None and c["measured_f1"] is not None:
            lines.append(
                f"check {c['model_name']} N={c['n_sequences']}: predicted F1 {c['predicted_f1']:.3f}, "
                f"measured {c['measured_f1']:.3f}"
            )
    rc = summary.get("reference_check")
    if rc is not None:
        lines.append(
            f"reference-model estimate of mem_U against the exact one: total {rc['total_unintended_reference_bits']:,.0f}"
            f" vs {rc['total_unintended_exact_bits']:,.0f} bits"
            + (f" ({100 * rc['relative_error_of_total']:+.1f}%)" if rc["relative_error_of_total"] is not None else "")
        )
    return "\n".join(lines)


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
        if source == "markov" and exp.source.kind != "markov":
            src_changes.update(vocab_size=PRESETS["markov"]().source.vocab_size, markov_branching=PRESETS["markov"]().source.markov_branching)
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
        try:
            return tuple(replace(m, vocab_size=src.vocab_size, seq_len=src.seq_len) for m in current)
        except ValueError as e:
            raise ConfigError(str(e)) from e

    changes["models"] = shapes(models, exp.models)
    changes["check_models"] = shapes(check_models, exp.check_models)
    if reference_model is not None:
        parsed = parse_models(reference_model, src.vocab_size, src.seq_len)
        if len(parsed) != 1:
            raise ConfigError(f"--reference-model takes one model, got {reference_model!r}")
        changes["reference_model"] = parsed[0]
    elif exp.reference_model is not None:
        changes["reference_model"] = shapes(None, (exp.reference_model,))[0]
    if sizes is not None:
        changes["dataset_sizes"] = parse_numbers(sizes, int, "dataset sizes")
    if size_factors is not None:
        changes["size_factors"] = parse_numbers(size_factors, float, "size factors")
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
    try:
        train = exp.train if max_steps is None else exp.train.with_step_cap(max_steps)
        changes["train"] = replace(train, **{k: v for k, v in (("lr", lr), ("batch_size", batch_size)) if v is not None})
        if exp.reference_train is not None and max_steps is not None:
            changes["reference_train"] = exp.reference_train.with_step_cap(max_steps)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    exp = replace(exp, **changes)
    validate(exp)
    return exp
