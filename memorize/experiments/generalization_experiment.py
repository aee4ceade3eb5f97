"""run-generalization's experiment: what it is asked (`GeneralizationExperiment`), its presets, the
checks made before any data is read, and the command line's knobs applied to a preset.

What it measures and how its runs train: memorize/experiments/generalization.py.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

from ..constants import PAPER_ALPHA
from ..errors import ConfigError
from ..model import GPTConfig, count_parameters
from ..schedule import TrainConfig
from ..sources import SourceSpec, check_source
from .knobs import GeneralizationKnobs, TrainingKnobs
from .options import (
    Checked, check_experiment, choose_sizes, override_common, override_training, parse_models, parse_numbers,
    pick_preset, reshape_models,
)

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


def validate(exp: GeneralizationExperiment) -> Checked[GeneralizationExperiment]:
    """Check everything that can be checked before any data is read, once; the experiment with its
    device and backends."""
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
    return Checked.of(exp, check_experiment(
        models=exp.models, precisions=(exp.precision,), dataset_sizes=exp.dataset_sizes,
        size_factors={"size factors": exp.size_factors, "check size factors": exp.check_size_factors},
        seed=exp.seed, device=exp.device, attention_backend=exp.attention_backend, logprob_backend=exp.logprob_backend,
    ))


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


def experiment_from_options(preset_name: str,
                            knobs: GeneralizationKnobs = GeneralizationKnobs()) -> GeneralizationExperiment:
    """A preset with the command line's knobs applied (validate checks the result); a knob that
    cannot be read is a ConfigError."""
    exp = preset(preset_name)
    src_changes: dict = {}
    if knobs.source is not None:
        src_changes["kind"] = knobs.source
        if knobs.source == "markov" and exp.source.kind != "markov":  # the chain of the markov preset
            chain = PRESETS["markov"]().source
            src_changes.update(vocab_size=chain.vocab_size, markov_branching=chain.markov_branching)
    if knobs.text is not None or knobs.hf_dataset is not None:
        src_changes.setdefault("kind", "text")
    for key, value in (("text_path", knobs.text), ("hf_dataset", knobs.hf_dataset), ("hf_split", knobs.hf_split),
                       ("hf_column", knobs.hf_column), ("vocab_size", knobs.vocab_size), ("seq_len", knobs.seq_len),
                       ("markov_branching", knobs.markov_branching), ("markov_sequences", knobs.markov_sequences)):
        if value is not None:
            src_changes[key] = value
    src = replace(exp.source, **src_changes)
    changes: dict = {"source": src}

    def shapes(spec: str | None, current: tuple[GPTConfig, ...]) -> tuple[GPTConfig, ...]:
        if spec is not None:
            return parse_models(spec, src.vocab_size, src.seq_len) if spec.strip() else ()
        return reshape_models(current, src.vocab_size, src.seq_len)

    changes["models"] = shapes(knobs.models, exp.models)
    changes["check_models"] = shapes(knobs.check_models, exp.check_models)
    if knobs.reference_model is not None:
        parsed = parse_models(knobs.reference_model, src.vocab_size, src.seq_len)
        if len(parsed) != 1:
            raise ConfigError(f"--reference-model takes one model, got {knobs.reference_model!r}")
        changes["reference_model"] = parsed[0]
    elif exp.reference_model is not None:
        changes["reference_model"] = shapes(None, (exp.reference_model,))[0]
    changes.update(choose_sizes(knobs.sizes, knobs.size_factors))
    if knobs.check_size_factors is not None:
        changes["check_size_factors"] = parse_numbers(knobs.check_size_factors, float, "check size factors")
    if knobs.heldout is not None:
        changes["n_heldout"] = knobs.heldout
        changes["n_attack"] = min(exp.n_attack, knobs.heldout)
    if knobs.precision is not None:
        changes["precision"] = knobs.precision
    if knobs.alpha is not None and knobs.capacity_summary is not None:
        raise ConfigError("give either --alpha or --capacity-summary, not both")
    if knobs.alpha is not None:
        changes.update(alpha=knobs.alpha, alpha_source="--alpha")
    if knobs.capacity_summary is not None:
        changes.update(
            alpha=alpha_from_capacity_summary(Path(knobs.capacity_summary), knobs.precision or exp.precision),
            alpha_source=f"fit in {knobs.capacity_summary}",
        )
    override_common(changes, knobs.training, knobs.seed)
    changes["train"] = override_training(exp.train, knobs.training)
    if exp.reference_train is not None and knobs.training.max_steps is not None:
        # θ takes the sweep's step cap, and keeps its own rate and batch
        step_cap = TrainingKnobs(max_steps=knobs.training.max_steps)
        changes["reference_train"] = override_training(exp.reference_train, step_cap)
    return replace(exp, **changes)
