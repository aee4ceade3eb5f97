"""log p(target) straight from a model's last hidden states and its output head, a block of rows at a time.

A causal LM's logits for a batch are (tokens × V) floats: at V 50257 a batch of 8192 tokens is
1.6 GB in float32, and a log_softmax of them as much again: most of a forward pass's memory.
`head_token_logprobs` never holds them all: it multiplies the hidden states by the head's weight for a block of rows whose logits fit in
`block_bytes`, takes log p(target) of that block with the log-prob ops of `backend` (the fused
kernel by default where it builds: float32 arithmetic, exact at any logit offset), and moves on.
The logits are computed in the head weight's dtype, as the model's own head computes them; the
log-probabilities are float32 (float64 for float64 weights).

With moments=True it also returns, per row, the mean and standard deviation of log p(v) under
the model's own next-token distribution p (mean = -entropy), which Min-K%++ standardizes by.
"""

from __future__ import annotations

import torch

from .backends import default_logprob_backend, logprob_ops

DEFAULT_BLOCK_BYTES = 64 * 2**20  # logits of one block of rows, at float32 width: 333 rows at V 50257
# On a CPU, smaller: a block's logits are then still in the caches when the log-prob pass reads them,
# and the allocator reuses the block's memory from call to call instead of taking new pages from the
# OS (2 Xeon cores, N 16384, V 2048, d 128: 31 ms a call at 16 MB, 51 ms at 64 MB; V 50257: 226 and 268 ms).
CPU_BLOCK_BYTES = 16 * 2**20


def head_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    moments: bool = False,
    block_bytes: int | None = None,
    backend: str | None = None,
):
    """log p(targets) for hidden (N, d), head weight (V, d) [, bias (V,)], targets (N,) in [0, V).

    Returns logp (N,), or (logp, mean, std) with moments=True; float32 (float64 for float64
    weights). `backend` names memk.kernels' log-prob backend (default: the best for the device).
    block_bytes: the logits of one block of rows (default CPU_BLOCK_BYTES on a CPU, else DEFAULT_BLOCK_BYTES).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden must be (N, d) and weight (V, d) with the same d, got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must be (N,) for hidden of {hidden.shape[0]} rows, got {tuple(targets.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must be (V,) = ({weight.shape[0]},), got {tuple(bias.shape)}")
    if block_bytes is None:
        block_bytes = CPU_BLOCK_BYTES if hidden.device.type == "cpu" else DEFAULT_BLOCK_BYTES
    if block_bytes < 1:
        raise ValueError(f"block_bytes must be positive, got {block_bytes}")
    ops = logprob_ops(backend or default_logprob_backend(hidden.device))
    vocab = weight.shape[0]
    rows_per_block = max(1, block_bytes // (4 * vocab))
    hidden = hidden.to(weight.dtype)
    out_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    n = hidden.shape[0]
    logp = torch.empty(n, dtype=out_dtype, device=hidden.device)
    mean = torch.empty_like(logp) if moments else None
    std = torch.empty_like(logp) if moments else None
    # Without autograd, every block's logits go into one buffer: a new block of logits each time is
    # new memory from the OS, whose first write costs page faults (on a CPU, longer than the write).
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    buffer = None if grad else torch.empty(min(n, rows_per_block), vocab, dtype=weight.dtype, device=hidden.device)
    for start in range(0, n, rows_per_block):
        rows = slice(start, start + rows_per_block)
        if buffer is None:
            logits = torch.nn.functional.linear(hidden[rows], weight, bias)
        else:  # what F.linear computes, into the buffer
            logits = buffer[: hidden[rows].shape[0]]
            if bias is None:
                torch.mm(hidden[rows], weight.t(), out=logits)
            else:
                torch.addmm(bias, hidden[rows], weight.t(), out=logits)
        logp[rows] = ops.token_logprobs(logits, targets[rows])
        if moments:
            mean[rows], std[rows] = logprob_moments(logits)
        del logits
    return (logp, mean, std) if moments else logp


def logprob_moments(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of log p(v) under p = softmax(logits), over the last axis, in float32 or
    better; holds two float32 copies of the logits at most (log p and p)."""
    shape = logits.shape[:-1]
    logp = torch.log_softmax(logits if logits.dtype == torch.float64 else logits.float(), dim=-1)
    logp = logp.reshape(-1, logits.shape[-1])
    # Where p underflows to exactly 0 (and at -inf logits) this changes nothing but keeps 0 * inf out.
    logp.clamp_(min=-1e4)
    p = logp.exp()

    def row_dot(a, b):  # sum over v of a * b, as a batched matmul: no third copy
        return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).reshape(-1)

    mean = row_dot(p, logp)
    # Centred before squaring: E[(log p - mean)^2], not E[log p^2] - mean^2, which cancels badly.
    var = row_dot(p, logp.sub_(mean.unsqueeze(-1)).square_())
    return mean.reshape(shape), var.clamp_(min=0).sqrt().reshape(shape)
