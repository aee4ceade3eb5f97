"""The logprob suite's float64 truths: log p(target), the loss and their gradients in float64, a
chunk of rows at a time, so that tokens x V doubles never exist at once."""

from __future__ import annotations

import torch

CHECK_ELEMENTS = 2**24  # float64 elements per chunk of the reference (128 MB): never tokens x V doubles at once


def logprob_float64(logits: torch.Tensor, targets: torch.Tensor):
    """Yields (row slice, float64 log p(target), float64 softmax) chunk by chunk over flattened rows."""
    flat = logits.detach().reshape(-1, logits.shape[-1])
    flat_t = targets.reshape(-1)
    chunk = max(1, CHECK_ELEMENTS // logits.shape[-1])
    for start in range(0, flat.shape[0], chunk):
        rows = slice(start, min(start + chunk, flat.shape[0]))
        x = flat[rows].double()
        logp = torch.log_softmax(x, dim=-1)
        yield rows, logp.gather(-1, flat_t[rows].long().unsqueeze(-1)).squeeze(-1), logp.exp()


def linear_float64(inputs: dict) -> dict:
    """Mean cross-entropy of hidden @ weightᵀ and its gradients in float64, chunk by chunk; kept in the inputs."""
    if "float64" not in inputs:
        hidden, targets = inputs["copies"][0]
        h, w = hidden.detach().double(), inputs["weight"].detach().double()
        n_rows, vocab = h.shape[0], w.shape[0]
        chunk = max(1, CHECK_ELEMENTS // vocab)
        nll_sum, grad_h, grad_w = 0.0, torch.empty_like(h), torch.zeros_like(w)
        for start in range(0, n_rows, chunk):
            rows = slice(start, min(start + chunk, n_rows))
            logp = torch.log_softmax(h[rows] @ w.T, dim=-1)
            t = targets[rows].long().unsqueeze(-1)
            nll_sum -= logp.gather(-1, t).sum().item()
            d_logits = logp.exp().scatter_add_(-1, t, -torch.ones_like(t, dtype=logp.dtype)) / n_rows
            grad_h[rows] = d_logits @ w
            grad_w += d_logits.T @ h[rows]
        inputs["float64"] = {"loss": torch.tensor(nll_sum / n_rows, dtype=torch.float64), "grad_hidden": grad_h,
                             "grad_weight": grad_w}
    return inputs["float64"]


def head_logprobs_float64(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) of hidden @ weightᵀ in float64, chunk by chunk."""
    h, w, t = hidden.double(), weight.double(), targets
    chunk = max(1, CHECK_ELEMENTS // w.shape[0])
    return torch.cat([torch.log_softmax(h[i:i + chunk] @ w.T, dim=-1).gather(-1, t[i:i + chunk].unsqueeze(-1)).squeeze(-1)
                      for i in range(0, h.shape[0], chunk)])
