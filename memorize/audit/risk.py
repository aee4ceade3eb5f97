"""The risk that capacity predicts (`memk audit`, issue 24 §3).

A model of P parameters stores about α bits per parameter (Morris et al. 2025; memk's
run-capacity measures α), so its capacity is α · P bits. Its members, coded by the reference,
are a set of D bits (Σ H(x | R) over the member texts: what the members hold beyond what the
reference already predicts of them, as run-generalization counts a dataset's bits with its
reference). The paper's law says how well a loss-threshold attack tells members from
non-members from the ratio alone:

    F1 = 0.5 (1 + c1 σ(c2 (capacity / D + c3)))

The paper's printed constants (c1 1.34, c2 −0.034, c3 −33.14) do not reproduce its own
validation table, so the audit uses memk's own fit (COMMITTED_LAW, from the run named in it)
or the f1_law of a run-generalization summary.json given with --f1-law; beside the prediction,
the F1 the audit's loss attack measures under run-generalization's rule (threshold at the pooled
median of members and as many non-members: memorize.membership.loss_threshold_attack).

α: the through-origin fit of a run-capacity summary.json (--capacity-summary), else memk's
measured default (DEFAULT_ALPHA_SOURCE says which and why). The law was fitted on 1-layer models
trained from scratch on 64-token sequences: for a fine-tuned model far outside its range (the
ratio of a 100M-parameter model to a few thousand texts is in the hundreds) the prediction is
the law's plateau, an extrapolation, and audit.json says so. And the law assumes the model was
trained on the members, as its runs were: it says how plainly membership shows in a model that
trained on a set this size, not whether this one did (a model never trained on them measures
F1 0.5 whatever the ratio; the demo's base model audited on the fine-tune's members does).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from ..experiments.generalization import DEFAULT_ALPHA  # run-generalization's own default: the α the committed law used
from ..membership import F1_LAW_FORM, f1_law, loss_threshold_attack

# memk's committed fit: docs/generalization-default/summary.json's f1_law, and the ratios of the 12
# sweep runs it was fitted on (docs/generalization-default/runs.jsonl). tests/test_audit_risk.py checks
# these numbers against those files.
COMMITTED_LAW = {
    "c1": 0.9965082880858741,
    "c2": 11.175921866295294,
    "c3": -0.19037668784159298,
    "r2": 0.9912762327820174,
    "n_points": 12,
    "ratio_range": [0.1249723393448895, 3.965585694821981],
    "alpha": 2.33,
    "form": F1_LAW_FORM,
    "source": ("memk's committed fit, docs/generalization-default/summary.json: `memk run-generalization "
               "--preset default` (built-in English text, BPE 2048, S 64, 1-layer models d 8 and d 12, float32, "
               "2-core CPU), committed 2026-11-25 (bd35530); R² 0.991 over 12 runs"),
}
DEFAULT_ALPHA_SOURCE = (
    f"memk's measured default, {DEFAULT_ALPHA} bits/param (docs/default-run/summary.json: `memk run-capacity --preset default`, "
    "float32 1-layer models on random tokens, 2-core CPU), the α the committed F1 law's capacities were computed "
    "with; a lower bound of what training to saturation stores (memk measured 2.93 at the paper's 1x32 point in "
    "float32, docs/capacity-study/tables.md; the paper reports 3.6). Give --capacity-summary for a measured one")
PARAMETERS_COUNTED = ("every parameter of the audited model, shared (tied) weights once; an adapter counts as the "
                      "model with its adapter merged into the base, i.e. the base's parameters")
PREDICTION_ASSUMES = ("the model trained on the members (to convergence, as the law's runs were); the law says how "
                      "plainly membership shows at this ratio, not whether the model saw the members")
MEMBER_BITS_SOURCE = "H(x | R): the reference's code length of each member text, summed over the members"
F1_RULE = ("the loss attack (bits per token) called member below the median of the pooled members and as many "
           "non-members, run-generalization's rule (memorize.membership.loss_threshold_attack); with unequal "
           "sets, the mean over {draws} seeded draws of the larger set down to the smaller's size")
DRAWS = 200


def load_alpha(capacity_summary: str | None) -> tuple[float, str]:
    """(α, where it came from): the through-origin fit of a run-capacity summary.json (float32's where it
    holds several precisions), else memk's measured default. ConfigError naming the fix."""
    if capacity_summary is None:
        return DEFAULT_ALPHA, DEFAULT_ALPHA_SOURCE
    summary = _read_json(capacity_summary, "--capacity-summary", "run-capacity's summary.json")
    precisions = summary.get("precisions") if isinstance(summary, dict) else None
    if not isinstance(precisions, dict) or not precisions:
        raise ConfigError(f"--capacity-summary {capacity_summary} holds no α fit (no 'precisions'); give the "
                          "summary.json of a run-capacity run")
    precision = "float32" if "float32" in precisions else sorted(precisions)[0]
    try:
        alpha = float(precisions[precision]["fit"]["through_origin"]["alpha"])
    except (KeyError, TypeError, ValueError):
        raise ConfigError(f"--capacity-summary {capacity_summary} holds no {precision} α fit; give the summary.json "
                          "of a finished run-capacity run") from None
    if not (np.isfinite(alpha) and alpha > 0):
        raise ConfigError(f"--capacity-summary {capacity_summary}: its α ({alpha}) is not a positive number")
    return alpha, (f"the {precision} through-origin fit of {capacity_summary}"
                   + (f" (it holds {', '.join(sorted(precisions))}; float32 taken)" if len(precisions) > 1 else ""))


