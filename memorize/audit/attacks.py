"""Membership-inference attacks on one text at a time, and how well each separates members.

Every score here is "higher = more likely a member". The attacks, as published:
- loss: minus the mean code length per token under the model, -H(x | M) / L
  (Yeom et al., "Privacy Risk in Machine Learning", CSF 2018);
- reference: the reference-calibrated loss, H(x | R) - H(x | M) in bits: how much better the
  model codes x than the reference does (Carlini et al., "Extracting Training Data from Large
  Language Models", USENIX Security 2021, comparison to another model; Watson et al., "On the
  Importance of Difficulty Calibration in Membership Inference Attacks", ICLR 2022);
- zlib: minus the ratio of the model's code length to zlib's, -H(x | M) / zlib bits
  (Carlini et al. 2021, the zlib entropy comparison);
- min_k: the mean log p of the k% least likely tokens (Shi et al., "Detecting Pretraining Data
  from Large Language Models", ICLR 2024), k = 20% by default;
- min_k_pp: the mean, over the k% lowest, of (log p(x_t) - μ_t) / σ_t, μ_t and σ_t the mean and
  standard deviation of log p(v) under the model's next-token distribution (Zhang et al.,
  "Min-K%++: Improved Baseline for Pre-Training Data Detection from Large Language Models",
  ICLR 2025);
- recall: ReCaLL, the relative conditional log-likelihood LL(x | P) / LL(x), LL the mean log p
  of x's tokens, P a prefix of non-member texts put before x (Xie et al., "ReCaLL: Membership
  Inference via Relative Conditional Log-Likelihoods", EMNLP 2024). A member's likelihood falls
  more under a non-member context, so a higher ratio = more likely a member (the paper's
  direction: its code scores ROC with the ratio itself). memk puts the model's start token
  between the prefix texts and before x, so x is coded after the start token as everywhere else
  here; the ratio is taken in bits, H(x | P, M) / H(x | M), the same number (the token counts
  cancel). Its cost is one more pass of the model over every text with P in front
  (memorize/audit/recall_dc_pdd.py), so it runs only when asked for (--recall-shots);
- dc_pdd: DC-PDD, the mean over the first occurrence of each distinct token x_i of x of
  min(p(x_i | x_<i) · ln(1 / f(x_i)), a), f the token's frequency in a reference corpus with
  add-one smoothing, f(t) = (count(t) + 1) / (total + V), and a = 0.01 (Zhang et al.,
  "Pretraining Data Detection for Large Language Models: A Divergence-based Calibration
  Method", EMNLP 2024; their code's score is minus this mean, thresholded the other way). It
  needs only the probabilities the model pass already gives.

Left out: the neighbourhood attack (Mattern et al. 2023) needs a second large model (a masked
LM writing each text's neighbours) and dozens of passes per text; the lowercase comparison
(Carlini et al. 2021) a pass over a lowercased copy, and says nothing on text without case;
sampling attacks (SaMIA) generation; Con-ReCaLL member prefixes, which put members into what
is measured.

How well an attack separates members from non-members: ROC AUC (memorize.membership.roc_auc),
the TPR at a fixed FPR, and percentile bootstrap intervals of both (members and non-members
resampled apart).
"""

from __future__ import annotations

import math
import zlib

import numpy as np

from ..membership import _scores, roc_auc

ATTACKS = {
    "loss": "loss (Yeom et al. 2018)",
    "reference": "reference-calibrated loss (Carlini et al. 2021)",
    "zlib": "zlib ratio (Carlini et al. 2021)",
    "min_k": "Min-K% (Shi et al. 2024)",
    "min_k_pp": "Min-K%++ (Zhang et al. 2025)",
    "recall": "ReCaLL (Xie et al. 2024)",
    "dc_pdd": "DC-PDD (Zhang et al. 2024)",
}
REFERENCE_ATTACKS = ("reference",)  # need a reference model
FPRS = (0.01, 0.001)


def zlib_bits(text: str) -> int:
    """Bits of the text's UTF-8 bytes compressed by zlib at level 9."""
    return 8 * len(zlib.compress(text.encode("utf-8"), 9))


def lowest_fraction_mean(values: np.ndarray, k: float) -> float:
    """Mean of the ⌊k·n⌋ smallest values (at least one), as Min-K% takes them."""
    if len(values) == 0:
        raise ValueError("Min-K% needs at least one token")
    count = max(1, int(len(values) * k))
    return float(np.sort(np.asarray(values, dtype=np.float64))[:count].mean())


def attack_scores(bits: float, logp: np.ndarray, z: np.ndarray | None, zlib: int,
                  reference_bits: float | None, k: float) -> dict[str, float]:
    """The attacks' scores for one text (module docstring); bits = H(x | M), logp and z per token."""
    scores = {"loss": -bits / len(logp), "zlib": -bits / zlib, "min_k": lowest_fraction_mean(logp, k)}
    if z is not None:
        scores["min_k_pp"] = lowest_fraction_mean(z, k)
    if reference_bits is not None:
        scores["reference"] = reference_bits - bits
    return scores


