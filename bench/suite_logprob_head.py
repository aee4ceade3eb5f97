"""The logprob suite's head_token_logprobs family, the audit's path: log p(target) from the hidden
states and the output head, no autograd, against log_softmax + gather over the full logits.
Checked against log p(target) in float64.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from . import roofline
from .case import (
    TORCH_DTYPES,
    Group,
    Runner,
    Variant,
    candidate_logprob_backends,
    logprob_ops_or_skip,
    max_rel_err,
    rel_tolerance,
)
from .compiled import compiled_or_skip
from .logprob_float64 import head_logprobs_float64


def _head_inputs(n_tokens: int, vocab: int, d_model: int, dtype: str, seed: int):
    def make(device: torch.device) -> dict:
        gen = torch.Generator(device=device).manual_seed(seed)
        torch_dtype = TORCH_DTYPES[dtype]
        hidden = torch.randn(n_tokens, d_model, generator=gen, device=device).to(torch_dtype)
        targets = torch.randint(0, vocab, (n_tokens,), generator=gen, device=device)
        # weight scaled so that the logits have a trained model's spread (std 3), as in the other groups
        weight = (torch.randn(vocab, d_model, generator=gen, device=device) * (3 / math.sqrt(d_model))).to(torch_dtype)
        return {"hidden": hidden, "weight": weight, "targets": targets}

    return make


def _head_check(device: torch.device):
    """log p(target) of hidden @ weightᵀ in float64, chunk by chunk."""

    def check(inputs: dict, outputs: dict) -> dict[str, tuple[float, float]]:
        want = head_logprobs_float64(inputs["hidden"], inputs["weight"], inputs["targets"])
        return {"output": (max_rel_err(outputs["out"], want), rel_tolerance(inputs["weight"].dtype, device, matmul=True))}

    return check


def _head_runner(get_fn: Callable[[torch.device], Callable]) -> Callable[[dict, torch.device], Runner]:
    def build(inputs: dict, device: torch.device) -> Runner:
        fn = get_fn(device)
        args = (inputs["hidden"], inputs["weight"], inputs["targets"])
        return Runner(lambda: fn(*args), lambda: {"out": fn(*args)})

    return build


def _full_logits_logprobs(hidden, weight, targets):
    """What the head's log-probs are without memk: the full logits, their log_softmax, the targets' entries."""
    return torch.log_softmax(F.linear(hidden, weight).float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def _memk_head(backend: str) -> Callable[[torch.device], Callable]:
    def get(device: torch.device) -> Callable:
        from memk.kernels.head_logprob import head_token_logprobs

        logprob_ops_or_skip(backend)  # Skip with the reason where the backend cannot run
        return lambda hidden, weight, targets: head_token_logprobs(hidden, weight, targets, backend=backend)

    return get


def head_groups(device: torch.device, dtypes: list[str], quick: bool, shapes: list[tuple[int, int, int]],
                 backends: list[str] | None) -> list[Group]:
    """Hidden states and head weight in, log p(target) out, no autograd (the audit's path)."""
    groups = []
    for dtype in [d for d in dtypes if d in ("float32", "bfloat16")]:
        for vocab, n_tokens, d_model in shapes:
            base = "linear+log_softmax+gather"
            variants = [
                Variant(base, "baseline", _head_runner(lambda dev: _full_logits_logprobs),
                        "log_softmax(F.linear(hidden, weight).float()).gather(targets): the full logits, eager"),
                Variant(f"{base} (compile)", "baseline", _head_runner(compiled_or_skip(_full_logits_logprobs, quick)),
                        "torch.compile of the same"),
            ]
            compare = tuple(v.name for v in variants)
            variants += [
                Variant(f"memk:head_token_logprobs:{b}", "candidate", _head_runner(_memk_head(b)),
                        f"memk.kernels.head_token_logprobs(hidden, weight, targets, backend={b!r}): blocks of logits",
                        compare)
                for b in candidate_logprob_backends(backends)
            ]
            groups.append(Group(
                suite="logprob",
                family=f"head_token_logprobs fwd V{vocab} d{d_model} {dtype}",
                sweep_axis="tokens",
                sweep_value=n_tokens,
                dtype=dtype,
                params={"op": "head_token_logprobs", "pass": "fwd", "tokens": n_tokens, "vocab": vocab,
                        "d_model": d_model, "hidden_shape": [n_tokens, d_model], "weight_shape": [vocab, d_model],
                        "dtype": dtype},
                make_inputs=_head_inputs(n_tokens, vocab, d_model, dtype, seed=n_tokens + vocab + d_model + 1),
                check=_head_check(device),
                work=n_tokens,
                work_unit="tokens",
                flops=2.0 * n_tokens * vocab * d_model,  # the head's matmul
                floor=roofline.head_group_floor(),
                variants=variants,
            ))
    return groups


def default_head_shapes(device: torch.device, quick: bool) -> list[tuple[int, int, int]]:
    """(vocabulary, tokens, d_model) of the head_token_logprobs family."""
    if quick:
        return [(2048, 4096, 32)]
    if device.type == "cuda":
        return [(2048, 131072, 128), (50257, 16384, 768)]
    return [(2048, 16384, 128), (50257, 4096, 128)]
