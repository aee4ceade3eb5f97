"""GPT-2 in one file, as the paper trains it.

Pre-LayerNorm blocks, causal self-attention, a 4x GELU MLP, learned position
embeddings, and an output head tied to the token embedding; no dropout. Attention
and the loss go through memk.kernels by backend name, so the model never names an
implementation.

The transformer is written once: its layers, names and shapes (`gpt_layers`), and its
forward (`gpt_logits`) over a name -> tensor mapping and a few `TransformerOps` (linear,
LayerNorm, embeddings, attention, head). `GPT`, a plain nn.Module, holds the layers as
torch.nn modules and runs the forward with `PlainOps`; memorize/ensemble.py stacks the
same layers for K GPTs and runs the same forward with its batched ops.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Mapping, Protocol

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


# ---------------------------------------------------------------------------------------
# The transformer, written once: its layers (names and shapes) and its forward, over a few
# operations that one GPT (PlainOps, below) and K stacked GPTs (memorize/ensemble.py) each supply.

LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default


@dataclass(frozen=True)
class Layer:
    """One layer: its parameters are `name`.weight, of `shape`, and (but for an embedding) `name`.bias."""

    name: str
    kind: str  # "embedding" (shape: rows, d), "layer_norm" (d,) or "linear" (out, in: nn.Linear's weight)
    shape: tuple[int, ...]

    @property
    def parameters(self) -> dict[str, tuple[int, ...]]:
        if self.kind == "embedding":
            return {f"{self.name}.weight": self.shape}
        return {f"{self.name}.weight": self.shape, f"{self.name}.bias": self.shape[:1]}

    def module(self) -> nn.Module:
        """The torch.nn module GPT holds it in (its constructor draws the default init, as GPT always has)."""
        if self.kind == "embedding":
            return nn.Embedding(*self.shape)
        if self.kind == "layer_norm":
            return nn.LayerNorm(self.shape, eps=LAYER_NORM_EPS)
        return nn.Linear(self.shape[1], self.shape[0])


def embedding_layers(config: GPTConfig) -> list[Layer]:
    return [Layer("wte", "embedding", (config.vocab_size, config.d_model)),
            Layer("wpe", "embedding", (config.seq_len, config.d_model))]


def block_layers(d: int) -> list[Layer]:
    """One block's layers, by their names inside the block."""
    return [Layer("ln_1", "layer_norm", (d,)), Layer("attn.qkv", "linear", (3 * d, d)),
            Layer("attn.proj", "linear", (d, d)), Layer("ln_2", "layer_norm", (d,)),
            Layer("mlp.fc", "linear", (4 * d, d)), Layer("mlp.proj", "linear", (d, 4 * d))]


def final_layers(d: int) -> list[Layer]:
    return [Layer("ln_f", "layer_norm", (d,))]


def gpt_layers(config: GPTConfig) -> list[Layer]:
    """Every layer of GPT(config), in the order it builds them (its init draws in this order)."""
    blocks = [Layer(f"blocks.{i}.{layer.name}", layer.kind, layer.shape)
              for i in range(config.n_layer) for layer in block_layers(config.d_model)]
    return [*embedding_layers(config), *blocks, *final_layers(config.d_model)]


def parameter_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """GPT(config)'s state dict, name -> shape, in its order: what an ensemble stacks."""
    return {name: shape for layer in gpt_layers(config) for name, shape in layer.parameters.items()}


