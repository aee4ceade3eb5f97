"""The logprob suite: memk's log-prob ops (token_logprobs, cross_entropy, sequence_bits) against
what a user writes without them (log_softmax + gather, F.cross_entropy), eager and compiled.

Each group is one op, pass (fwd or fwd+bwd), vocabulary and dtype at one token count; its check
recomputes log p(target) and the gradient in float64, chunk by chunk.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from .case import (
    TORCH_DTYPES,
    Cycle,
    Group,
    Runner,
    Skip,
    Variant,
    candidate_logprob_backends,
    logprob_ops_or_skip,
    max_rel_err,
    rel_tolerance,
    rotations,
)

LN2 = math.log(2.0)

# Log-prob inputs are laid out as the model produces them: (batch, 64, V), contiguous.
_LOGPROB_SEQ = 64
_CHECK_ELEMENTS = 2**24  # float64 elements per chunk of the reference (128 MB): never tokens x V doubles at once


def _logprob_inputs(n_tokens: int, vocab: int, dtype: str, backward: bool, seed: int):
    def make(device: torch.device) -> dict:
        gen = torch.Generator(device=device).manual_seed(seed)  # made where used: GPU logits reach 13 GB
        shape = (n_tokens // _LOGPROB_SEQ, _LOGPROB_SEQ, vocab)
        bytes_per_copy = n_tokens * vocab * torch.empty((), dtype=TORCH_DTYPES[dtype]).element_size()
        copies = []
        for _ in range(rotations(bytes_per_copy, device)):
            # logits of a trained model's spread (std 3), so the softmax is neither flat nor one-hot
            logits = torch.randn(shape, generator=gen, device=device).mul_(3).to(TORCH_DTYPES[dtype])
            targets = torch.randint(0, vocab, shape[:-1], generator=gen, device=device)
            copies.append((logits.requires_grad_(backward), targets))
        upstream = torch.randn(shape[:-1], generator=gen, device=device)
        return {"copies": copies, "upstream": upstream}

    return make


def _logprob_reference(logits: torch.Tensor, targets: torch.Tensor):
    """Yields (row slice, float64 log p(target), float64 softmax) chunk by chunk over flattened rows."""
    flat = logits.detach().reshape(-1, logits.shape[-1])
    flat_t = targets.reshape(-1)
    chunk = max(1, _CHECK_ELEMENTS // logits.shape[-1])
    for start in range(0, flat.shape[0], chunk):
        rows = slice(start, min(start + chunk, flat.shape[0]))
        x = flat[rows].double()
        logp = torch.log_softmax(x, dim=-1)
        yield rows, logp.gather(-1, flat_t[rows].long().unsqueeze(-1)).squeeze(-1), logp.exp()


def _logprob_check(op: str, backward: bool, device: torch.device):
    """Check against float64 formulas: log p = x_t - logsumexp(x); d log p / dx = onehot - softmax."""

    def check(inputs: dict, outputs: dict) -> dict[str, tuple[float, float]]:
        logits, targets = inputs["copies"][0]
        upstream = inputs["upstream"].reshape(-1).double()
        n_rows = targets.numel()
        out = outputs["out"].detach()
        grad = outputs.get("grad")
        if backward and (grad is None or grad.shape != logits.shape):
            return {"output": (0.0, 0.0), "grad_logits": (float("inf"), 0.0)}  # no gradient, or a misshapen one
        flat_grad = grad.reshape(-1, logits.shape[-1]) if backward else None
        per_row = []
        grad_err = grad_scale = 0.0
        for rows, logp, probs in _logprob_reference(logits, targets):
            per_row.append(logp)
            if flat_grad is None:
                continue
            onehot = torch.zeros_like(probs).scatter_(-1, targets.reshape(-1)[rows].long().unsqueeze(-1), 1.0)
            if op == "token_logprobs":
                expected = upstream[rows].unsqueeze(-1) * (onehot - probs)
            else:  # mean cross-entropy
                expected = (probs - onehot) / n_rows
            grad_err = max(grad_err, (flat_grad[rows].double() - expected).abs().max().item())
            grad_scale = max(grad_scale, expected.abs().max().item())
        logp = torch.cat(per_row)
        if op == "token_logprobs":
            expected_out = logp.reshape(targets.shape)
        elif op == "cross_entropy":
            expected_out = -logp.mean()
        else:  # sequence_bits
            expected_out = -logp.reshape(targets.shape).sum(-1) / LN2
        # A float32 sum over V terms is off by ~sqrt(V) ulps: V = 50257 measures 1.6e-5 for
        # torch's own F.cross_entropy gradient, so the bound grows as sqrt(V / 2048).
        grow = max(1.0, math.sqrt(logits.shape[-1] / 2048))
        result = {"output": (max_rel_err(out, expected_out), rel_tolerance(out.dtype, device) * grow)}
        if backward:
            result["grad_logits"] = (grad_err / max(grad_scale, 1e-30), rel_tolerance(grad.dtype, device) * grow)
        return result

    return check


def _baseline_fn(op: str) -> Callable:
    """What a user writes without memk (named after it)."""
    if op == "token_logprobs":
        # upcast first: memk returns float32 log-probs, and so must the baseline
        return lambda x, t: torch.log_softmax(x.float(), dim=-1).gather(-1, t.unsqueeze(-1)).squeeze(-1)
    if op == "cross_entropy":
        return lambda x, t: F.cross_entropy(x.reshape(-1, x.shape[-1]), t.reshape(-1))
    return lambda x, t: -(
        torch.log_softmax(x.float(), dim=-1).gather(-1, t.unsqueeze(-1)).squeeze(-1).double().sum(-1)
    ) / LN2


_BASELINE_NAMES = {"token_logprobs": "log_softmax+gather", "cross_entropy": "F.cross_entropy", "sequence_bits": "log_softmax+gather+sum"}


def _op_runner(fn: Callable, op: str, backward: bool) -> Callable[[dict, torch.device], Runner]:
    def build(inputs: dict, device: torch.device) -> Runner:
        cycle = Cycle(inputs["copies"])
        upstream = inputs["upstream"]

        def backpropagate(out: torch.Tensor) -> None:
            # token_logprobs gives one value per token and takes an upstream gradient; mean cross_entropy is a scalar
            if op == "token_logprobs":
                out.backward(upstream)
            else:
                out.backward()

        def call():
            logits, targets = cycle.next()
            out = fn(logits, targets)
            if backward:
                logits.grad = None
                backpropagate(out)
            return out

        def outputs():
            logits, targets = inputs["copies"][0]
            logits.grad = None
            out = fn(logits, targets)
            result = {"out": out.detach()}
            if backward:
                backpropagate(out)
                result["grad"] = logits.grad
                logits.grad = None
            return result

        def close():
            for logits, _ in inputs["copies"]:
                logits.grad = None

        return Runner(call, outputs, close, reset=close)

    return build


def _memk_logprob_variant(backend: str, op: str, backward: bool, compare_to: tuple[str, ...]) -> Variant:
    def build(inputs: dict, device: torch.device) -> Runner:
        return _op_runner(getattr(logprob_ops_or_skip(backend), op), op, backward)(inputs, device)

    return Variant(f"memk:{backend}", "candidate", build, f"memk.kernels.logprob_ops({backend!r}).{op}", compare_to)


def _compiled(fn: Callable) -> Callable:
    # A fresh dynamo state per variant: the same closure code compiled for many shapes would
    # otherwise hit the recompile limit and silently fall back to eager.
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


def _compiled_variant_build(fn: Callable, op: str, backward: bool, quick: bool):
    def build(inputs: dict, device: torch.device) -> Runner:
        if quick:
            raise Skip("torch.compile baselines run in the full suite only (a cold compile takes ~20 s on 2 cores)")
        return _op_runner(_compiled(fn), op, backward)(inputs, device)

    return build


def logprob_groups(device: torch.device, dtypes: list[str], quick: bool, backends: list[str] | None = None) -> list[Group]:
    """The suite's groups: every op and pass at each (vocabulary, tokens) size, per dtype.

    backends: the memk log-prob backends to compare (default: every registered one but the reference).
    """
    if quick:
        shapes = [(2048, 4096)]
    elif device.type == "cuda":
        shapes = [(2048, n) for n in (4096, 16384, 65536, 131072)] + [(50257, n) for n in (4096, 16384, 65536)]
    else:  # 2-core CPU: the sweep stops at 32K tokens to keep the full run near 10 minutes
        shapes = [(2048, n) for n in (4096, 16384, 32768)] + [(50257, 4096)]
    ops = [("token_logprobs", False), ("token_logprobs", True), ("cross_entropy", False), ("cross_entropy", True), ("sequence_bits", False)]
    groups = []
    for dtype in [d for d in dtypes if d in ("float32", "bfloat16", "float16")]:
        for op, backward in ops:
            for vocab, n_tokens in shapes:
                pass_name = "fwd+bwd" if backward else "fwd"
                base = _BASELINE_NAMES[op]
                baseline_fn = _baseline_fn(op)
                variants = [
                    Variant(base, "baseline", _op_runner(baseline_fn, op, backward), f"eager {base}"),
                    Variant(
                        f"{base} (compile)", "baseline",
                        _compiled_variant_build(baseline_fn, op, backward, quick),
                        f"torch.compile({base})",
                    ),
                ]
                compare = tuple(v.name for v in variants)
                variants += [_memk_logprob_variant(b, op, backward, compare) for b in candidate_logprob_backends(backends)]
                groups.append(Group(
                    suite="logprob",
                    family=f"{op} {pass_name} V{vocab} {dtype}",
                    sweep_axis="tokens",
                    sweep_value=n_tokens,
                    dtype=dtype,
                    params={"op": op, "pass": pass_name, "tokens": n_tokens, "vocab": vocab,
                            "logits_shape": [n_tokens // _LOGPROB_SEQ, _LOGPROB_SEQ, vocab], "dtype": dtype},
                    make_inputs=_logprob_inputs(n_tokens, vocab, dtype, backward, seed=n_tokens + vocab),
                    check=_logprob_check(op, backward, device),
                    work=n_tokens,
                    work_unit="tokens",
                    variants=variants,
                ))
    return groups
