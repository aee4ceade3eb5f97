"""The audit's attacks that need more than the model's one pass over each text: ReCaLL (a second
pass with a prefix of non-members in front) and DC-PDD (the token frequencies of a reference
corpus). Their definitions and papers: memorize/audit/attacks.py.

ReCaLL's prefix P: the first `shots` non-member texts, in input order, each followed by the
model's start token, so every text x is coded as [start] P x with x after a start token as in
the plain pass. Those non-members are left out of ReCaLL's own evaluation (a text after a prefix
holding itself would be scored on a copy): their rows carry no ReCaLL score, and the attack's
row in audit.json says how many it scored. A prefix and text longer than the model's window are
coded in the sliding windows of memorize/audit/scoring.py, so the later tokens of a long text
see only part of P (a warning says so).
Cost: every text coded again with P in front, (|P| + |x|) tokens where the plain pass codes
|x|: with texts of about the prefix texts' length, (shots + 1) times the model's pass. So it is
off unless asked for (--recall-shots N).

DC-PDD's corpus: a text given with --frequency-text, else the non-member set, each non-member
then calibrated by the counts of the others (its own tokens taken out: leave-one-out): counted in
its own calibration, a non-member's rare tokens would look commoner and its score lower, less
like a member, by construction (which flatters the attack). Cost: tokenizing the corpus once;
per text nothing beyond the plain pass.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from .attacks import dc_pdd_score, recall_ratio, token_counts
from .scoring_model import ScoringModel
from .scoring import LN2, score_texts
from ..errors import ConfigError, warn

DC_PDD_FREQUENCY_NONMEMBERS = "the non-member texts, each text's own tokens left out (leave-one-out)"


@dataclass
class ExtraAttacks:
    """What the audit needs to add ReCaLL and DC-PDD scores to rows as they are coded."""
    model: ScoringModel
    window: tuple[int, int]
    batch_tokens: int
    counts: np.ndarray | None  # DC-PDD's corpus counts over the vocabulary; None: no DC-PDD
    counts_from_nonmembers: bool  # leave-one-out for non-member rows
    cap: float
    prefix: list[int] | None  # ReCaLL's P as token ids (start tokens included); None: no ReCaLL
    prefix_nonmembers: frozenset[int] = frozenset()  # non-member indexes forming P
    numbers: dict = field(default_factory=dict)  # for the resume key and audit.json's settings

    def add_scores(self, rows: list[dict], token_ids: list[list[int]], scores) -> None:
        """rows[n]["attacks"] gains "dc_pdd" and "recall" (where set up) for the text of token_ids[n],
        whose plain pass gave scores[n] (memorize/audit/scoring.py's TextScore)."""
        prefixed = None
        if self.prefix is not None:
            prefixed = score_texts(self.model, [self.prefix + list(ids) for ids in token_ids], *self.window,
                                   self.batch_tokens, moments=False)
        for n, (row, ids, score) in enumerate(zip(rows, token_ids, scores)):
            nonmember = row["set"] == "non-member"
            if self.counts is not None:
                row["attacks"]["dc_pdd"] = dc_pdd_score(score.logp, ids, self.counts, self.cap,
                                                        leave_out_self=self.counts_from_nonmembers and nonmember)
            if prefixed is not None and not (nonmember and row["index"] in self.prefix_nonmembers):
                tail = prefixed[n].logp[-len(ids):]
                row["attacks"]["recall"] = recall_ratio(score.bits, float(-tail.astype(np.float64).sum() / LN2))


def check_recall_shots(shots: int, nonmembers: int) -> None:
    if shots < 0:
        raise ConfigError(f"--recall-shots {shots} must be >= 0 (0: no ReCaLL)")
    if shots and shots >= nonmembers:
        raise ConfigError(f"--recall-shots {shots} takes that many non-members for ReCaLL's prefix, but there are "
                          f"{nonmembers}; leave at least one to score (give more non-members or fewer shots)")


def prepare(model: ScoringModel, nonmembers: list[str], window: tuple[int, int], batch_tokens: int, *,
            recall_shots: int = 0, dc_pdd: bool = True, cap: float = 0.01,
            frequency_texts: list[str] | None = None) -> ExtraAttacks:
    """The prefix and the frequency counts, from the model's tokenizer; numbers for the resume key."""
    check_recall_shots(recall_shots, len(nonmembers))
    numbers: dict = {}
    counts = None
    nonmember_ids = _encode(model, nonmembers) if (dc_pdd and frequency_texts is None) or recall_shots else None
    if dc_pdd:
        counts = token_counts(nonmember_ids if frequency_texts is None else _encode(model, frequency_texts),
                              model.vocab_size)
        numbers["dc_pdd"] = {"a": cap, "frequency": "--frequency-text" if frequency_texts is not None
                             else DC_PDD_FREQUENCY_NONMEMBERS, "tokens": int(counts.sum()),
                             "counts_digest": _digest(counts)}
    prefix = None
    if recall_shots:
        prefix = []
        for ids in nonmember_ids[:recall_shots]:
            prefix += [*ids, model.start_id]
        numbers["recall"] = {"shots": recall_shots, "prefix_tokens": len(prefix),
                             "prefix_digest": _digest(np.asarray(prefix, np.int64))}
        typical = int(np.median([len(ids) for ids in nonmember_ids[recall_shots:]]))
        if 1 + len(prefix) + typical > window[0]:
            warn(f"ReCaLL's prefix ({recall_shots} non-member(s), {len(prefix)} tokens) and a text of the non-members' "
                 f"median length ({typical} tokens) pass {model.spec}'s window of {window[0]} tokens: a text's later "
                 "tokens see only the prefix's last part (sliding windows); fewer or shorter shots keep it whole")
    return ExtraAttacks(model, window, batch_tokens, counts, frequency_texts is None, cap, prefix,
                        frozenset(range(recall_shots)), numbers)


def _encode(model: ScoringModel, texts: list[str], chunk: int = 1024) -> list[list[int]]:
    out: list[list[int]] = []
    for begin in range(0, len(texts), chunk):
        out += model.encode(texts[begin:begin + chunk])
    return out


def _digest(values: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(values, dtype=np.int64).tobytes(), digest_size=16).hexdigest()
