"""The command line's knobs, each declared once: its flag, help and type beside the field it fills.

Contract: torch-free frozen dataclasses. cli/main.py makes each command's click options from them
(`declared`) and hands click's values back as these types (`from_values`); the experiments read
the fields (None: the preset's value). Presets stay in the experiments; a knob only overrides.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field, fields, is_dataclass

from ..constants import PAPER_ALPHA, PRECISIONS, SOURCES

PRECISION_HELP = ("training precision: float32; bfloat16 (weights and Adam state in bfloat16, the paper's); "
                  "bfloat16-autocast (float32 weights, bfloat16 arithmetic)")


@dataclass(frozen=True)
class Flag:
    """A knob's face on the command line."""

    name: str  # e.g. "--max-steps"
    help: str
    choices: tuple[str, ...] | None = None
    show_default: bool = False


def knob(flag: str, help: str, *, default=None, choices=None, show_default: bool = False):
    """A dataclass field that is a command-line option; its type comes from the field's annotation."""
    return field(default=default, metadata={"flag": Flag(flag, help, None if choices is None else tuple(choices),
                                                          show_default)})


@dataclass(frozen=True)
class Declared:
    """One knob as the command line sees it: click's parameter name is the field's."""

    name: str
    kind: type | None  # int, float, bool (a flag without a value), or None: text
    default: object
    flag: Flag


def declared(cls: type) -> list[Declared]:
    """The knobs of a knob dataclass in field order, those of a nested knob dataclass in its place."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in fields(cls):
        if is_dataclass(hints[f.name]):
            out += declared(hints[f.name])
        else:
            out.append(Declared(f.name, _kind(hints[f.name]), f.default, f.metadata["flag"]))
    return out


def _kind(hint) -> type | None:
    """int for `int | None`, float, bool; None (text) for str and for 'auto or a number' (str | int)."""
    kinds = [k for k in (typing.get_args(hint) or (hint,)) if k is not type(None)]
    return kinds[0] if len(kinds) == 1 and kinds[0] in (int, float, bool) else None


def from_values(cls: type, values: dict):
    """A knob dataclass filled from click's values, by field name (nested ones from the same values)."""
    hints = typing.get_type_hints(cls)
    return cls(**{f.name: from_values(hints[f.name], values) if is_dataclass(hints[f.name]) else values[f.name]
                  for f in fields(cls)})


@dataclass(frozen=True)
class TrainingKnobs:
    """What both experiments take: the device, the schedule's cap, rate and batch, the kernels."""

    device: str | None = knob("--device", "auto, cpu, cuda or cuda:N")
    max_steps: int | None = knob("--max-steps", "step cap per run, cool-down included")
    lr: float | None = knob("--lr", "peak learning rate")
    batch_size: int | None = knob("--batch-size", "sequences per step")
    attention_backend: str | None = knob(
        "--attention-backend", "memk.kernels attention backend (auto picks the best for the device)")
    logprob_backend: str | None = knob(
        "--logprob-backend", "memk.kernels log-prob backend (auto picks the best for the device)")


@dataclass(frozen=True)
class ExecutionKnobs:
    """How the runs execute (memk.memorize.runs). The command line reads --ensemble and --workers
    once (runs' read_ensemble, parse_workers): past it --ensemble is an EnsembleChoice, --workers 'auto' or a number."""

    no_progress: bool = knob("--no-progress", "no progress bars", default=False)
    ensemble: str | int = knob(
        "--ensemble", "train runs of one shape together: auto (as an ensemble where a short probe measures it "
                      "clearly faster here), off (one at a time), or K (as ensembles of at most K)",
        default="auto", show_default=True)
    workers: str | int = knob(
        "--workers", "runs (or ensembles) training at once in this process, each on one CPU thread: auto (one "
                     "per core on the CPU where runs are small enough for one thread or no run dominates the "
                     "work, else 1), or N",
        default="auto", show_default=True)
    dry_run: bool = knob("--dry-run", "print the plan (runs, ensembles, estimated wall-clock); train nothing",
                         default=False)
    executor_name: str = knob("--executor", "local: runs train in this process; ray: as tasks of a Ray cluster",
                              default="local", choices=("local", "ray"), show_default=True)
    ray_address: str | None = knob("--ray-address", "auto: join the Ray cluster this machine belongs to; "
                                                     "HOST:PORT: its head node [default: start a local Ray instance]")
    gpus_per_task: float | None = knob(
        "--gpus-per-task", "GPUs each Ray task takes, fractions to share one [default: 1 on CUDA, 0 on the CPU]")
    cpus_per_task: int | None = knob("--cpus-per-task", "CPU cores (torch threads) each Ray task takes [default: 1]")

    @property
    def progress(self) -> bool:
        return not self.no_progress


