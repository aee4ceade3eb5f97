"""The attention suite: memk's packed causal attention against torch SDPA with each of its
backends forced, both on the model's layout (the fused qkv projection in, heads merged out).

Each group is one pass (fwd or fwd+bwd), head size, head count and dtype at one sequence length;
its check is the written-out softmax(q kᵀ/√d + mask) v in float64 and its autograd gradient.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from memk.kernels import reference

from .case import (
    TORCH_DTYPES,
    Cycle,
    Group,
    Runner,
    Skip,
    Variant,
    candidate_attention_backends,
    max_rel_err,
    packed_attention_or_skip,
    rel_tolerance,
    rotations,
)

_SDPA_BACKENDS = ("MATH", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION")


def _sdpa_packed(backend_name: str) -> Callable:
    """The model's path without memk: split the qkv projection into heads, SDPA with one
    backend forced, merge the heads back (the copies are part of the cost)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name, None)
    if backend is None:
        raise Skip(f"torch {torch.__version__} has no SDPBackend.{backend_name}")

    def attend(qkv: torch.Tensor, n_head: int) -> torch.Tensor:
        with sdpa_kernel(backend):
            q, k, v = reference.split_heads(qkv, n_head)
            return reference.merge_heads(F.scaled_dot_product_attention(q, k, v, is_causal=True))

    return attend


def _attention_inputs(batch: int, seq: int, n_head: int, head_dim: int, dtype: str, backward: bool, seed: int):
    def make(device: torch.device) -> dict:
        gen = torch.Generator(device=device).manual_seed(seed)
        d_model = n_head * head_dim
        bytes_per_copy = batch * seq * 3 * d_model * torch.empty((), dtype=TORCH_DTYPES[dtype]).element_size()
        copies = [
            torch.randn(batch, seq, 3 * d_model, generator=gen, device=device).to(TORCH_DTYPES[dtype]).requires_grad_(backward)
            for _ in range(rotations(bytes_per_copy, device))
        ]
        upstream = torch.randn(batch, seq, d_model, generator=gen, device=device).to(TORCH_DTYPES[dtype])
        return {"copies": copies, "upstream": upstream, "n_head": n_head}

    return make


