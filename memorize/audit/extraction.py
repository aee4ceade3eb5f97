"""Extraction in `memk audit`: can the model say a record back, given its beginning?

As the extraction benchmark and Carlini et al. ("Extracting Training Data from Large Language
Models", 2021; "Quantifying Memorization Across Neural Language Models", 2023) measure it: a text is
tokenized with the model's own tokenizer, x_1..x_L, and for each prefix length k (default 8, 16
and 32 tokens) the model is given its start token and the first k tokens, x_0 x_1..x_k, and decodes
greedily n = min(length, L - k, context - k - 1) tokens (length default 32; the rest of the text
where it is shorter; never past the model's context): at each step the most likely next token
(argmax of the logits in the model's dtype, the lowest id on a tie), no sampling, no stop token.
The true continuation is x_{k+1}..x_{k+n}. Per text and k:

- run: the longest reproduced run, the number of leading tokens of the true continuation the
  decoding reproduces (0..n);
- extracted: the whole continuation reproduced exactly (run = n).

A text of L <= k tokens has no continuation at k (its cell is null) and is left out of that k's
rates. Per set (members, non-members) and k: the exact-extraction rate extracted / eligible with a
Wilson 95% interval, and the mean and largest run. A model that memorized its members extracts
them and not the non-members; the non-members' rate is what the model's skill at the text's
kind alone (its generalization) gives.

Batched: every prompt for one k has k + 1 tokens, so a batch needs no padding; a Hugging Face model
decodes with its KV cache (past_key_values), a memk checkpoint (no cache) by running the whole
sequence again each step.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .scoring_model import ScoringModel
from ..errors import ConfigError

DEFAULT_PREFIXES = (8, 16, 32)
DEFAULT_LENGTH = 32
SETS = ("member", "non-member")


def parse_prefixes(text: str) -> tuple[int, ...]:
    """--extract-prefix "8,16,32" as (8, 16, 32); ConfigError naming the fix."""
    try:
        values = tuple(int(part) for part in text.replace(" ", "").split(",") if part)
    except ValueError:
        raise ConfigError(f"--extract-prefix {text!r}: give token counts separated by commas, e.g. 8,16,32") from None
    if not values:
        raise ConfigError("--extract-prefix is empty; give token counts, e.g. 8,16,32 (or --no-extract)")
    return values


def check_settings(prefixes: tuple[int, ...], length: int) -> None:
    if any(k < 1 for k in prefixes):
        raise ConfigError(f"--extract-prefix {','.join(map(str, prefixes))}: each prefix must be at least 1 token")
    if len(set(prefixes)) != len(prefixes):
        raise ConfigError(f"--extract-prefix {','.join(map(str, prefixes))} names a prefix twice")
    if length < 1:
        raise ConfigError(f"--extract-length {length} must be at least 1 token")


def continuation_length(tokens: int, prefix: int, length: int, context: int) -> int:
    """n of the module docstring: tokens decoded after a prefix of `prefix` tokens (<= 0: none)."""
    return min(length, tokens - prefix, context - prefix - 1)


def longest_run(decoded: list[int], truth: list[int]) -> int:
    """Leading tokens of `truth` that `decoded` reproduces."""
    run = 0
    for a, b in zip(decoded, truth):
        if a != b:
            break
        run += 1
    return run


@torch.no_grad()
def greedy_continuations(model: ScoringModel, prompts: list[list[int]], steps: list[int],
                         batch_tokens: int) -> list[list[int]]:
    """steps[i] tokens decoded greedily after prompts[i] (module docstring). Prompts of one length share
    batches of at most batch_tokens tokens (prompt and decoded), longest decoding first."""
    out: list[list[int]] = [[] for _ in prompts]
    order = sorted((i for i in range(len(prompts)) if steps[i] > 0), key=lambda i: (len(prompts[i]), -steps[i]))
    start = 0
    while start < len(order):
        width = len(prompts[order[start]])
        group = [order[start]]
        most = steps[order[start]]
        size = max(1, batch_tokens // (width + most))
        while (start + len(group) < len(order) and len(group) < size
               and len(prompts[order[start + len(group)]]) == width):
            group.append(order[start + len(group)])
        start += len(group)
        ids = torch.tensor([prompts[i] for i in group], dtype=torch.long, device=model.device)
        decoded = _decode(model, ids, most).tolist()
        for row, i in zip(decoded, group):
            out[i] = row[:steps[i]]
    return out


def _decode(model: ScoringModel, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """(B, steps) greedy tokens after the (B, P) prompt ids."""
    if model.kind == "memk":  # no KV cache: the whole sequence again each step (memk models are small)
        seq = ids
        for _ in range(steps):
            seq = torch.cat([seq, _head(model, model.hidden(seq, torch.ones_like(seq))[:, -1]).argmax(-1)[:, None]], 1)
        return seq[:, ids.shape[1]:]
    # The head on the last position only (no (B, P, V) logits), unless the logits are more than the head
    # gives (soft-capped, scaled): then the whole model's.
    forward = model.module.base_model if model.head_weight is not None else model.module
    name = _cache_argument(forward.forward)
    tokens, past, feed = [], None, ids
    for _ in range(steps):
        if past is None and tokens:  # the model keeps no cache: the whole sequence again
            feed = torch.cat([ids, *tokens], 1)
        result = forward(input_ids=feed, use_cache=True, **({name: past} if past is not None else {}))
        logits = _head(model, result[0][:, -1]) if model.head_weight is not None else result.logits[:, -1]
        past = next((result[key] for key in ("cache", "past_key_values") if result.get(key) is not None), None)
        feed = logits.argmax(-1)[:, None]
        tokens.append(feed)
    return torch.cat(tokens, 1)


def _cache_argument(forward) -> str:
    """What the model's forward calls its KV cache: `cache` (transformers 5.2x) or `past_key_values`."""
    import inspect

    try:
        parameters = inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in parameters else "past_key_values"


