"""audit.json's summary of an audit's rows (the models, the settings, per-set totals, per-attack metrics, the
top samples, extraction), and the table `memk audit` prints from it.

Per set (members, non-members): totals; total memorization Σ [H(x) - H(x | M)] with H(x) the uniform
code of the text's UTF-8 bytes (8 bits a byte: the model-free code, as memk takes log2 V per token
for random data) and generalization = total - unintended. Per attack: ROC AUC and TPR at 1% and
0.1% FPR with bootstrap intervals (attacks.py). The most-memorized samples, with their text.
"""

from __future__ import annotations

import datetime
from dataclasses import asdict

import numpy as np

from .attacks import ATTACKS, attack_metrics
from .extraction import format_extraction, summarize_extraction
from .references import describe as describe_references
from .references import format_references, per_reference_sets, reference_attacks
from .risk import format_risk
from .row_store import FORMAT_VERSION, SETS
from .scoring_model import ScoringModel
from .settings import AuditSettings

CODING = ("each model codes every token of the text as its own tokenizer splits it (no special tokens "
          "added), the first given only the model's start token (BOS, else EOS) as context, which is "
          "itself not coded; texts longer than the context are coded in sliding windows, each token once")


def summarize(rows: list[dict], model: ScoringModel, references: list[ScoringModel], settings: AuditSettings,
              numbers: dict) -> dict:
    """audit.json: the models, the settings, per-set totals, per-attack metrics, the top samples."""
    by_set = {s: [r for r in rows if r["set"] == s] for s in SETS}
    sets = {}
    for name, group in by_set.items():
        model_bits = float(np.sum([r["model_bits"] for r in group], dtype=np.float64))
        uniform = 8.0 * sum(r["bytes"] for r in group)
        block = {
            "samples": len(group), "chars": sum(r["chars"] for r in group), "bytes": sum(r["bytes"] for r in group),
            "model_tokens": sum(r["model_tokens"] for r in group), "model_bits": model_bits,
            "model_bits_per_byte": model_bits / max(1, sum(r["bytes"] for r in group)),
            "zlib_bits": sum(r["zlib_bits"] for r in group),
            "total_memorization_bits": uniform - model_bits,
        }
        if references:
            mem_u = np.array([r["mem_u_bits"] for r in group], dtype=np.float64)
            block.update(
                reference_tokens=sum(r["reference_tokens"] for r in group),
                reference_bits=float(np.sum([r["reference_bits"] for r in group], dtype=np.float64)),
                unintended_memorization_bits=float(mem_u.sum()),
                mean_unintended_memorization_bits=float(mem_u.mean()),
                samples_with_unintended_memorization=int((mem_u > 0).sum()),
                generalization_bits=uniform - model_bits - float(mem_u.sum()),
            )
            if len(references) > 1:
                block["references"] = per_reference_sets(group, len(references), uniform, model_bits)
        sets[name] = block
    attacks = {}
    for name, label in ATTACKS.items():
        # A row may lack an attack's score: ReCaLL's prefix non-members are not scored by it.
        scores = [[r["attacks"][name] for r in by_set[s] if name in r["attacks"]] for s in SETS]
        if not all(scores):
            continue
        attacks[name] = {"label": label, **attack_metrics(*scores, resamples=settings.bootstrap, seed=settings.seed)}
        if len(scores[1]) < len(by_set["non-member"]):
            attacks[name]["scored"] = {"member": len(scores[0]), "non-member": len(scores[1]),
                                       "note": "the non-members of ReCaLL's prefix are left out of its evaluation"}
    described = [r.describe() for r in references]
    if len(references) > 1:
        attacks["reference"]["label"] = f"reference-calibrated loss, best of {len(references)} references"
    attacks.update(reference_attacks(rows, described, settings.bootstrap, settings.seed))
    ranked_by = "mem_u_bits" if references else "loss"
    ranked = sorted(rows, key=lambda r: -(r["mem_u_bits"] if references else r["attacks"]["loss"]))
    return {
        "format": FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": model.describe(),
        "reference": describe_references(described),
        "references": described,
        "coding": CODING,
        "settings": {**asdict(settings), **numbers},
        "sets": sets,
        "attacks": attacks,
        "top_ranked_by": ranked_by,
        "top": [{k: r[k] for k in ("set", "index", "model_bits", "reference_bits", "mem_u_bits", "model_tokens",
                                    "extraction", "text")} for r in ranked[:settings.top]],
        "extraction": summarize_extraction(rows, tuple(settings.extract_prefixes), settings.extract_length),
    }


def format_table(summary: dict) -> str:
    """The table `memk audit` prints at the end."""
    has_ref = summary["reference"] is not None
    lines = [f"{'set':<11} {'samples':>7} {'H(x|M) bits':>13} " + (f"{'H(x|R) bits':>13} {'mem_U bits':>12} "
             f"{'mem_U/sample':>12} {'generalization':>14}" if has_ref else "")]
    for name, b in summary["sets"].items():
        line = f"{name:<11} {b['samples']:>7} {b['model_bits']:>13.1f} "
        if has_ref:
            line += (f"{b['reference_bits']:>13.1f} {b['unintended_memorization_bits']:>12.1f} "
                     f"{b['mean_unintended_memorization_bits']:>12.2f} {b['generalization_bits']:>14.1f}")
        lines.append(line.rstrip())
    if has_ref and summary["reference"].get("default_reference"):
        lines.append(f"reference: {summary['reference']['spec']} ({summary['reference']['default_reference']})")
    lines.extend(["", format_references(summary)] if format_references(summary) else [])
    lines.extend(["", format_extraction(summary)] if summary.get("extraction") else [])
    lines.append("")
    lines.append(f"{'attack':<48} {'AUC':>20} {'TPR@1%FPR':>20} {'TPR@0.1%FPR':>20}")
    for a in summary["attacks"].values():
        cells = []
        for metric in ("auc", "tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr"):
            interval = a.get(f"{metric}_interval")
            cells.append(f"{a[metric]:.3f}" + (f" [{interval[0]:.2f},{interval[1]:.2f}]" if interval else ""))
        lines.append(f"{a['label']:<48} " + " ".join(f"{c:>20}" for c in cells))
    risk = format_risk(summary.get("risk"))
    return "\n".join(lines + ([""] + risk if risk else []))
