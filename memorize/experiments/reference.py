"""The reference model θ of run-generalization: trained once on the whole training pool.

For text, θ stands in for the true generator (PAPER.md: in the paper, the largest
model of the experiment, trained on a superset of the data). It codes every pool and
held-out sequence once; those code lengths are H(x | θ) in mem_U(x) = max(0, H(x | θ) -
H(x | θ̂)). Its weights, code lengths and description live in the output folder's
reference/, named by an id over its shape, its schedule and the data, and are reused
whenever a later run asks for the same reference.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..bits import coded_tokens, model_sequence_bits
from ..model import GPT, GPTConfig, count_parameters
from ..errors import ConfigError
from ..outputs import atomic_write, atomic_write_json, atomic_write_npz, content_digest, read_state
from ..runtime import Backends, progress_bar, step_progress
from ..schedule import TrainConfig
from ..sources import SourceData
from ..train import train_to_saturation

FOLDER = "reference"
DESCRIPTION, WEIGHTS, BITS = "reference.json", "model.pt", "bits.npz"  # its files in FOLDER


@dataclass
class Reference:
    config: GPTConfig
    pool_bits: np.ndarray  # H(x | θ) per training-pool sequence, float64
    heldout_bits: np.ndarray  # H(x | θ) per held-out sequence
    description: dict

    @property
    def reference_id(self) -> str:
        return self.description["reference_id"]


def reference_id(config: GPTConfig, train: TrainConfig, data: SourceData) -> str:
    return content_digest([config.to_dict(), train.to_dict(), data.fingerprint])


def train_reference(
    config: GPTConfig, train: TrainConfig, data: SourceData, out_dir: Path, checkpoint: Path,
    device: torch.device, backends: Backends, progress: bool,
) -> Reference:
    """Train θ on the whole training pool (or load it), and code every sequence with it."""
    ref_id = reference_id(config, train, data)
    folder = Path(out_dir) / FOLDER
    folder.mkdir(exist_ok=True)
    stored = stored_reference(out_dir, config, ref_id)
    if stored is not None:
        return stored
    weights_path, bits_path, meta_path = folder / WEIGHTS, folder / BITS, folder / DESCRIPTION

    bar = progress_bar(total=train.max_steps, desc=f"reference {config.name}", unit="step", leave=False,
                       disable=not progress)
    model, outcome = train_to_saturation(
        config, data.train_pool, train, device,
        checkpoint_path=checkpoint,
        attention_backend=backends.attention, logprob_backend=backends.logprob,
        on_progress=step_progress(bar, train.max_steps),
    )
    bar.close()
    pool_bits = model_sequence_bits(model, data.train_pool, train.precision)
    heldout_bits = model_sequence_bits(model, data.heldout, train.precision)
    atomic_write(weights_path, lambda tmp: torch.save(model.state_dict(), tmp))
    atomic_write_npz(bits_path, pool=pool_bits, heldout=heldout_bits)
    coded = coded_tokens(config.seq_len)
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
        "train_config": train.to_dict(),
    }
    if data.exact is not None:
        description["exact_bits_per_token"] = data.exact.entropy_rate_bits()
    atomic_write_json(meta_path, description)
    checkpoint.unlink(missing_ok=True)
    return Reference(config, pool_bits, heldout_bits, description)


def stored_reference(out_dir: Path, config: GPTConfig, ref_id: str, set_aside: bool = True) -> Reference | None:
    """θ of this id as out_dir holds it (its description and code lengths), or None. A damaged file is
    set aside (train_reference then trains θ again); with set_aside False (a dry run) it is left as it is."""
    folder = Path(out_dir) / FOLDER
    retrain = "and the reference is trained again"

    def read(path: Path, load, what: str):
        if set_aside:
            return read_state(path, load, what, retrain)
        try:
            return load(path)
        except Exception:  # noqa: BLE001 - missing or damaged: the run would train θ (again)
            return None

    meta = read(folder / DESCRIPTION, lambda p: json.loads(p.read_text()), "reference description")
    if not (isinstance(meta, dict) and meta.get("reference_id") == ref_id):
        return None
    bits = read(folder / BITS, _load_bits, "reference code lengths")
    return None if bits is None else Reference(config, bits["pool"], bits["heldout"], meta)


def _load_bits(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        return {"pool": npz["pool"], "heldout": npz["heldout"]}


def load_reference_model(out_dir: Path, device="cpu") -> GPT:
    """The stored reference θ, for reuse (e.g. as the reference of another experiment)."""
    folder = Path(out_dir) / FOLDER
    try:
        meta = json.loads((folder / DESCRIPTION).read_text())
        model = GPT(GPTConfig(**meta["model"]))
        model.load_state_dict(torch.load(folder / WEIGHTS, map_location=device))
    except Exception as e:  # noqa: BLE001 - missing or damaged: one message naming the folder
        raise ConfigError(
            f"no readable reference model in {folder} ({type(e).__name__}); run run-generalization there again"
        ) from e
    return model.to(device)
