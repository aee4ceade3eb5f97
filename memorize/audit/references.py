"""Several references at once in `memk audit` (--reference A --reference B ...).

The paper codes x given the reference with whichever model compresses it better, so against
references R_1..R_n the reference code length is the shortest of theirs,

    H(x | R_best) = min_i H(x | R_i) = -log2 max_i p_i(x),

and mem_U(x) = max(0, H(x | R_best) - H(x | M)); R_best is chosen per sample. A row's
reference_bits, reference_tokens and mem_u_bits are those of R_best (with one reference: of it, as
always); with two or more, the row also carries "references" (each one's tokens, bits and mem_U,
in the order given) and "best_reference" (R_best's place in that list, 0-based; the first on a
tie). The reference attack scores H(x | R_best) - H(x | M); "reference_1", "reference_2", ...
score each reference alone. audit.json's sets carry the best reference's totals and, with two or
more, each reference's under "references".
"""

from __future__ import annotations

import numpy as np

from .attacks import attack_metrics


def role_names(count: int) -> list[str]:
    """The names references go by in the window settings and the scores: reference, reference_2, ..."""
    return ["reference" if i == 0 else f"reference_{i + 1}" for i in range(count)]


def reference_fields(model_bits: float, scores: list) -> dict:
    """A row's reference fields from each reference's TextScore (module docstring); {} without references."""
    if not scores:
        return {}
    best = min(range(len(scores)), key=lambda i: scores[i].bits)
    fields = {"reference_tokens": scores[best].tokens, "reference_bits": scores[best].bits,
              "mem_u_bits": max(0.0, scores[best].bits - model_bits)}
    if len(scores) > 1:
        fields["references"] = [{"tokens": s.tokens, "bits": s.bits, "mem_u_bits": max(0.0, s.bits - model_bits)}
                                for s in scores]
        fields["best_reference"] = best
    return fields


def each_reference_attack(row: dict) -> dict[str, float]:
    """reference_1, reference_2, ...: H(x | R_i) - H(x | M) per reference, where a row has several."""
    return {f"reference_{i + 1}": r["bits"] - row["model_bits"] for i, r in enumerate(row.get("references", ()))}


def describe(references: list[dict]) -> dict | None:
    """audit.json's "reference": the one reference's description, or what the best of several is."""
    if not references:
        return None
    if len(references) == 1:
        return references[0]
    specs = [r["spec"] for r in references]
    return {"spec": "best of " + ", ".join(specs), "kind": f"best of {len(specs)} references", "best_of": specs,
            "rule": "per sample, the reference that codes it in the fewest bits: H(x|R_best) = min_i H(x|R_i)"}


def per_reference_sets(group: list[dict], count: int, uniform: float, model_bits: float) -> list[dict]:
    """Each reference's totals over one set's rows (count >= 2)."""
    out = []
    for i in range(count):
        bits = np.array([r["references"][i]["bits"] for r in group], dtype=np.float64)
        mem_u = np.array([r["references"][i]["mem_u_bits"] for r in group], dtype=np.float64)
        out.append({
            "reference_tokens": sum(r["references"][i]["tokens"] for r in group),
            "reference_bits": float(bits.sum()),
            "unintended_memorization_bits": float(mem_u.sum()),
            "mean_unintended_memorization_bits": float(mem_u.mean()) if len(group) else 0.0,
            "samples_with_unintended_memorization": int((mem_u > 0).sum()),
            "generalization_bits": uniform - model_bits - float(mem_u.sum()),
            "best_for_samples": sum(1 for r in group if r["best_reference"] == i),
        })
    return out


def reference_attacks(rows: list[dict], references: list[dict], resamples: int, seed: int) -> dict:
    """The attack table's entries of each reference alone (two or more references)."""
    if len(references) < 2:
        return {}
    attacks = {}
    for i, ref in enumerate(references):
        name = f"reference_{i + 1}"
        scores = [[r["attacks"][name] for r in rows if r["set"] == s] for s in ("member", "non-member")]
        attacks[name] = {"label": f"reference-calibrated loss, R{i + 1} alone", "reference": ref["spec"],
                         **attack_metrics(*scores, resamples=resamples, seed=seed)}
    return attacks


def format_references(summary: dict) -> str:
    """The per-reference lines `memk audit` prints ('' with fewer than two references)."""
    refs = summary.get("references") or []
    if len(refs) < 2:
        return ""
    lines = [f"{'reference':<40} {'set':<11} {'H(x|R) bits':>13} {'mem_U bits':>12} {'best for':>9}"]
    for i, ref in enumerate(refs):
        for name, block in summary["sets"].items():
            b = block["references"][i]
            lines.append(f"{('R%d %s' % (i + 1, ref['spec']))[:40]:<40} {name:<11} {b['reference_bits']:>13.1f} "
                         f"{b['unintended_memorization_bits']:>12.1f} {b['best_for_samples']:>9}")
    return "\n".join(lines)