def recall_ratio(bits: float, prefixed_bits: float) -> float:
    """ReCaLL's LL(x | P) / LL(x) (module docstring) from the code lengths of x alone and after the prefix,
    in bits. A text the model is certain of (0 bits alone) is divided by 1e-9 bits instead of 0."""
    return float(prefixed_bits) / max(float(bits), 1e-9)


def token_counts(token_ids, size: int) -> np.ndarray:
    """How often each token id appears over all the texts' ids (int64, at least `size` entries)."""
    flat = np.concatenate([np.asarray(ids, dtype=np.int64) for ids in token_ids]) if len(token_ids) else np.zeros(0, np.int64)
    return np.bincount(flat, minlength=size).astype(np.int64)


def dc_pdd_score(logp: np.ndarray, ids, counts: np.ndarray, cap: float = 0.01, leave_out_self: bool = False) -> float:
    """DC-PDD's score of one text (module docstring): logp[i] = ln p(x_i | x_<i), ids[i] = x_i, counts the
    reference corpus's token counts over the whole vocabulary (V = len(counts)).

    f(t) = (counts[t] + 1) / (counts.sum() + V); with leave_out_self, the text's own tokens are taken out of
    the counts first (the corpus is the set the text belongs to, which must not calibrate the text by itself)."""
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) == 0 or len(ids) != len(logp):
        raise ValueError(f"DC-PDD needs one log-prob per token, got {len(logp)} for {len(ids)} tokens")
    if ids.max() >= len(counts):
        raise ValueError(f"token id {int(ids.max())} is outside the counts' vocabulary of {len(counts)}")
    distinct, first, own = np.unique(ids, return_index=True, return_counts=True)
    order = np.argsort(first)  # first occurrences in text order (the mean does not care; kept for clarity)
    distinct, first, own = distinct[order], first[order], own[order]
    seen, total = counts[distinct].astype(np.float64), float(counts.sum())
    if leave_out_self:
        seen, total = seen - own, total - len(ids)
    frequency = (seen + 1.0) / (total + len(counts))
    calibrated = np.exp(np.asarray(logp, dtype=np.float64)[first]) * -np.log(frequency)
    # mean(min(term, a)) as a - mean(shortfall below a): texts whose terms are all capped score exactly a
    # whatever their token count (a mean of n copies of 0.01 rounds differently for different n, and such
    # rounding alone would separate texts).
    return float(cap - np.maximum(cap - calibrated, 0.0).mean())


def tpr_at_fpr(member_scores, nonmember_scores, fpr: float) -> float:
    """The highest TPR of a threshold rule "score > t = member" whose FPR is at most `fpr`.

    At most ⌊fpr · n⌋ non-members may score above t, so t is the (⌊fpr · n⌋+1)-th highest
    non-member score (ties at it fall below t as well); no interpolation between thresholds.
    """
    m = _scores("member_scores", member_scores)
    n = np.sort(_scores("nonmember_scores", nonmember_scores))[::-1]
    allowed = math.floor(fpr * len(n) + 1e-9)  # 1e-9: 0.01 * 100 is 1.0000000000000002 or 0.99999...
    if allowed >= len(n):
        return 1.0
    return float((m > n[allowed]).mean())


def bootstrap_interval(metric, member_scores, nonmember_scores, resamples: int, seed: int,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of metric(members, non-members) over resamples drawn with replacement
    from each group apart."""
    m, n = np.asarray(member_scores, np.float64), np.asarray(nonmember_scores, np.float64)
    rng = np.random.default_rng(seed)
    values = np.array([metric(m[rng.integers(0, len(m), len(m))], n[rng.integers(0, len(n), len(n))])
                       for _ in range(resamples)])
    tail = (1.0 - level) / 2.0
    return float(np.quantile(values, tail)), float(np.quantile(values, 1.0 - tail))


def fpr_label(fpr: float) -> str:
    return f"tpr_at_{fpr * 100:g}pct_fpr"


def attack_metrics(member_scores, nonmember_scores, resamples: int = 1000, seed: int = 0) -> dict:
    """ROC AUC and TPR at each of FPRS, each with its 95% bootstrap interval."""
    out = {"auc": roc_auc(member_scores, nonmember_scores)}
    if resamples:
        out["auc_interval"] = bootstrap_interval(roc_auc, member_scores, nonmember_scores, resamples, seed)
    for fpr in FPRS:
        name = fpr_label(fpr)
        out[name] = tpr_at_fpr(member_scores, nonmember_scores, fpr)
        if resamples:
            out[f"{name}_interval"] = bootstrap_interval(
                lambda a, b, f=fpr: tpr_at_fpr(a, b, f), member_scores, nonmember_scores, resamples, seed)
    return out


def roc_curve(member_scores, nonmember_scores) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) of "score >= t" at every distinct score t, from (0, 0) to (1, 1), for plotting."""
    m, n = np.asarray(member_scores, np.float64), np.asarray(nonmember_scores, np.float64)
    thresholds = np.unique(np.concatenate([m, n]))[::-1]

    def share_at_or_above(values):
        return 1.0 - np.searchsorted(np.sort(values), thresholds, side="left") / len(values)

    return np.concatenate([[0.0], share_at_or_above(n)]), np.concatenate([[0.0], share_at_or_above(m)])
