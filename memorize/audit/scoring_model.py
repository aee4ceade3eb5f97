"""What `memk audit` needs of a causal LM (ScoringModel), and log p(target) per position from it without
holding a batch's logits whole. models.py makes ScoringModels (Hugging Face, PEFT adapters, memk checkpoints).

A ScoringModel holds its tokenizer's encode, the token every text is coded after (the start token:
the tokenizer's BOS, else its EOS; EOT for memk), its context length, and the final hidden states
and output head that memk.kernels' head_token_logprobs turns into log-probs a block of rows at a
time; where the head alone does not give the model's logits (head_weight None), the whole model's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from memk import kernels


@dataclass
class ScoringModel:
    spec: str  # as the user named it
    kind: str  # "huggingface" or "memk"
    module: torch.nn.Module
    encode: Callable[[list[str]], list[list[int]]]  # texts -> token ids, no special tokens added
    start_id: int  # the token each text is coded after
    start_token: str
    context: int  # positions the model attends to: the sliding window's width
    hidden: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # ids, mask (B, T) -> final hidden (B, T, d)
    head_weight: torch.Tensor | None  # (V, d); None where the logits must come from the whole model
    head_bias: torch.Tensor | None
    fingerprint: dict = field(default_factory=dict)  # what identifies these weights, for the resume key
    base_source: str | None = None  # a PEFT adapter's base, as it was loaded: the default reference
    details: dict = field(default_factory=dict)  # more of describe(): an adapter's base and kind

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    def describe(self) -> dict:
        return {"spec": self.spec, "kind": self.kind, "start_token": self.start_token, "start_id": self.start_id,
                "context": self.context, "parameters": self.parameters, "dtype": str(self.head_dtype).split(".")[-1],
                "vocab_size": self.vocab_size, **self.details}

    @property
    def head_dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype

    @property
    def vocab_size(self) -> int:
        if self.head_weight is not None:
            return int(self.head_weight.shape[0])
        return int(self.module.get_output_embeddings().weight.shape[0])


def token_logprobs(model: ScoringModel, ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor,
                   targets: torch.Tensor, moments: bool):
    """log p(targets) at flat positions `rows` of the batch ids (B, T); with moments, also Min-K%++'s mean and std."""
    if model.head_weight is not None:
        hidden = model.hidden(ids, mask)
        hidden = hidden.reshape(-1, hidden.shape[-1])[rows]
        return kernels.head_token_logprobs(hidden, model.head_weight, targets, model.head_bias, moments=moments)
    logits = model.module(input_ids=ids, attention_mask=mask, use_cache=False).logits
    logits = logits.reshape(-1, logits.shape[-1])[rows]
    logp = kernels.logprob_ops(kernels.default_logprob_backend(logits.device)).token_logprobs(logits, targets)
    return (logp, *kernels.logprob_moments(logits)) if moments else logp
