"""run-generalization's rows and what they add up to: a run's row (`GeneralizationRow`); per model,
the curves and the double-descent peak; the F1 law fitted on the sweep and its predictions checked;
the reference model checked against the exact generator where there is one.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from typing import Iterable

import numpy as np

from ..membership import fit_f1_law


@dataclass(frozen=True, kw_only=True)
class GeneralizationRow:
    """One run's row of runs.jsonl, in the order of its keys there (the store adds its provenance
    after them: memorize/runs/store.py). Bits are totals over the run's dataset; losses per coded token."""

    run_id: str
    role: str  # "sweep" (the F1 law is fitted on these) or "check" (the law predicts them)
    model: dict  # GPTConfig.to_dict()
    model_name: str
    parameters: int
    n_sequences: int
    size_factor: float | None  # n_sequences as a multiple of capacity, where planned so
    capacity_bits: float  # α · parameters
    dataset_bits: float  # n · H(x | θ) per sequence
    dataset_over_capacity: float
    capacity_over_dataset: float
    train_bits_per_token: float
    heldout_bits_per_token: float
    total_memorization_bits: float
    unintended_reference_bits: float  # against the reference model θ
    unintended_exact_bits: float | None = None  # against the exact generator, where known (Markov); else not in the row
    unintended_bits: float  # the exact one where known, else the reference's
    generalization_bits: float  # total - unintended
    attack: dict  # the loss-threshold attack's measures (membership.loss_threshold_attack)
    f1: float
    auc: float
    steps: int
    stop_reason: str
    train_seconds: float
    train_config: dict  # TrainConfig.to_dict()

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if not (f.name == "unintended_exact_bits" and self.unintended_exact_bits is None)}

    @classmethod
    def from_dict(cls, row: dict) -> GeneralizationRow:
        """A row as runs.jsonl holds it, its provenance left out."""
        return cls(**{f.name: row[f.name] for f in fields(cls) if f.name in row or f.default is MISSING})


def fit_law(sweep_rows: Iterable[GeneralizationRow]) -> dict | None:
    """The F1 law fitted on the sweep; None where there are too few runs or the fit fails."""
    sweep_rows = list(sweep_rows)
    if len(sweep_rows) < 4:
        return None
    try:
        return fit_f1_law([r.capacity_over_dataset for r in sweep_rows], [r.f1 for r in sweep_rows])
    except (ValueError, RuntimeError):
        return None


def summarize(rows: Iterable[dict], prediction: dict | None) -> dict:
    """Per model: the curves and the double-descent peak; the F1 law; the check; the Markov check;
    from rows as runs.jsonl holds them."""
    rows = [GeneralizationRow.from_dict(r) for r in rows]
    sweep = [r for r in rows if r.role == "sweep"]
    models = []
    for name in dict.fromkeys(r.model_name for r in rows):
        runs = sorted((r for r in rows if r.model_name == name), key=lambda r: r.n_sequences)
        peak = max(runs, key=lambda r: r.heldout_bits_per_token)
        mem_peak = max(runs, key=lambda r: r.unintended_bits)
        models.append(
            {
                "model_name": name,
                "role": runs[0].role,
                "parameters": runs[0].parameters,
                "capacity_bits": runs[0].capacity_bits,
                # The double-descent peak: the dataset size (over capacity) with the worst held-out loss.
                "heldout_peak_dataset_over_capacity": peak.dataset_over_capacity,
                "heldout_peak_bits_per_token": peak.heldout_bits_per_token,
                "heldout_peak_is_interior": peak is not runs[0] and peak is not runs[-1],
                "unintended_peak_dataset_over_capacity": mem_peak.dataset_over_capacity,
                "unintended_peak_bits": mem_peak.unintended_bits,
                "points": [_point(r) for r in runs],
            }
        )
    out: dict = {"models": models, "f1_law": fit_law(sweep)}
    if prediction is not None:
        measured = {r.run_id: r for r in rows}
        checks = []
        for p in prediction["predictions"]:
            r = measured.get(p["run_id"])
            checks.append({**p, "measured_f1": None if r is None else r.f1,
                           "error": None if r is None or p["predicted_f1"] is None else r.f1 - p["predicted_f1"]})
        out["prediction_check"] = {"law_used": prediction["law"], "made_at": prediction["made_at"], "checks": checks}
    if rows and rows[0].unintended_exact_bits is not None:
        exact = np.array([r.unintended_exact_bits for r in rows])
        estimate = np.array([r.unintended_reference_bits for r in rows])
        out["reference_check"] = {
            "total_unintended_exact_bits": float(exact.sum()),
            "total_unintended_reference_bits": float(estimate.sum()),
            "relative_error_of_total": float((estimate.sum() - exact.sum()) / exact.sum()) if exact.sum() else None,
            "median_relative_error_per_run": float(np.median(np.abs(estimate - exact) / np.maximum(exact, 1e-9))),
        }
    return out


def _point(r: GeneralizationRow) -> dict:
    """A run as a point of its model's curves (the exact bits only where the generator is known)."""
    keys = (
        "n_sequences", "size_factor", "dataset_bits", "dataset_over_capacity", "capacity_over_dataset",
        "train_bits_per_token", "heldout_bits_per_token", "total_memorization_bits", "unintended_bits",
        "unintended_reference_bits", "unintended_exact_bits", "generalization_bits", "f1", "auc", "steps", "stop_reason",
    )
    return {k: getattr(r, k) for k in keys if k != "unintended_exact_bits" or r.unintended_exact_bits is not None}


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
