"""Loss-threshold membership inference, and the sigmoid law its F1 follows (Morris et al. 2025).

A model that memorized its training set codes members in fewer bits than fresh
sequences from the same source. The attack thresholds the code length; its F1 falls
towards 0.5 (chance) as the dataset grows past the model's capacity, and the paper
fits F1 as a sigmoid of capacity / dataset size.
"""

from __future__ import annotations

import numpy as np
from scipy import optimize, special, stats

F1_LAW_FORM = "F1 = 0.5*(1 + c1*sigmoid(c2*(capacity/dataset + c3)))"


def _scores(name: str, values) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array of per-sequence scores, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} holds NaN or infinite values; score only finite code lengths")
    return x


def roc_auc(member_scores, nonmember_scores) -> float:
    """P(member score > nonmember score) + 0.5 P(tie); higher score = "more likely a member".

    The Mann-Whitney U statistic over n1 n2, from the ranks of the pooled scores (ties get
    their average rank, which is what counts a tie as half): O(n log n).
    """
    m = _scores("member_scores", member_scores)
    n = _scores("nonmember_scores", nonmember_scores)
    ranks = stats.rankdata(np.concatenate([m, n]))
    u = ranks[: len(m)].sum() - len(m) * (len(m) + 1) / 2.0
    return float(u / (len(m) * len(n)))


def loss_threshold_attack(member_bits, nonmember_bits) -> dict:
    """Call a sequence a member where its code length -log2 p(x | θ̂) is below the pooled median.

    Balanced: as many members as non-members. The median threshold predicts exactly half
    of the pool members, so uninformative scores give F1 ≈ 0.5 and perfectly separated
    scores F1 = 1. (An F1-maximising threshold would not do: calling everything a member
    already scores precision 1/2, recall 1, F1 = 2/3, with no information at all.) With
    half predicted in a balanced pool, precision = recall = F1 = accuracy.

    Ties: code lengths equal to the threshold share the member predictions still to give
    (n - #below) equally, the expected confusion matrix of breaking the tie at random. So
    ties never change how many are called members, and all-equal scores give 0.5, not 0.
    """
    m = _scores("member_bits", member_bits)
    n = _scores("nonmember_bits", nonmember_bits)
    if len(m) != len(n):
        raise ValueError(
            f"the attack is evaluated balanced: got {len(m)} members and {len(n)} non-members; "
            f"pass as many held-out sequences as training sequences (subsample the larger set)"
        )
    pooled = np.concatenate([m, n])
    threshold = float(np.median(pooled))
    below = int((pooled < threshold).sum())
    equal = int((pooled == threshold).sum())
    share = (len(m) - below) / equal if equal else 0.0  # each tied sequence's chance of being called a member

    tp = (m < threshold).sum() + share * (m == threshold).sum()
    fp = (n < threshold).sum() + share * (n == threshold).sum()
    fn = len(m) - tp
    tn = len(n) - fp
    precision = tp / (tp + fp) if tp + fp > 0 else 0.0  # nothing predicted: precision 0
    recall = tp / (tp + fn)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {
        "f1": float(f1),
        "precision": float(precision),
        "recall": float(recall),
        "accuracy": float((tp + tn) / (len(m) + len(n))),
        # Lower bits = member, so the AUC's "higher = member" score is minus the bits.
        "auc": roc_auc(-m, -n),
        "threshold_bits": threshold,
        "n_members": len(m),
        "n_nonmembers": len(n),
    }


def f1_law(ratio, c1, c2, c3) -> np.ndarray:
    """F1 = 0.5 (1 + c1 sigmoid(c2 (ratio + c3))), ratio = capacity / dataset size in bits."""
    return 0.5 * (1.0 + c1 * special.expit(c2 * (np.asarray(ratio, dtype=np.float64) + c3)))


def fit_f1_law(ratios, f1s) -> dict:
    """Least-squares fit of f1_law, with c1 in [0, 1] (the law stays in [0.5, 1]) and c2 >= 0.

    Starts from the ratio where F1 crosses the middle of its range, trying log-spaced
    steepnesses c2 and keeping the fit with the smallest squared error.
    """
    r = np.asarray(ratios, dtype=np.float64)
    f = np.asarray(f1s, dtype=np.float64)
    if r.ndim != 1 or f.shape != r.shape:
        raise ValueError(f"ratios and f1s must be 1-D arrays of the same length, got {r.shape} and {f.shape}")
    if len(r) < 4:
        raise ValueError(f"fitting the F1 law's 3 constants needs at least 4 points, got {len(r)}; run more dataset sizes")
    if not (np.isfinite(r).all() and (r > 0).all()):
        raise ValueError("ratios (capacity / dataset size, in bits) must all be positive and finite")
    if not np.isfinite(f).all():
        raise ValueError("f1s must all be finite")

    order = np.argsort(r)
    r_sorted, f_sorted = r[order], f[order]
    c1_0 = float(np.clip(2.0 * f.max() - 1.0, 0.05, 1.0))
    # The midpoint ratio: where F1 first reaches halfway between its lowest and highest values.
    mid_f = 0.5 * (f.min() + f.max())
    above = np.nonzero(f_sorted >= mid_f)[0]
    r_mid = float(r_sorted[above[0]]) if len(above) else float(np.median(r))
    spread = float(r.max() - r.min()) or 1.0

    best, best_sse = None, np.inf
    for c2_0 in (4.0 / spread) * np.logspace(-2, 2, 9):
        try:
            params, _ = optimize.curve_fit(
                f1_law,
                r,
                f,
                p0=(c1_0, c2_0, -r_mid),
                bounds=([0.0, 0.0, -np.inf], [1.0, np.inf, np.inf]),
                maxfev=20000,
            )
        except (RuntimeError, ValueError, optimize.OptimizeWarning):
            continue
        sse = float(((f1_law(r, *params) - f) ** 2).sum())
        if best is None or sse < best_sse:
            best, best_sse = params, sse
    if best is None:
        raise ValueError("the F1 law did not fit these points from any starting point; check the F1 values")
    (c1, c2, c3), sse = best, best_sse
    sst = float(((f - f.mean()) ** 2).sum())
    return {
        "c1": float(c1),
        "c2": float(c2),
        "c3": float(c3),
        # R² is undefined (NaN) when every F1 is the same.
        "r2": 1.0 - sse / sst if sst > 0 else float("nan"),
        "rmse": float(np.sqrt(sse / len(f))),
        "n_points": int(len(f)),
        "form": F1_LAW_FORM,
        "ratio_at_midpoint": float(-c3),
    }