@dataclass(frozen=True)
class CapacityKnobs:
    """`memk run-capacity`'s knobs over its preset (memorize/experiments/capacity.py)."""

    models: str | None = knob("--models", "models to train, e.g. '1x32,2x64x4' (LAYERSxD_MODEL[xHEADS])")
    vocab_size: int | None = knob("--vocab-size", "vocabulary size V of the random data")
    seq_len: int | None = knob("--seq-len", "sequence length S (tokens 1..S-1 are coded)")
    sizes: str | None = knob("--sizes", "dataset sizes in sequences for every model, e.g. '50,100,200'")
    size_factors: str | None = knob(
        "--size-factors", f"dataset sizes as multiples of the capacity expected at {PAPER_ALPHA} bits/param")
    precision: str | None = knob("--precision", PRECISION_HELP + "; both: float32 and bfloat16",
                                 choices=(*PRECISIONS, "both"))
    cooldown_steps: int | None = knob("--cooldown-steps", "steps of linear learning-rate decay that end each run")
    seed: int | None = knob("--seed", "seed of the data stream and the model init")
    out: str | None = knob("--out", "output folder [default: runs/capacity-PRESET]")
    training: TrainingKnobs = field(default_factory=TrainingKnobs)


@dataclass(frozen=True)
class GeneralizationKnobs:
    """`memk run-generalization`'s knobs over its preset (memorize/experiments/generalization_experiment.py)."""

    source: str | None = knob("--source", "text (a corpus) or markov (a synthetic chain with exact entropy)",
                              choices=SOURCES)
    text: str | None = knob("--text", "a UTF-8 text file to use as the corpus [default: the built-in corpus]")
    hf_dataset: str | None = knob("--hf-dataset", "a Hugging Face dataset name, or a folder saved with save_to_disk")
    hf_split: str | None = knob("--hf-split", "the dataset's split [default: train]")
    hf_column: str | None = knob("--hf-column", "the dataset's text column [default: text]")
    vocab_size: int | None = knob("--vocab-size", "BPE vocabulary (text) or number of states (markov)")
    seq_len: int | None = knob("--seq-len", "sequence length S in tokens (tokens 1..S-1 are coded)")
    markov_branching: int | None = knob("--markov-branching", "non-zero successors per Markov state")
    markov_sequences: int | None = knob("--markov-sequences",
                                        "sequences drawn from the Markov chain (training pool + held-out)")
    models: str | None = knob("--models", "models of the sweep, e.g. '1x16x2,1x32' (LAYERSxD_MODEL[xHEADS])")
    check_models: str | None = knob("--check-models", "models outside the fit whose F1 the law predicts ('' for none)")
    reference_model: str | None = knob("--reference-model",
                                       "the reference θ's shape [default: the largest model of the run]")
    sizes: str | None = knob("--sizes", "dataset sizes in sequences for every model, e.g. '50,100,200'")
    size_factors: str | None = knob("--size-factors", "dataset sizes as multiples of each model's capacity, in bits")
    check_size_factors: str | None = knob("--check-size-factors",
                                          "the check runs' dataset sizes, as multiples of capacity")
    heldout: int | None = knob("--heldout", "sequences held out, never trained on")
    alpha: float | None = knob("--alpha", "bits per parameter for capacity = α · parameters")
    capacity_summary: str | None = knob("--capacity-summary", "take α from a run-capacity summary.json instead")
    precision: str | None = knob("--precision", PRECISION_HELP, choices=PRECISIONS)
    seed: int | None = knob("--seed", "seed of the data split, the Markov chain and the model init")
    out: str | None = knob("--out", "output folder [default: runs/generalization-PRESET]")
    training: TrainingKnobs = field(default_factory=TrainingKnobs)
