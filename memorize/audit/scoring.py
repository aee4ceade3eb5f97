"""Per-token code lengths of whole texts under one model: which tokens are coded, the sliding
window, and batches packed by length.

Which tokens are coded: a text is tokenized with the model's own tokenizer, no special tokens
added, giving ids x_1..x_L; the model's start token x_0 (BOS, else EOS; EOT for memk models) is
put in front as context. Every one of x_1..x_L is coded, x_1 given x_0 alone: H(x | model) =
-Σ_{t=1..L} log2 p(x_t | x_<t). x_0 is context, coded by neither model, so two models with
different tokenizers code the same text and their bits can be subtracted.

The sliding window, for texts longer than the model's context W (L > W): windows end at
e_0 = W, e_k = min(L, e_{k-1} + stride) until e_k = L; window k feeds tokens x_{e_k - W} ..
x_{e_k - 1} and codes only the targets it alone reaches, x_{e_{k-1}+1} .. x_{e_k}. So every
token is coded exactly once, with at least W - stride + 1 tokens of context (all before it
where there are fewer). The default stride is W // 2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .scoring_model import ScoringModel, token_logprobs

LN2 = math.log(2.0)


@dataclass
class Window:
    sample: int  # index of the text in the list being scored
    order: int  # k: the window's place in its text
    inputs: list[int]  # the tokens fed, start token included where the window begins the text
    targets: list[int]  # inputs shifted by one: targets[i] is predicted from inputs[: i + 1]
    skip: int  # the first `skip` targets were coded by the window before


def windows_of(sample: int, ids: list[int], start_id: int, width: int, stride: int) -> list[Window]:
    """The windows coding x_1..x_L of one text (module docstring), width W tokens each."""
    if width < 2 or not 1 <= stride <= width - 1:
        raise ValueError(f"a window needs width >= 2 and 1 <= stride < width, got width {width}, stride {stride}")
    seq = [start_id, *ids]
    n = len(ids)
    if n == 0:
        return []
    out, coded, end = [], 0, min(n, width)
    while True:
        begin = max(0, end - width)
        out.append(Window(sample, len(out), seq[begin:end], seq[begin + 1:end + 1], coded - begin))
        if end == n:
            return out
        coded, end = end, min(n, end + stride)


@dataclass
class TextScore:
    logp: np.ndarray  # log p(x_t | x_<t), natural log, float32, t = 1..L
    z: np.ndarray | None  # Min-K%++'s (log p - mean) / std per token, or None

    @property
    def bits(self) -> float:
        return float(-self.logp.astype(np.float64).sum() / LN2)  # float64 sum of float32 terms

    @property
    def tokens(self) -> int:
        return len(self.logp)


@torch.no_grad()
def score_texts(model: ScoringModel, token_ids: list[list[int]], width: int, stride: int,
                batch_tokens: int, moments: bool) -> list[TextScore]:
    """Every token of every text coded (module docstring); batches of at most batch_tokens padded tokens,
    windows sorted by length so a batch pads little."""
    windows = [w for i, ids in enumerate(token_ids) for w in windows_of(i, ids, model.start_id, width, stride)]
    count = [0] * len(token_ids)
    for w in windows:
        count[w.sample] += 1
    windows.sort(key=lambda w: -len(w.inputs))
    pieces: dict[tuple[int, int], tuple[np.ndarray, np.ndarray | None]] = {}
    device = model.device
    start = 0
    while start < len(windows):
        longest = len(windows[start].inputs)  # sorted: the first of a batch is its longest
        size = max(1, batch_tokens // longest)
        batch = windows[start:start + size]
        start += len(batch)
        ids = torch.full((len(batch), longest), model.start_id, dtype=torch.long)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        rows, targets = [], []
        for b, w in enumerate(batch):
            ids[b, :len(w.inputs)] = torch.tensor(w.inputs)
            mask[b, :len(w.inputs)] = 1
            rows.extend(range(b * longest + w.skip, b * longest + len(w.inputs)))
            targets.extend(w.targets[w.skip:])
        out = token_logprobs(model, ids.to(device), mask.to(device), torch.tensor(rows, device=device),
                             torch.tensor(targets, device=device), moments)
        logp, mean, std = out if moments else (out, None, None)
        logp = logp.float().cpu().numpy()
        z = None
        if moments:
            lp = logp.astype(np.float64)
            mean, std = mean.double().cpu().numpy(), std.double().cpu().numpy()
            z = np.where(std > 0, (lp - mean) / np.where(std > 0, std, 1.0), 0.0).astype(np.float32)
        at = 0
        for w in batch:
            n = len(w.inputs) - w.skip
            pieces[(w.sample, w.order)] = (logp[at:at + n], None if z is None else z[at:at + n])
            at += n
    scores = []
    for i in range(len(token_ids)):
        parts = [pieces.pop((i, k)) for k in range(count[i])]
        scores.append(TextScore(
            np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.float32),
            (np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.float32)) if moments else None,
        ))
    return scores
