"""`memk audit --fail-if`: limits on the audit's results that stop a release in CI.

A limit is METRIC OP NUMBER, OP one of > >= < <=, e.g. `auc>0.6`, `auc[loss]>=0.7`,
`mem_u_bits_max>100`; several are given by repeating --fail-if or separating them with commas.
The audit exits with status 1, after writing its results, where any limit is passed, with one
line naming each passed limit and the value that passed it. audit.json's "fail_if" records the
outcome (outcome()): "result" ("fail" where any limit is passed, else "pass"), the exit status,
and per limit its condition, the value measured, where that value came from, and its own result
(null where no --fail-if was given). An unknown metric, a metric this audit will not compute (no
--reference, no extraction) or a malformed limit is a one-line error, exit status 2, before any
model loads.

The metrics (audit.json's fields they read):
- auc, tpr_at_1pct_fpr, tpr_at_0.1pct_fpr: the highest over every attack in the attack table
  (the strongest attack is the privacy risk); METRIC[ATTACK] takes one attack's, e.g.
  auc[loss], auc[min_k_pp] (attacks.ATTACKS names them; with several references, auc[reference] is
  against the best of them per sample, auc[reference_2] against the second alone);
- mem_u_bits: the member set's total unintended memorization Σ mem_U(x), in bits
  (sets.member.unintended_memorization_bits); mem_u_bits_mean: per member text
  (sets.member.mean_unintended_memorization_bits); mem_u_bits_max: the most any one member text
  holds (the largest mem_u_bits of samples.jsonl's members). All three need --reference (with
  several, mem_U is against the best of them per sample);
- f1: the membership F1 the loss attack measures (risk.measured_f1.f1); predicted_f1: what
  memk's F1 law predicts from capacity / member bits (risk.predicted_f1; needs --reference);
- extracted: how many member texts the model says back exactly from a prefix, at any prefix
  length the extraction tried (its field in audit.json); extracted_rate: that count over the
  members. Both need the extraction to have run.
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass

from .attacks import ATTACKS, REFERENCE_ATTACKS
from ..errors import ConfigError

OPS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}
PER_ATTACK = ("auc", "tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr")
NEED_REFERENCE = ("mem_u_bits", "mem_u_bits_mean", "mem_u_bits_max", "predicted_f1")
EXTRACTION = ("extracted", "extracted_rate")
METRICS = (*PER_ATTACK, *NEED_REFERENCE, "f1", *EXTRACTION)
_LIMIT = re.compile(r"^\s*([a-z0-9_.]+)\s*(?:\[\s*([a-z0-9_]+)\s*\])?\s*(>=|<=|>|<)\s*([^\s<>=]+)\s*$")


@dataclass(frozen=True)
class Limit:
    metric: str
    attack: str | None
    op: str
    value: float
    text: str  # as given, spaces dropped

    @property
    def name(self) -> str:
        return self.metric + (f"[{self.attack}]" if self.attack else "")


def parse_limits(specs) -> list[Limit]:
    """--fail-if's values (each maybe comma-separated) as Limits; ConfigError (exit 2) naming the bad one."""
    limits = []
    for spec in [specs] if isinstance(specs, str) else specs or ():
        for part in str(spec).split(","):
            if not part.strip():
                raise ConfigError(f"--fail-if {spec!r} has an empty limit; give e.g. 'auc>0.6,mem_u_bits>100'")
            limits.append(_parse(part))
    return limits