def load_law(f1_law_summary: str | None) -> dict:
    """The F1 law: the f1_law of a run-generalization summary.json, else memk's committed fit."""
    if f1_law_summary is None:
        return dict(COMMITTED_LAW)
    summary = _read_json(f1_law_summary, "--f1-law", "run-generalization's summary.json")
    law = summary.get("f1_law") if isinstance(summary, dict) else None
    if not isinstance(law, dict) or not all(isinstance(law.get(c), (int, float)) for c in ("c1", "c2", "c3")):
        raise ConfigError(f"--f1-law {f1_law_summary} holds no fitted F1 law (f1_law with c1, c2, c3); give the "
                          "summary.json of a run-generalization run with at least 4 sweep runs")
    alpha = summary.get("alpha", {})
    return {**{k: law[k] for k in ("c1", "c2", "c3", "r2", "n_points") if k in law},
            "ratio_range": None, "alpha": alpha.get("value") if isinstance(alpha, dict) else None,
            "form": law.get("form", F1_LAW_FORM), "source": f"the f1_law of {f1_law_summary}"}


def _read_json(path: str, flag: str, what: str) -> dict:
    try:
        return json.loads(Path(path).expanduser().read_text())
    except OSError as e:
        raise ConfigError(f"{flag} {path}: cannot read it ({e.strerror or e}); give {what}") from None
    except ValueError as e:
        raise ConfigError(f"{flag} {path} is not JSON ({e}); give {what}") from None


def measured_f1(member_scores, nonmember_scores, resamples: int, seed: int) -> dict:
    """The loss attack's F1 under run-generalization's rule (F1_RULE), with a percentile bootstrap
    interval (resamples of min(|M|, |N|) texts drawn with replacement from each set)."""
    m = -np.asarray(member_scores, dtype=np.float64)  # the loss score is minus bits per token: back to bits
    n = -np.asarray(nonmember_scores, dtype=np.float64)
    k = min(len(m), len(n))
    rng = np.random.default_rng(seed)
    if len(m) == len(n):
        f1, draws = loss_threshold_attack(m, n)["f1"], 0
    else:
        def draw(x):
            return x if len(x) == k else x[rng.choice(len(x), k, replace=False)]
        f1, draws = float(np.mean([loss_threshold_attack(draw(m), draw(n))["f1"] for _ in range(DRAWS)])), DRAWS
    out = {"f1": float(f1), "members": len(m), "non_members": len(n), "balanced_size": k, "draws": draws,
           "rule": F1_RULE.format(draws=DRAWS)}
    if resamples:
        values = [loss_threshold_attack(m[rng.integers(0, len(m), k)], n[rng.integers(0, len(n), k)])["f1"]
                  for _ in range(resamples)]
        out["interval"] = [float(np.quantile(values, 0.025)), float(np.quantile(values, 0.975))]
    return out


def capacity_risk(parameters: int, member_bits: float | None, member_scores, nonmember_scores, *, alpha: float,
                  alpha_source: str, law: dict, resamples: int, seed: int) -> dict:
    """audit.json's "risk": capacity, the member set's bits, their ratio, the F1 the law predicts there
    and the F1 the loss attack measures."""
    capacity = alpha * parameters
    out = {"parameters": int(parameters), "parameters_counted": PARAMETERS_COUNTED, "alpha": alpha,
           "alpha_source": alpha_source, "capacity_bits": capacity, "member_bits": member_bits,
           "member_bits_source": MEMBER_BITS_SOURCE if member_bits is not None else
           "no reference: the member set's bits are its code length under a reference (give --reference)",
           "capacity_over_member_bits": None, "f1_law": law, "predicted_f1": None, "in_fitted_range": None,
           "prediction_assumes": PREDICTION_ASSUMES,
           "measured_f1": measured_f1(member_scores, nonmember_scores, resamples, seed)}
    if member_bits is not None and member_bits > 0:
        ratio = capacity / member_bits
        out["capacity_over_member_bits"] = ratio
        out["predicted_f1"] = float(f1_law(ratio, law["c1"], law["c2"], law["c3"]))
        lo_hi = law.get("ratio_range")
        out["in_fitted_range"] = None if lo_hi is None else bool(lo_hi[0] <= ratio <= lo_hi[1])
    if law.get("alpha") is not None and abs(law["alpha"] - alpha) > 1e-9:
        out["note"] = (f"the law's capacities were computed with α {law['alpha']:g}, this capacity with α {alpha:g}: "
                       "the ratio is read as true capacity over data either way")
    return out


def format_risk(risk: dict | None) -> list[str]:
    """The lines `memk audit` prints under its tables."""
    if not risk:
        return []
    lines = [f"capacity: {risk['capacity_bits']:,.0f} bits = {risk['alpha']:g} bits/param x {risk['parameters']:,} "
             f"parameters (α: {risk['alpha_source'].split(' (')[0]})"]
    if risk["member_bits"] is None:
        lines.append("member set: no size in bits without a reference, so no ratio and no predicted F1")
    else:
        lines.append(f"member set: {risk['member_bits']:,.1f} bits under the reference; capacity / member bits = "
                     f"{risk['capacity_over_member_bits']:,.3g}")
    measured = risk["measured_f1"]
    interval = measured.get("interval")
    text = f"membership F1 (loss attack, median rule): measured {measured['f1']:.3f}" + (
        f" [{interval[0]:.2f}, {interval[1]:.2f}]" if interval else "")
    if risk["predicted_f1"] is not None:
        where = {True: "", False: ", outside the ratios it was fitted on", None: ""}[risk["in_fitted_range"]]
        text += f"; memk's F1 law predicts {risk['predicted_f1']:.3f}{where}"
    lines.append(text)
    return lines