class TransformerOps(Protocol):
    """The operations whose form depends on how the parameters are held (one GPT's, or K stacked);
    the rest of the forward is gpt_logits'. Parameters come as gpt_layers names them."""

    def embed(self, wte: torch.Tensor, wpe: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Token embeddings of idx plus the position embeddings of positions 0..t-1."""

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor: ...

    def layer_norm(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor: ...

    def attend(self, qkv: torch.Tensor, n_head: int) -> torch.Tensor:
        """Causal self-attention of the packed q, k, v of each sequence."""

    def head(self, hidden: torch.Tensor, wte: torch.Tensor) -> torch.Tensor:
        """Logits of the output head tied to the token embedding."""


Parameters = Mapping[str, torch.Tensor]


def gpt_block(ops: TransformerOps, p: Parameters, h: torch.Tensor, n_head: int, prefix: str = "") -> torch.Tensor:
    """One pre-LayerNorm block: causal self-attention, then a 4x GELU MLP, each added to the residual
    stream; its parameters are p[prefix + a name of block_layers]."""
    def layer(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return p[f"{prefix}{name}.weight"], p[f"{prefix}{name}.bias"]

    qkv = ops.linear(ops.layer_norm(h, *layer("ln_1")), *layer("attn.qkv"))
    h = h + ops.linear(ops.attend(qkv, n_head), *layer("attn.proj"))
    u = ops.linear(ops.layer_norm(h, *layer("ln_2")), *layer("mlp.fc"))
    return h + ops.linear(F.gelu(u, approximate="tanh"), *layer("mlp.proj"))


def gpt_hidden_states(ops: TransformerOps, p: Parameters, config: GPTConfig, idx: torch.Tensor) -> torch.Tensor:
    """The final (layer-normed) hidden states the output head reads: embeddings, the blocks, ln_f."""
    h = ops.embed(p["wte.weight"], p["wpe.weight"], idx)
    for i in range(config.n_layer):
        h = gpt_block(ops, p, h, config.n_head, f"blocks.{i}.")
    return ops.layer_norm(h, p["ln_f.weight"], p["ln_f.bias"])


def gpt_logits(ops: TransformerOps, p: Parameters, config: GPTConfig, idx: torch.Tensor) -> torch.Tensor:
    """The logits of token ids idx: the hidden states through the head tied to the token embedding."""
    return ops.head(gpt_hidden_states(ops, p, config, idx), p["wte.weight"])


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


class PlainOps:
    """TransformerOps of one GPT: torch.nn.functional's, as nn.Embedding, nn.Linear and nn.LayerNorm call
    them; the attention of a memk.kernels backend; the tied head."""

    def __init__(self, attend: Callable[[torch.Tensor, int], torch.Tensor]):
        self.attend = attend

    @staticmethod
    def embed(wte: torch.Tensor, wpe: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, wte) + F.embedding(torch.arange(idx.shape[1], device=idx.device), wpe)

    linear = staticmethod(F.linear)
    head = staticmethod(tied_head)

    @staticmethod
    def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, weight.shape, weight, bias, LAYER_NORM_EPS)


def add_layers(owner: nn.Module, layers: list[Layer]) -> None:
    """Each layer's module under `owner` at its dotted name (plain containers in between), in order."""
    for layer in layers:
        *path, leaf = layer.name.split(".")
        parent = owner
        for part in path:
            if part not in parent._modules:
                parent.add_module(part, nn.Module())
            parent = parent._modules[part]
        parent.add_module(leaf, layer.module())


class Block(nn.Module):
    """One block's layers (block_layers); called on hidden states (batch, t, d), it is gpt_block."""

    def __init__(self, config: GPTConfig, ops: PlainOps):
        super().__init__()
        self.n_head, self.ops = config.n_head, ops
        add_layers(self, block_layers(config.d_model))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return gpt_block(self.ops, dict(self.named_parameters()), h, self.n_head)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, attention_backend: str = "sdpa", logprob_backend: str = "reference"):
        """Backends are memk.kernels names; kernels.default_*_backend(device) picks the best for a device."""
        super().__init__()
        self.config = config
        self.attention_backend = attention_backend
        self.logprob_backend = logprob_backend
        self.logprob = kernels.logprob_ops(self.logprob_backend)
        self.ops = PlainOps(kernels.packed_attention(self.attention_backend))
        # gpt_layers' modules, in its order: wte and wpe, the blocks (a ModuleList: model.blocks[i]), ln_f
        add_layers(self, embedding_layers(config))
        self.blocks = nn.ModuleList(Block(config, self.ops) for _ in range(config.n_layer))
        add_layers(self, final_layers(config.d_model))
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
        self._check(idx)
        return gpt_logits(self.ops, dict(self.named_parameters()), self.config, idx)

    def hidden_states(self, idx: torch.Tensor) -> torch.Tensor:
        """The final (layer-normed) hidden states (batch, t, d) the output head reads."""
        self._check(idx)
        return gpt_hidden_states(self.ops, dict(self.named_parameters()), self.config, idx)

    def _check(self, idx: torch.Tensor) -> None:
        if idx.dim() != 2 or idx.shape[1] > self.config.seq_len:
            raise ValueError(f"idx must be (batch, t) with t <= {self.config.seq_len}, got {tuple(idx.shape)}")

    def next_token_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (batch, S-1, V) predicting tokens 1..S-1 of x (batch, S): the tokens memk codes."""
        return self.forward(x[:, :-1])

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy (nats) over tokens 1..S-1 of x."""
        return self.logprob.cross_entropy(self.next_token_logits(x), x[:, 1:])

    def sequence_bits(self, x: torch.Tensor) -> torch.Tensor:
        """-log2 p(x_1..x_{S-1} | x_0, model) per sequence, float64 (batch,)."""
        return self.logprob.sequence_bits(self.next_token_logits(x), x[:, 1:])