def _parse(text: str) -> Limit:
    match = _LIMIT.match(text)
    if match is None:
        raise ConfigError(f"--fail-if {text.strip()!r} is not METRIC OP NUMBER (OP one of > >= < <=), e.g. 'auc>0.6'")
    metric, attack, op, number = match.groups()
    if metric not in METRICS:
        raise ConfigError(f"--fail-if {text.strip()!r}: unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    if attack is not None and metric not in PER_ATTACK:
        raise ConfigError(f"--fail-if {text.strip()!r}: only {', '.join(PER_ATTACK)} take an [attack]")
    if attack is not None and attack not in ATTACKS and not re.fullmatch(r"reference_[1-9][0-9]*", attack):
        raise ConfigError(f"--fail-if {text.strip()!r}: unknown attack {attack!r}; choose one of {', '.join(ATTACKS)} "
                          "(or reference_N: the Nth of several references alone)")
    try:
        value = float(number)
    except ValueError:
        raise ConfigError(f"--fail-if {text.strip()!r}: {number!r} is not a number") from None
    if not math.isfinite(value):
        raise ConfigError(f"--fail-if {text.strip()!r}: the limit must be a finite number")
    return Limit(metric, attack, op, value, re.sub(r"\s+", "", text))


def attacks_in_table(references: int, min_k_pp: bool, recall: bool) -> set[str]:
    """The attacks an audit's table holds, with this many references and Min-K%++ and ReCaLL as asked."""
    return {"loss", "zlib", "min_k", "dc_pdd", *(["min_k_pp"] if min_k_pp else []),
            *(["reference"] if references else []), *(["recall"] if recall else []),
            *(f"reference_{i + 1}" for i in range(references) if references > 1)}


def check_available(limits: list[Limit], *, reference: bool, attacks: set[str], extraction: bool) -> None:
    """ConfigError (before any work) for a limit on a metric this audit will not compute."""
    for limit in limits:
        if limit.metric in NEED_REFERENCE and not reference:
            raise ConfigError(f"--fail-if {limit.text}: {limit.metric} needs a reference model; give --reference")
        if limit.metric in EXTRACTION and not extraction:
            raise ConfigError(f"--fail-if {limit.text}: extraction was not run, so there is no {limit.metric}; "
                              "run the extraction or drop the limit")
        if limit.attack is not None and limit.attack not in attacks:
            why = ("it needs --reference" if limit.attack in REFERENCE_ATTACKS
                   else "it needs several --reference" if limit.attack.startswith("reference_")
                   else "ReCaLL needs --recall-shots" if limit.attack == "recall" else "it is not run in this audit")
            raise ConfigError(f"--fail-if {limit.text}: the attack {limit.attack!r} is not in the table ({why})")


def value_of(limit: Limit, summary: dict, rows: list[dict]) -> tuple[float, str]:
    """The limit's metric in this audit, and what it was taken from (for the message)."""
    metric = limit.metric
    if metric in PER_ATTACK:
        attacks = summary["attacks"]
        if limit.attack is not None:
            if limit.attack not in attacks:
                raise ConfigError(f"--fail-if {limit.text}: the attack {limit.attack!r} is not in this audit's table")
            return float(attacks[limit.attack][metric]), attacks[limit.attack]["label"]
        name = max(attacks, key=lambda a: attacks[a][metric])
        return float(attacks[name][metric]), f"highest over the attacks: {attacks[name]['label']}"
    member = summary["sets"]["member"]
    if metric == "mem_u_bits":
        return float(member["unintended_memorization_bits"]), "members' total"
    if metric == "mem_u_bits_mean":
        return float(member["mean_unintended_memorization_bits"]), "per member text"
    if metric == "mem_u_bits_max":
        best = max((r for r in rows if r["set"] == "member"), key=lambda r: r["mem_u_bits"])
        return float(best["mem_u_bits"]), f"member text {best['index']}"
    risk = summary.get("risk") or {}
    if metric == "f1":
        return float(risk["measured_f1"]["f1"]), "the loss attack, median rule"
    if metric == "predicted_f1":
        if risk.get("predicted_f1") is None:
            raise ConfigError(f"--fail-if {limit.text}: no predicted F1 in this audit (it needs a reference)")
        return float(risk["predicted_f1"]), "memk's F1 law"
    count, members = extracted_members(summary)
    if metric == "extracted":
        return float(count), f"member texts extracted at some prefix length, of {members}"
    return count / members if members else 0.0, f"{count} of {members} member texts extracted"


def extracted_members(summary: dict) -> tuple[int, int]:
    """(member texts extracted at any prefix length, member texts tried), from audit.json's extraction."""
    extraction = summary.get("extraction")
    if not extraction:
        raise ConfigError("--fail-if extracted: extraction was not run, so there is nothing extracted to compare")
    members = extraction.get("member") if isinstance(extraction, dict) else None
    if not isinstance(members, dict) or "extracted_any" not in members:
        raise ConfigError("--fail-if extracted: audit.json's extraction holds no member count this memk can read")
    return int(members["extracted_any"]), int(members.get("samples", summary["sets"]["member"]["samples"]))


def outcome(limits: list[Limit], summary: dict, rows: list[dict]) -> dict | None:
    """audit.json's "fail_if" (module docstring): each limit's measured value and result, and the audit's;
    None without limits."""
    if not limits:
        return None
    checks = []
    for limit in limits:
        value, where = value_of(limit, summary, rows)
        checks.append({"condition": limit.text, "metric": limit.name, "op": limit.op, "threshold": limit.value,
                       "measured": value, "measured_from": where,
                       "result": "fail" if OPS[limit.op](value, limit.value) else "pass"})
    failed = any(check["result"] == "fail" for check in checks)
    return {"result": "fail" if failed else "pass", "exit_status": 1 if failed else 0, "limits": checks}


def failures(record: dict | None) -> list[str]:
    """A phrase for each limit of outcome()'s record the audit passed, e.g. 'auc 0.998 > 0.6 (highest over the
    attacks: loss ...)'."""
    return [f"{c['metric']} {c['measured']:.6g} {c['op']} {c['threshold']:g} ({c['measured_from']})"
            for c in (record or {}).get("limits", ()) if c["result"] == "fail"]


def passed(limits: list[Limit], summary: dict, rows: list[dict]) -> list[str]:
    """A phrase for each limit the audit passed (failures() of outcome())."""
    return failures(outcome(limits, summary, rows))


def failure_line(phrases: list[str]) -> str:
    return "memk: audit: --fail-if limit passed: " + "; ".join(phrases)
