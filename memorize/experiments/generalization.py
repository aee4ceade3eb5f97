"""run-generalization, run and measured: a validated experiment (generalization_experiment.py) in,
its source loaded, θ trained or reused, its runs planned, executed and measured, its summary out.

Memorization against generalization: reference models, unintended memorization, double descent
and membership inference (PAPER.md; Morris et al. 2025, sections 4-6). One experiment, on one
data source:
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

`memk run-generalization` enters here once (`run_command`). The runs go through the sweep
layer (memorize/runs/sweep.py): planned as Runs, trained by an executor, their rows kept by the
run store. The output folder holds: experiment.json, the corpus (tokenizer.json, corpus.npz,
corpus.json) or nothing for the Markov source, reference/ (model and its code lengths),
runs.jsonl (a row per finished run, rewritten atomically as each finishes),
prediction.json, summary.json, and three PNG plots (four for the Markov source).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..bits import model_sequence_bits, uniform_sequence_entropy_bits, unintended_memorization
from ..errors import ConfigError
from ..membership import f1_law, loss_threshold_attack
from ..model import GPT, GPTConfig, count_parameters
from ..outputs import content_digest
from ..runtime import Backends, check_fits, training_memory_bytes, use_cpu_threads
from ..schedule import RunOutcome
from ..sources import SourceData, load_source, read_documents
from ..runs.store import RunStore
from ..runs.sweep import Executor, LocalExecutor, Run, SweepProgress, require_rows
from ..train import StopSignal, uniform_code_signal
from .generalization_experiment import (  # noqa: F401  (DEFAULT_ALPHA, PRESETS, preset: callers name them here)
    DEFAULT_ALPHA, PRESETS, GeneralizationExperiment, experiment_from_options, preset, validate,
)
from .generalization_summary import GeneralizationRow, fit_law, format_summary, summarize
from .knobs import ExecutionKnobs, GeneralizationKnobs
from .options import Checked, CommandResult, executor_for, output_folder
from .reference import Reference, reference_id, train_reference


# ---------------------------------------------------------------------------------------
# Planning: which model on how many sequences


def capacity_bits(model: GPTConfig, alpha: float) -> float:
    return alpha * count_parameters(model)


def source_bits_per_sequence(data: SourceData, reference: Reference | None) -> float:
    """H(x | θ) of one sequence: exact for the Markov chain, the reference's held-out mean for text,
    and before the reference is trained the most a sequence can carry (the plan's smallest sizes)."""
    if data.exact is not None:
        return data.exact.sequence_entropy_bits(int(data.train_pool.shape[1]))
    if reference is None:
        return data.most_bits_per_sequence()
    return float(reference.heldout_bits.mean())


def source_data(exp: GeneralizationExperiment, folder: Path, documents: list[str] | None = None) -> SourceData:
    """The training pool and held-out split of the experiment's source (a text corpus prepared in `folder`)."""
    return load_source(exp.source, exp.n_heldout, exp.seed, folder, documents)


def reference_run(checked: Checked[GeneralizationExperiment], data: SourceData) -> Run:
    """θ's training as a run: its shape and schedule on the whole training pool, before the sweep."""
    exp = checked.experiment
    return Run("reference", exp.reference_model_config(), len(data.train_pool), exp.reference_train_config(),
               checked.backends)


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
        return GeneralizationRow(
            run_id=run.run_id, role=run.role, model=run.model.to_dict(), model_name=run.model.name,
            parameters=count_parameters(run.model), n_sequences=run.n_sequences, size_factor=run.size_factor,
            **measure(model, data, self.data, self.reference, self.bits_per_sequence, self.exp, run.train.precision),
            steps=outcome.steps, stop_reason=outcome.stop_reason, train_seconds=outcome.train_seconds,
            train_config=run.train.to_dict(),
        ).to_dict()


def measure(model: GPT, x: torch.Tensor, data: SourceData, reference: Reference, bits_per_sequence: float,
            exp: GeneralizationExperiment, precision: str) -> dict:
    """Everything one trained model tells (the measured fields of its GeneralizationRow): losses, the
    split of its memorization, the attack."""
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


def predict_checks(sweep_rows: list[GeneralizationRow], planned: list[Run], exp, bits_per_sequence: float) -> dict:
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
    exp: GeneralizationExperiment | Checked[GeneralizationExperiment], out_dir: Path, progress: bool = True,
    executor: Executor | None = None,
) -> dict:
    """Run (or resume) the reference, the sweep, the prediction and the check runs; summarise. The
    experiment is validated here unless it comes validated already (a `Checked`, as the command line's)."""
    checked = exp if isinstance(exp, Checked) else validate(exp)
    exp, device, backends = checked.experiment, checked.device, checked.backends
    if exp.source.kind == "markov":  # the chain is sampled, deduplicated and split on the CPU: ~4 copies at once
        check_fits(4 * exp.source.markov_sequences * exp.source.seq_len * 8, torch.device("cpu"),
                   f"drawing {exp.source.markov_sequences:,} Markov sequences", "lower --markov-sequences")
    documents = read_documents(exp.source)  # a missing --text or an unloadable dataset: refused before --out is made
    with RunStore(out_dir, "generalization") as store:
        store.write_experiment(exp.to_dict())
        data = source_data(exp, store.folder, documents)
        del documents  # the corpus is tokenized: the text itself is not needed again
        # Fail before training the reference where the pool cannot hold the sizes even at the
        # most bits a sequence can carry.
        plan(exp, source_bits_per_sequence(data, None), len(data.train_pool), ref_id="")
        ref = reference_run(checked, data)
        ref_checkpoint = store.checkpoint_path(f"reference-{reference_id(ref.model, ref.train, data)}")
        use_cpu_threads(device, ref.model, ref.train.batch_size)
        reference = train_reference(ref.model, ref.train, data, store.folder, ref_checkpoint, device, backends,
                                    progress)
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
        sweep_rows = [GeneralizationRow.from_dict(row) for row in store.rows_of(r for r in runs if r.role == "sweep")]
        prediction = {"plan_id": plan_id, **predict_checks(sweep_rows, runs, exp, bits_per_sequence)}
        store.write_json("prediction.json", prediction)
    return prediction


# ---------------------------------------------------------------------------------------
# The command


def from_command_line(preset_name: str, knobs: GeneralizationKnobs) -> tuple[Checked[GeneralizationExperiment], Path]:
    """`memk run-generalization`'s experiment, validated once, and its output folder (its run and its
    dry run both start here)."""
    checked = validate(experiment_from_options(preset_name, knobs))
    return checked, output_folder(knobs.out, Path("runs") / f"generalization-{preset_name}")


def run_command(preset_name: str, knobs: GeneralizationKnobs, execution: ExecutionKnobs) -> CommandResult:
    """`memk run-generalization`: the experiment trained by the executor the command line asks for, and its summary."""
    checked, out = from_command_line(preset_name, knobs)
    executor = executor_for(execution, checked.device)
    summary = run_generalization(checked, out, execution.progress, executor)
    text = f"{format_summary(summary)}\nresults in {out}/: runs.jsonl, summary.json, prediction.json, reference/, *.png"
    return CommandResult(text, out, summary)
