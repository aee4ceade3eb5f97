"""The logprob suite: memk's log-prob ops (token_logprobs, cross_entropy, sequence_bits) against
what a user writes without them (log_softmax + gather, F.cross_entropy), eager and compiled, and
against other libraries' fused cross-entropy where installed (anchors.py says what is compared).

Each group is one op, pass (fwd or fwd+bwd), vocabulary and dtype at one token count; its check
recomputes log p(target) and the gradient in float64, chunk by chunk (logprob_float64.py). On a
CPU, each op group's times are also reported as fractions of its floor (roofline.py): the least
time its reads, writes and exps take at the rates this machine shows in the same run. The suite
also holds two families that start one step earlier, from the last hidden states and the
classifier weight: linear_cross_entropy (suite_logprob_linear.py) and head_token_logprobs
(suite_logprob_head.py).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from . import anchors, roofline
from .case import (
    TORCH_DTYPES,
    Cycle,
    Group,
    Runner,
    Variant,
    candidate_logprob_backends,
    logprob_ops_or_skip,
    max_rel_err,
    rel_tolerance,
    rotations,
    skip_compile_when_quick,
)
from .compiled import compiled
from .logprob_float64 import logprob_float64
from .suite_logprob_head import default_head_shapes, head_groups
from .suite_logprob_linear import default_linear_shapes, linear_groups

LN2 = math.log(2.0)

# Log-prob inputs are laid out as the model produces them: (batch, 64, V), contiguous.
_LOGPROB_SEQ = 64


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
        for rows, logp, probs in logprob_float64(logits, targets):
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


def _release_cached_gradient() -> None:
    """The CPU kernel keeps a freed gradient for the next backward (csrc/logprob_binding.cpp); let it go, so
    that the memory measurement (after Runner.reset) counts the gradient the measured call writes."""
    try:
        torch.ops.memk.cpu_release_cached()
    except (AttributeError, RuntimeError):  # the fused kernels are not loaded: nothing is kept
        pass


def _memk_logprob_variant(backend: str, op: str, backward: bool, compare_to: tuple[str, ...]) -> Variant:
    def build(inputs: dict, device: torch.device) -> Runner:
        runner = _op_runner(getattr(logprob_ops_or_skip(backend), op), op, backward)(inputs, device)
        if backward and device.type == "cpu":
            reset = runner.reset

            def reset_and_release():
                reset()
                _release_cached_gradient()

            runner.reset = reset_and_release
        return runner

    return Variant(f"memk:{backend}", "candidate", build, f"memk.kernels.logprob_ops({backend!r}).{op}", compare_to)


def _liger_cross_entropy_variant(backward: bool) -> Variant:
    """Liger-Kernel's cross-entropy on private copies of the logits, which it overwrites with
    their gradient (anchors.py); the copies are made at build time, outside the timing."""

    def build(inputs: dict, device: torch.device) -> Runner:
        fn = anchors.liger_cross_entropy(device)
        private = {
            "copies": [(x.detach().clone().requires_grad_(x.requires_grad), t) for x, t in inputs["copies"]],
            "upstream": inputs["upstream"],
        }
        return _op_runner(fn, "cross_entropy", backward)(private, device)

    return Variant("liger:cross_entropy", "baseline", build,
                   "liger_kernel.transformers.LigerCrossEntropyLoss() on the logits (private copies: it writes "
                   "the gradient into them)")


def _compiled_variant_build(fn: Callable, op: str, backward: bool, quick: bool):
    def build(inputs: dict, device: torch.device) -> Runner:
        skip_compile_when_quick(quick)
        return _op_runner(compiled(fn), op, backward)(inputs, device)

    return build


# ---- the suite ----------------------------------------------------------------------------

ALL_OPS = (("token_logprobs", False), ("token_logprobs", True), ("cross_entropy", False), ("cross_entropy", True),
           ("sequence_bits", False))


def default_shapes(device: torch.device, quick: bool) -> list[tuple[int, int]]:
    """(vocabulary, tokens) of the default sweep."""
    if quick:
        return [(2048, 4096)]
    if device.type == "cuda":
        return [(2048, n) for n in (4096, 16384, 65536, 131072)] + [(50257, n) for n in (4096, 16384, 65536)]
    # 2-core CPU: the sweep stops at 32K tokens to keep the full run near 10 minutes
    return [(2048, n) for n in (4096, 16384, 32768)] + [(50257, 4096)]


def logprob_groups(device: torch.device, dtypes: list[str], quick: bool, backends: list[str] | None = None,
                   shapes: list[tuple[int, int]] | None = None,
                   ops: tuple[tuple[str, bool], ...] = ALL_OPS,
                   linear_shapes: list[tuple[int, int, int]] | None = None,
                   head_shapes: list[tuple[int, int, int]] | None = None) -> list[Group]:
    """The suite's groups: every op and pass at each (vocabulary, tokens) size, per dtype, then the
    linear_cross_entropy family (16-bit dtypes only) and the head_token_logprobs family.

    backends: the memk log-prob backends to compare (default: every registered one but the reference).
    shapes, ops, linear_shapes, head_shapes: a selection (cases.py's presets); default the sweep for the device.
    """
    shapes = default_shapes(device, quick) if shapes is None else shapes
    linear_shapes = default_linear_shapes(device, quick) if linear_shapes is None else linear_shapes
    head_shapes = default_head_shapes(device, quick) if head_shapes is None else head_shapes
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
                if op == "cross_entropy":
                    variants.append(_liger_cross_entropy_variant(backward))
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
                    floor=roofline.logprob_group_floor(backward),
                    variants=variants,
                ))
    return (groups + linear_groups(device, dtypes, quick, linear_shapes, backends)
            + head_groups(device, dtypes, quick, head_shapes, backends))