def _attention_check(backward: bool, device: torch.device):
    """Against the written-out softmax(q kᵀ/√d + mask) v in float64, and its autograd gradient."""

    def check(inputs: dict, outputs: dict) -> dict[str, tuple[float, float]]:
        # Sequences are independent: the first few (up to 2^26 float64 scores) stand for all of them.
        batch, seq, _ = inputs["copies"][0].shape
        n = max(1, min(batch, 2**26 // (inputs["n_head"] * seq * seq)))
        qkv = inputs["copies"][0][:n].detach().double().requires_grad_(backward)
        expected = reference.packed_causal_attention(qkv, inputs["n_head"])
        out = outputs["out"]
        if out.shape[0] != batch:
            return {"output": (float("inf"), 0.0)}
        result = {"output": (max_rel_err(out[:n], expected), rel_tolerance(out.dtype, device, matmul=True))}
        if backward:
            expected.backward(inputs["upstream"][:n].double())
            grad = outputs["grad"]
            err = max_rel_err(grad[:n], qkv.grad) if grad is not None and grad.shape[0] == batch else float("inf")
            result["grad_qkv"] = (err, rel_tolerance(inputs["copies"][0].dtype, device, matmul=True))
        return result

    return check


def sdpa_refusal(backend: str, device: torch.device, exc: RuntimeError) -> str:
    """Why a forced SDPA backend cannot run these inputs here, in words (torch says "No viable backend")."""
    first = str(exc).strip().splitlines()[0][:200]
    if device.type == "cpu" and "No viable backend" in first:
        return f"{backend} runs on CUDA only (torch has no CPU kernel for it)"
    return f"{backend} refused these inputs on {device.type}: {first}"


def _packed_runner(get_fn: Callable[[torch.device], Callable], backward: bool, trial: str | None):
    """trial: the name of a forced SDPA backend, tried once before anything is timed, so that
    one that cannot run these inputs is reported as skipped with the reason."""

    def build(inputs: dict, device: torch.device) -> Runner:
        fn = get_fn(device)
        n_head, upstream = inputs["n_head"], inputs["upstream"]
        cycle = Cycle(inputs["copies"])
        if trial:
            # SDPA raises when the forced backend does not support these inputs (device, dtype,
            # head size): that is "not available here", not a failure of the suite.
            try:
                with torch.no_grad():
                    fn(inputs["copies"][0], n_head)
            except RuntimeError as exc:
                raise Skip(sdpa_refusal(trial, device, exc)) from exc

        def call():
            qkv = cycle.next()
            y = fn(qkv, n_head)
            if backward:
                qkv.grad = None
                y.backward(upstream)
            return y

        def outputs():
            qkv = inputs["copies"][0]
            qkv.grad = None
            y = fn(qkv, n_head)
            result = {"out": y.detach()}
            if backward:
                y.backward(upstream)
                result["grad"] = qkv.grad
                qkv.grad = None
            return result

        def close():
            for qkv in inputs["copies"]:
                qkv.grad = None

        return Runner(call, outputs, close, reset=close)

    return build


def default_shapes(quick: bool) -> list[tuple[int, int]]:
    """(seq, head_dim) of the default sweep."""
    seqs = (64,) if quick else (64, 1024)
    head_dims = (32, 64) if quick else (32, 64, 128)
    return [(seq, head_dim) for head_dim in head_dims for seq in seqs]


def attention_groups(device: torch.device, dtypes: list[str], quick: bool, backends: list[str] | None = None,
                     interpreter: bool = False, shapes: list[tuple[int, int]] | None = None,
                     tokens: int | None = None, n_head: int | None = None) -> list[Group]:
    """The suite's groups: both passes at each head size and sequence length, per dtype.

    backends: the memk attention backends to compare (default: every registered one but torch's).
    interpreter: run memk's Triton kernels on CPU under TRITON_INTERPRET=1 (case.py).
    shapes ((seq, head_dim) pairs), tokens (per call: batch = tokens // seq), n_head: a selection
    (cases.py's presets); default the sweep for the device.
    """
    if device.type == "cuda":
        default_heads, default_tokens = 8, 131072  # seq 64: batch 2048, the paper's batch; seq 1024: batch 128
    else:
        default_heads, default_tokens = 4, 4096
    n_head = n_head or default_heads
    tokens = tokens or default_tokens
    shapes = default_shapes(quick) if shapes is None else shapes
    groups = []
    for dtype in [d for d in dtypes if d in ("float32", "bfloat16", "float16")]:
        for backward in (False, True):
            pass_name = "fwd+bwd" if backward else "fwd"
            for seq, head_dim in shapes:
                batch = max(1, tokens // seq)
                variants = [
                    Variant(f"sdpa:{b.lower()}", "baseline",
                            _packed_runner(lambda dev, b=b: _sdpa_packed(b), backward, trial=f"SDPBackend.{b}"),
                            f"split heads, SDPA with SDPBackend.{b} forced, merge heads")
                    for b in _SDPA_BACKENDS
                ]
                compare = tuple(v.name for v in variants)
                variants += [
                    Variant(f"memk:{name}", "candidate",
                            _packed_runner(lambda dev, name=name, dtype=dtype:
                                           packed_attention_or_skip(name, dev, interpreter, dtype), backward, trial=None),
                            f"memk.kernels.packed_attention({name!r}) on the qkv projection output", compare)
                    for name in candidate_attention_backends(backends)
                ]
                # causal FLOPs (half the square), FlashAttention's convention; backward = 2.5x forward
                fwd_flops = 2.0 * batch * n_head * seq * seq * head_dim
                groups.append(Group(
                    suite="attention",
                    family=f"packed causal {pass_name} D{head_dim} H{n_head} {dtype}",
                    sweep_axis="seq",
                    sweep_value=seq,
                    dtype=dtype,
                    params={"pass": pass_name, "batch": batch, "seq": seq, "n_head": n_head, "head_dim": head_dim,
                            "qkv_shape": [batch, seq, 3 * n_head * head_dim], "dtype": dtype, "causal": True},
                    make_inputs=_attention_inputs(batch, seq, n_head, head_dim, dtype, backward, seed=seq * 1000 + head_dim),
                    check=_attention_check(backward, device),
                    work=batch * seq,
                    work_unit="tokens",
                    flops=fwd_flops * (3.5 if backward else 1.0),
                    variants=variants,
                ))
    return groups
