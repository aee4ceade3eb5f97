"""GPT-2 in one file, as the paper trains it.

Pre-LayerNorm blocks, causal self-attention, a 4x GELU MLP, learned position
embeddings, and an output head tied to the token embedding; no dropout. Attention
and the loss go through memk.kernels by backend name, so the model never names an
implementation.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from memk import kernels


@dataclass(frozen=True)
class GPTConfig:
    n_layer: int = 1
    d_model: int = 32
    n_head: int = 2
    vocab_size: int = 2048
    seq_len: int = 64
    dropout: float = 0.0  # the paper trains without dropout; only 0.0 is supported

    def __post_init__(self):
        for name in ("n_layer", "d_model", "n_head", "vocab_size", "seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_head:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head}); pick n_head among "
                f"{[h for h in range(1, self.d_model + 1) if self.d_model % h == 0]}"
            )
        if self.dropout != 0.0:
            raise ValueError("dropout must be 0.0: memorization is measured on the deterministic model")

    @property
    def name(self) -> str:
        return f"L{self.n_layer}-d{self.d_model}-h{self.n_head}-V{self.vocab_size}-S{self.seq_len}"

    def to_dict(self) -> dict:
        return asdict(self)


def count_parameters(config: GPTConfig) -> int:
    """The parameter count bits-per-parameter divides by: every trainable parameter.

    Embeddings are included (token embedding V·d, shared with the output head and so
    counted once; position embedding S·d), as are all LayerNorm weights and biases and
    all linear biases. Computed from the config alone; equals the trainable parameters
    of GPT(config).
    """
    d, V, S, L = config.d_model, config.vocab_size, config.seq_len, config.n_layer
    layer_norm = 2 * d
    attention = (d * 3 * d + 3 * d) + (d * d + d)  # fused qkv projection, output projection
    mlp = (d * 4 * d + 4 * d) + (4 * d * d + d)
    block = 2 * layer_norm + attention + mlp
    return V * d + S * d + L * block + layer_norm  # + final LayerNorm


def training_flops_per_token(config: GPTConfig) -> float:
    """Training FLOPs per predicted token: 6 x (the matmul parameters + the tied head) plus the
    attention scores and values (12 L S d, PaLM's convention: causal mask not discounted)."""
    d, L = config.d_model, config.n_layer
    matmul_params = L * 12 * d * d + d * config.vocab_size
    return 6.0 * matmul_params + 12.0 * L * (config.seq_len - 1) * d


def training_flops_per_sequence(config: GPTConfig) -> float:
    """Training FLOPs per sequence of a batch: its seq_len - 1 predicted tokens."""
    return training_flops_per_token(config) * (config.seq_len - 1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, attention_backend: str):
        super().__init__()
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)
        self.attend = kernels.packed_attention(attention_backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.attend(self.qkv(x), self.n_head))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(config.d_model, 4 * config.d_model)
        self.proj = nn.Linear(4 * config.d_model, config.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, attention_backend: str):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model)
        self.attn = CausalSelfAttention(config, attention_backend)
        self.ln_2 = nn.LayerNorm(config.d_model)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TiedHead(torch.autograd.Function):
    """hidden (..., d) @ weight (V, d).T with the weight's gradient computed as (hidden^T g)^T.
    F.linear's backward computes g^T hidden instead: the same numbers, but CPU BLAS takes up to
    13x longer for it at d_model 8 (39 ms against 3 ms at V 2048, 4,032 rows: twice the whole step)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(hidden, weight)
        return hidden @ weight.t()  # under autocast, in its dtype

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        hidden, weight = ctx.saved_tensors
        rows = grad.reshape(-1, grad.shape[-1])  # the dtype the forward's product took
        grad_hidden = (grad @ weight.to(grad.dtype)).to(hidden.dtype)
        grad_weight = (hidden.reshape(-1, hidden.shape[-1]).to(grad.dtype).t() @ rows).t().to(weight.dtype)
        return grad_hidden, grad_weight


def tied_head(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The logits of the output head tied to the token embedding: TiedHead on the CPU, F.linear elsewhere."""
    return TiedHead.apply(hidden, weight) if hidden.device.type == "cpu" else F.linear(hidden, weight)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, attention_backend: str = "sdpa", logprob_backend: str = "reference"):
        """Backends are memk.kernels names; kernels.default_*_backend(device) picks the best for a device."""
        super().__init__()
        self.config = config
        self.attention_backend = attention_backend
        self.logprob_backend = logprob_backend
        self.logprob = kernels.logprob_ops(self.logprob_backend)
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.wpe = nn.Embedding(config.seq_len, config.d_model)
        self.blocks = nn.ModuleList(Block(config, self.attention_backend) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.d_model)
        self.apply(self._init_weights)
        # GPT-2's scaled init for the projections that write into the residual stream.
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits (batch, t, V) for token ids (batch, t), t <= seq_len; position i sees tokens 0..i."""
        return tied_head(self.hidden_states(idx), self.wte.weight)

    def hidden_states(self, idx: torch.Tensor) -> torch.Tensor:
        """The final (layer-normed) hidden states (batch, t, d) the output head reads."""
        if idx.dim() != 2 or idx.shape[1] > self.config.seq_len:
            raise ValueError(f"idx must be (batch, t) with t <= {self.config.seq_len}, got {tuple(idx.shape)}")
        pos = torch.arange(idx.shape[1], device=idx.device)
        h = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            h = block(h)
        return self.ln_f(h)

    def next_token_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (batch, S-1, V) predicting tokens 1..S-1 of x (batch, S): the tokens memk codes."""
        return self.forward(x[:, :-1])

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy (nats) over tokens 1..S-1 of x."""
        return self.logprob.cross_entropy(self.next_token_logits(x), x[:, 1:])

    def sequence_bits(self, x: torch.Tensor) -> torch.Tensor:
        """-log2 p(x_1..x_{S-1} | x_0, model) per sequence, float64 (batch,)."""
        return self.logprob.sequence_bits(self.next_token_logits(x), x[:, 1:])
