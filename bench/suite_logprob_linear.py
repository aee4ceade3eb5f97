"""The logprob suite's linear_cross_entropy family: from the last hidden states and the classifier
weight to the mean loss and both gradients, so that libraries that fuse the classifier matmul into
the loss (cut-cross-entropy, Liger-Kernel's fused linear cross-entropy) compare with memk's
cross_entropy after F.linear on equal terms. Checked against the float64 loss and gradients.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from . import anchors
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
)
from .compiled import compiled_or_skip
from .logprob_float64 import linear_float64


def _linear_inputs(n_tokens: int, vocab: int, d_model: int, dtype: str, seed: int):
    def make(device: torch.device) -> dict:
        gen = torch.Generator(device=device).manual_seed(seed)
        torch_dtype = TORCH_DTYPES[dtype]
        bytes_per_copy = n_tokens * (d_model + vocab) * torch.empty((), dtype=torch_dtype).element_size()
        copies = []
        for _ in range(rotations(bytes_per_copy, device)):
            hidden = torch.randn(n_tokens, d_model, generator=gen, device=device).to(torch_dtype).requires_grad_()
            targets = torch.randint(0, vocab, (n_tokens,), generator=gen, device=device)
            copies.append((hidden, targets))
        # weight scaled so that the logits have a trained model's spread (std 3), as in the other groups
        weight = (torch.randn(vocab, d_model, generator=gen, device=device) * (3 / math.sqrt(d_model)))
        return {"copies": copies, "weight": weight.to(torch_dtype).requires_grad_()}

    return make


def _linear_check(device: torch.device):
    """Against the float64 loss and gradients: d loss / d logits = (softmax - onehot) / N, through the matmul."""

    def check(inputs: dict, outputs: dict) -> dict[str, tuple[float, float]]:
        ref = linear_float64(inputs)
        dtype = inputs["weight"].dtype
        grad_h, grad_w = outputs["grad_hidden"], outputs["grad_weight"]
        # The variants round the logits (or the matmul's inputs) to the 16-bit dtype; the
        # reference does not: every output is allowed that dtype's error.
        tol = rel_tolerance(dtype, device, matmul=True)
        return {
            "output": (max_rel_err(outputs["out"], ref["loss"]), tol),
            "grad_hidden": (max_rel_err(grad_h, ref["grad_hidden"]) if grad_h is not None else float("inf"), tol),
            "grad_weight": (max_rel_err(grad_w, ref["grad_weight"]) if grad_w is not None else float("inf"), tol),
        }

    return check


def _linear_runner(get_fn: Callable[[torch.device], Callable]) -> Callable[[dict, torch.device], Runner]:
    """fn(hidden, weight, targets) -> mean loss, forward and backward to both hidden and weight."""

    def build(inputs: dict, device: torch.device) -> Runner:
        fn = get_fn(device)
        cycle = Cycle(inputs["copies"])
        weight = inputs["weight"]

        def clear():
            weight.grad = None
            for hidden, _ in inputs["copies"]:
                hidden.grad = None

        def call():
            hidden, targets = cycle.next()
            hidden.grad = weight.grad = None
            loss = fn(hidden, weight, targets)
            loss.backward()
            return loss

        def outputs():
            hidden, targets = inputs["copies"][0]
            clear()
            loss = fn(hidden, weight, targets)
            loss.backward()
            result = {"out": loss.detach(), "grad_hidden": hidden.grad, "grad_weight": weight.grad}
            clear()
            return result

        return Runner(call, outputs, clear, reset=clear)

    return build


def _linear_then(loss: Callable) -> Callable:
    return lambda hidden, weight, targets: loss(F.linear(hidden, weight), targets)


def linear_groups(device: torch.device, dtypes: list[str], quick: bool, shapes: list[tuple[int, int, int]],
                   backends: list[str] | None) -> list[Group]:
    """Hidden states and classifier weight in, mean loss and both gradients out (fwd+bwd only)."""
    groups = []
    for dtype in [d for d in dtypes if d in ("bfloat16", "float16")]:  # anchors' float32 matmuls round like TF32
        for vocab, n_tokens, d_model in shapes:
            eager = _linear_then(F.cross_entropy)
            variants = [
                Variant("linear+F.cross_entropy", "baseline", _linear_runner(lambda dev, eager=eager: eager),
                        "F.cross_entropy(F.linear(hidden, weight), targets), eager"),
                Variant("linear+F.cross_entropy (compile)", "baseline",
                        _linear_runner(compiled_or_skip(eager, quick)),
                        "torch.compile of the same"),
                Variant("liger:fused_linear_cross_entropy", "baseline",
                        _linear_runner(anchors.liger_fused_linear_cross_entropy),
                        "liger_kernel.transformers.LigerFusedLinearCrossEntropyLoss()(weight, hidden, targets)"),
                Variant("cce:linear_cross_entropy", "baseline", _linear_runner(anchors.cce_linear_cross_entropy),
                        "cut_cross_entropy.linear_cross_entropy(hidden, weight, targets), default impl and filtering"),
            ]
            compare = tuple(v.name for v in variants)
            variants += [
                Variant(f"linear+memk:{b}", "candidate",
                        _linear_runner(lambda dev, b=b: _linear_then(logprob_ops_or_skip(b).cross_entropy)),
                        f"memk.kernels.logprob_ops({b!r}).cross_entropy(F.linear(hidden, weight), targets)", compare)
                for b in candidate_logprob_backends(backends)
            ]
            groups.append(Group(
                suite="logprob",
                family=f"linear_cross_entropy fwd+bwd V{vocab} d{d_model} {dtype}",
                sweep_axis="tokens",
                sweep_value=n_tokens,
                dtype=dtype,
                params={"op": "linear_cross_entropy", "pass": "fwd+bwd", "tokens": n_tokens, "vocab": vocab,
                        "d_model": d_model, "hidden_shape": [n_tokens, d_model], "weight_shape": [vocab, d_model],
                        "dtype": dtype},
                make_inputs=_linear_inputs(n_tokens, vocab, d_model, dtype, seed=n_tokens + vocab + d_model),
                check=_linear_check(device),
                work=n_tokens,
                work_unit="tokens",
                # the classifier matmul forward and its two gradients
                flops=6.0 * n_tokens * vocab * d_model,
                variants=variants,
            ))
    return groups


def default_linear_shapes(device: torch.device, quick: bool) -> list[tuple[int, int, int]]:
    """(vocabulary, tokens, d_model) of the linear_cross_entropy family: the paper's V, a mid-sized model's d."""
    if quick:
        return [(2048, 4096, 32)]
    return [(2048, 131072 if device.type == "cuda" else 16384, 128)]
