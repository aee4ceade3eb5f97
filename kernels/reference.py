"""Plain-PyTorch reference implementations of memk's ops.

These are the simple, obviously-correct versions every fused kernel is tested
against and the `reference` backend the model can always fall back on by name.
Arithmetic is float32 (or the input's precision if higher), whatever the input dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LN2 = math.log(2.0)


def check_logits_targets(logits: torch.Tensor, targets: torch.Tensor) -> None:
    """Raise a ValueError naming the problem if logits (..., V) and targets (...) do not fit."""
    if not isinstance(logits, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise TypeError("logits and targets must be torch tensors")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor of class indices, got {targets.dtype}")
    if logits.dim() < 1 or logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"logits of shape (..., V) need targets of shape (...): got logits {tuple(logits.shape)} "
            f"and targets {tuple(targets.shape)}"
        )
    if logits.device != targets.device:
        raise ValueError(f"logits are on {logits.device} but targets on {targets.device}; move both to one device")


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    return logits if logits.dtype == torch.float64 else logits.float()


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) per position, natural log, float32 (float64 for float64 logits)."""
    check_logits_targets(logits, targets)
    vocab = logits.shape[-1]
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= vocab):
        raise ValueError(f"targets must lie in [0, {vocab}): got values in [{int(targets.min())}, {int(targets.max())}]")
    logp = torch.log_softmax(_upcast(logits), dim=-1)
    return logp.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)


def cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, reduction: str = "mean"
) -> torch.Tensor:
    """torch.nn.functional.cross_entropy over the last axis, computed in float32 or better."""
    check_logits_targets(logits, targets)
    vocab = logits.shape[-1]
    return F.cross_entropy(
        _upcast(logits).reshape(-1, vocab), targets.long().reshape(-1), ignore_index=ignore_index, reduction=reduction
    ).reshape(targets.shape if reduction == "none" else ())


def sequence_bits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log2 p(x) per sequence: logits (B, T, V), targets (B, T) -> float64 (B,), summed in float64."""
    if logits.dim() != 3:
        raise ValueError(f"sequence_bits needs logits of shape (batch, tokens, V), got {tuple(logits.shape)}")
    return -(token_logprobs(logits, targets).double().sum(dim=-1)) / LN2


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, scale: float | None = None):
    """softmax(q kᵀ · scale + mask) v for (batch, heads, seq, head_dim), written out in full."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    if causal:
        seq_q, seq_k = q.shape[-2], k.shape[-2]
        mask = torch.ones(seq_q, seq_k, dtype=torch.bool, device=q.device).tril(diagonal=seq_k - seq_q)
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores.float(), dim=-1).to(v.dtype), v)


def split_heads(qkv: torch.Tensor, n_head: int):
    """(batch, seq, 3·d_model) -> q, k, v each (batch, n_head, seq, head_dim)."""
    batch, seq, three_d = qkv.shape
    head_dim = three_d // (3 * n_head)
    qkv = qkv.view(batch, seq, 3, n_head, head_dim).permute(2, 0, 3, 1, 4)
    return qkv[0], qkv[1], qkv[2]


def merge_heads(y: torch.Tensor) -> torch.Tensor:
    """(batch, n_head, seq, head_dim) -> (batch, seq, n_head·head_dim)."""
    batch, n_head, seq, head_dim = y.shape
    return y.transpose(1, 2).reshape(batch, seq, n_head * head_dim)


def packed_causal_attention(qkv: torch.Tensor, n_head: int) -> torch.Tensor:
    """Causal attention from the fused qkv projection (batch, seq, 3·d) to (batch, seq, d)."""
    return merge_heads(attention(*split_heads(qkv, n_head), causal=True))


# torch's CPU flash attention takes 4-8x longer for its backward in bfloat16 or float16 than in
# float32 (torch 2.13, Xeon with AVX-512 BF16 and AMX; bench/results/precision-step-cpu-2core.json):
# on the CPU, attention over 16-bit inputs runs in float32, its output rounded to their dtype once.
CPU_ATTENTION_IN_FLOAT32 = (torch.bfloat16, torch.float16)


def packed_causal_attention_sdpa(qkv: torch.Tensor, n_head: int) -> torch.Tensor:
    """Same as packed_causal_attention, through torch's scaled_dot_product_attention."""
    if qkv.device.type == "cpu" and qkv.dtype in CPU_ATTENTION_IN_FLOAT32:
        with torch.autocast("cpu", enabled=False):  # autocast would run it in 16 bits again
            return _sdpa(qkv.float(), n_head).to(qkv.dtype)
    return _sdpa(qkv, n_head)


def _sdpa(qkv: torch.Tensor, n_head: int) -> torch.Tensor:
    q, k, v = split_heads(qkv, n_head)
    return merge_heads(F.scaled_dot_product_attention(q, k, v, is_causal=True))