def _head(model: ScoringModel, hidden: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.linear(hidden, model.head_weight, model.head_bias)


def extract(model: ScoringModel, token_ids: list[list[int]], prefixes: tuple[int, ...], length: int,
            batch_tokens: int) -> list[dict]:
    """Per text, {str(k): {"continuation": n, "run": run, "extracted": bool} or None} (module docstring)."""
    cells: list[dict] = [{} for _ in token_ids]
    for k in prefixes:
        steps = [continuation_length(len(ids), k, length, model.context) for ids in token_ids]
        prompts = [[model.start_id, *ids[:k]] for ids in token_ids]
        decoded = greedy_continuations(model, prompts, steps, batch_tokens)
        for i, ids in enumerate(token_ids):
            n = steps[i]
            if n < 1:
                cells[i][str(k)] = None
                continue
            run = longest_run(decoded[i], ids[k:k + n])
            cells[i][str(k)] = {"continuation": n, "run": run, "extracted": run == n}
    return cells


def wilson_interval(successes: int, trials: int, z: float = 1.959963984540054) -> tuple[float, float] | None:
    """Wilson score interval of a binomial rate (95% by default); None without trials."""
    if trials == 0:
        return None
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def summarize_extraction(rows: list[dict], prefixes: tuple[int, ...], length: int) -> dict | None:
    """audit.json's "extraction": per k and set, eligible texts, extracted, rate (Wilson 95%), runs."""
    if not prefixes:
        return None
    by_prefix = {}
    for k in prefixes:
        block = {}
        for name in SETS:
            group = [r for r in rows if r["set"] == name]
            cells = [r["extraction"][str(k)] for r in group if r["extraction"][str(k)] is not None]
            extracted = sum(c["extracted"] for c in cells)
            runs = np.array([c["run"] for c in cells], dtype=np.float64)
            block[name] = {
                "samples": len(group), "eligible": len(cells), "extracted": extracted,
                "rate": extracted / len(cells) if cells else None,
                "rate_interval": wilson_interval(extracted, len(cells)),
                "mean_run": float(runs.mean()) if cells else None,
                "max_run": int(runs.max()) if cells else None,
                "mean_continuation": float(np.mean([c["continuation"] for c in cells])) if cells else None,
            }
        by_prefix[str(k)] = block
    overall = {}
    for name in SETS:  # texts extracted at one prefix length or more (what --fail-if extracted reads)
        group = [r for r in rows if r["set"] == name]
        count = sum(1 for r in group if any(c and c["extracted"] for c in r["extraction"].values()))
        overall[name] = {"samples": len(group), "extracted_any": count,
                         "rate_any": count / len(group) if group else None}
    return {
        "prefixes": list(prefixes), "length": length,
        "decoding": "greedy (argmax, no sampling, no stop token), continuation of min(length, rest of the text, "
                    "context - prefix - 1) tokens of the model's tokenizer after its start token and the prefix",
        "by_prefix": by_prefix, **overall,
    }


def _rate(block: dict) -> str:
    if not block["eligible"]:
        return "no text long enough"
    return f"{block['extracted']}/{block['eligible']} ({block['rate']:.1%})"


def _run(block: dict) -> str:
    return "" if block["mean_run"] is None else f"{block['mean_run']:.1f} of {block['mean_continuation']:.1f}"


def extraction_table(summary: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the extraction table (the report's and the command's)."""
    header = ["prefix k (tokens)", "members extracted", "non-members extracted", "mean longest run, members",
              "mean longest run, non-members"]
    rows = []
    for k, block in summary["extraction"]["by_prefix"].items():
        m, n = block["member"], block["non-member"]
        rows.append([k, _rate(m), _rate(n), _run(m), _run(n)])
    return header, rows


def format_extraction(summary: dict) -> str:
    """The lines `memk audit` prints for extraction ('' where it was off)."""
    if not summary.get("extraction"):
        return ""
    header, rows = extraction_table(summary)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = [f"extraction: greedy continuation of up to {summary['extraction']['length']} tokens after the first k"]
    lines.append("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths))))
    for r in rows:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    m, n = summary["extraction"]["member"], summary["extraction"]["non-member"]
    lines.append(f"extracted at any prefix: {m['extracted_any']} of {m['samples']} members, "
                 f"{n['extracted_any']} of {n['samples']} non-members")
    return "\n".join(lines)
