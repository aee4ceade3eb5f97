"""K GPTs of one shape trained as one: every parameter stacked on a leading member axis.

`EnsembleGPT` holds K members of one GPTConfig. Each parameter of GPT (memorize/model.py)
becomes one tensor of shape (K, ...) under the same name, so member k's plain GPT state
dict is `{name: tensor[k]}`: `export_member(k)` gives it and `import_member(k, state)`
takes one. The projections run as batched matrix products (torch.baddbmm), LayerNorms
and embeddings per member; attention and the log-prob ops are memk.kernels' own,
unchanged, because they work per sequence and per row: the ensemble hands them K·batch
sequences. Members never mix: member k's outputs depend on member k's weights and inputs
only, so the gradient of the sum of the members' losses is, member by member, each
member's own gradient.

`compiled_losses` is member_losses under torch.compile, or compiled and replayed as CUDA
graphs: the ways the ensemble executor may run it on CUDA.

`EnsembleAdamW` is torch.optim.AdamW's update (decoupled weight decay, bias corrections,
eps) written on the stacked tensors with a learning rate, weight decay, step count and
gradient-norm clip per member, and an `active` mask: members outside it are not touched.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from memk import kernels

from .model import GPTConfig

IGNORE = -100  # target of a padding row: the log-prob ops skip it (their ignore_index)
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, as GPT's LayerNorms use


def parameter_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """GPT(config)'s state dict, name -> shape, in its order (tests check it against GPT itself)."""
    d, V, S = config.d_model, config.vocab_size, config.seq_len
    shapes = {"wte.weight": (V, d), "wpe.weight": (S, d)}
    for i in range(config.n_layer):
        b = f"blocks.{i}."
        shapes.update({
            b + "ln_1.weight": (d,), b + "ln_1.bias": (d,),
            b + "attn.qkv.weight": (3 * d, d), b + "attn.qkv.bias": (3 * d,),
            b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
            b + "ln_2.weight": (d,), b + "ln_2.bias": (d,),
            b + "mlp.fc.weight": (4 * d, d), b + "mlp.fc.bias": (4 * d,),
            b + "mlp.proj.weight": (d, 4 * d), b + "mlp.proj.bias": (d,),
        })
    shapes.update({"ln_f.weight": (d,), "ln_f.bias": (d,)})
    return shapes


def _per_member(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A (K,) or (K, n) tensor shaped to broadcast against `like` (K, ...) along its member axis."""
    return t.reshape(t.shape + (1,) * (like.dim() - t.dim()))


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Member k's nn.Linear on member k's rows: x (K, B, T, in), weight (K, out, in), bias (K, out)."""
    K, B, T, n_in = x.shape
    y = torch.baddbmm(bias.unsqueeze(1), x.reshape(K, B * T, n_in), weight.transpose(1, 2))
    return y.reshape(K, B, T, -1)


def _layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Member k's nn.LayerNorm: normalise each row, then member k's scale and shift."""
    normed = F.layer_norm(x, x.shape[-1:], eps=LAYER_NORM_EPS)
    return torch.addcmul(bias[:, None, None, :], normed, weight[:, None, None, :])


class EnsembleGPT:
    """K members of one GPTConfig; `params[name]` is GPT's parameter `name` for all members, (K, ...)."""

    def __init__(self, config: GPTConfig, members: int, attention_backend: str, logprob_backend: str,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        if members < 1:
            raise ValueError(f"an ensemble needs at least one member, got {members}")
        self.config = config
        self.attention_backend, self.logprob_backend = attention_backend, logprob_backend
        self.attend = kernels.packed_attention(attention_backend)
        self.logprob = kernels.logprob_ops(logprob_backend)
        self.params = {
            name: torch.zeros((members, *shape), device=device, dtype=dtype, requires_grad=True)
            for name, shape in parameter_shapes(config).items()
        }

    @property
    def members(self) -> int:
        return self.params["wte.weight"].shape[0]

    @property
    def device(self) -> torch.device:
        return self.params["wte.weight"].device

    @property
    def dtype(self) -> torch.dtype:
        return self.params["wte.weight"].dtype

    # ---- members in and out, as plain GPT state dicts

    @torch.no_grad()
    def import_member(self, k: int, state: dict[str, torch.Tensor]) -> None:
        """Member k takes the weights of a GPT state dict of this config."""
        if set(state) != set(self.params):
            differ = sorted(set(state) ^ set(self.params))
            raise ValueError(f"not a GPT state dict of {self.config.name}: keys differ in {differ}")
        for name, p in self.params.items():
            p[k].copy_(state[name])

    @torch.no_grad()
    def export_member(self, k: int) -> dict[str, torch.Tensor]:
        """Member k's weights as a GPT state dict (copies: later training does not change them)."""
        return {name: p[k].detach().clone() for name, p in self.params.items()}

    @torch.no_grad()
    def keep_members(self, keep: list[int]) -> None:
        """Repack: only members `keep` remain, in that order (their weights are copied, untouched)."""
        index = torch.tensor(keep, device=self.device)
        for name, p in self.params.items():
            self.params[name] = p.index_select(0, index).detach().requires_grad_(True)

    # ---- the forward pass of all members at once

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits (K, B, t, V) for token ids (K, B, t): row b of member k through member k."""
        K, B, T = idx.shape
        c, p = self.config, self.params
        if K != self.members or T > c.seq_len:
            raise ValueError(f"idx must be ({self.members}, batch, t) with t <= {c.seq_len}, got {tuple(idx.shape)}")
        # Member k's token table sits at rows k·V .. k·V+V-1 of the flattened tables.
        offsets = torch.arange(K, device=idx.device).view(K, 1, 1) * c.vocab_size
        h = F.embedding(idx + offsets, p["wte.weight"].reshape(K * c.vocab_size, c.d_model))
        h = h + p["wpe.weight"][:, None, :T, :]
        for i in range(c.n_layer):
            b = f"blocks.{i}."
            qkv = _linear(_layer_norm(h, p[b + "ln_1.weight"], p[b + "ln_1.bias"]),
                          p[b + "attn.qkv.weight"], p[b + "attn.qkv.bias"])
            y = self.attend(qkv.reshape(K * B, T, 3 * c.d_model), c.n_head).reshape(K, B, T, c.d_model)
            h = h + _linear(y, p[b + "attn.proj.weight"], p[b + "attn.proj.bias"])
            u = _linear(_layer_norm(h, p[b + "ln_2.weight"], p[b + "ln_2.bias"]),
                        p[b + "mlp.fc.weight"], p[b + "mlp.fc.bias"])
            h = h + _linear(F.gelu(u, approximate="tanh"), p[b + "mlp.proj.weight"], p[b + "mlp.proj.bias"])
        h = _layer_norm(h, p["ln_f.weight"], p["ln_f.bias"])
        logits = torch.bmm(h.reshape(K, B * T, c.d_model), p["wte.weight"].transpose(1, 2))  # head tied to wte
        return logits.reshape(K, B, T, c.vocab_size)

    def member_losses(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Each member's mean next-token cross-entropy (nats) over tokens 1..S-1 of its first
        rows[k] sequences of x (K, B, S); later rows are padding and count for nothing (a member
        with no rows gets 0). (K,)"""
        K, B, S = x.shape
        targets = x[:, :, 1:].clone()
        padding = torch.arange(B, device=x.device).view(1, B) >= rows.view(K, 1)
        targets[padding] = IGNORE
        logits = self.forward(x[:, :, :-1])
        nll = self.logprob.cross_entropy(logits.reshape(K * B, S - 1, -1), targets.reshape(K * B, S - 1),
                                         ignore_index=IGNORE, reduction="none")
        return nll.reshape(K, B * (S - 1)).sum(dim=1) / (rows * (S - 1)).clamp(min=1).to(nll.dtype)


class EnsembleAdamW:
    """torch.optim.AdamW on stacked parameters, each member with its own lr, weight decay, clip and steps.

    The arithmetic is torch.optim.AdamW's (its single-tensor form): step += 1;
    p *= 1 - lr·wd; m = lerp(m, g, 1 - β1); v = β2·v + (1 - β2)·g²;
    p += (-lr / (1 - β1^step))·m / (sqrt(v) / sqrt(1 - β2^step) + eps). Clipping is
    clip_grad_norm_'s: g *= min(1, max_norm / (‖g‖ + 1e-6)), ‖g‖ over all of one member's
    gradients. Members outside `active` keep their weights and moments bit for bit.
    """

    def __init__(self, model: EnsembleGPT, betas: tuple[float, float], eps: float = 1e-8):
        self.model = model
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.exp_avg = {name: torch.zeros_like(p) for name, p in model.params.items()}
        self.exp_avg_sq = {name: torch.zeros_like(p) for name, p in model.params.items()}
        self.steps = [0] * model.members  # AdamW's per-parameter step count, the same for all of a member's tensors

    # ---- a member's moments in and out, as the tensors torch.optim.AdamW keeps per parameter

    @torch.no_grad()
    def import_member(self, k: int, step: int, exp_avg: dict[str, torch.Tensor],
                      exp_avg_sq: dict[str, torch.Tensor]) -> None:
        self.steps[k] = step
        for name in self.exp_avg:
            self.exp_avg[name][k].copy_(exp_avg[name])
            self.exp_avg_sq[name][k].copy_(exp_avg_sq[name])

    @torch.no_grad()
    def reset_member(self, k: int) -> None:
        """A fresh optimizer for member k (a new run taking a finished run's place)."""
        self.steps[k] = 0
        for name in self.exp_avg:
            self.exp_avg[name][k].zero_()
            self.exp_avg_sq[name][k].zero_()

    @torch.no_grad()
    def export_member(self, k: int) -> tuple[int, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        return (self.steps[k], {n: t[k].clone() for n, t in self.exp_avg.items()},
                {n: t[k].clone() for n, t in self.exp_avg_sq.items()})

    @torch.no_grad()
    def keep_members(self, keep: list[int]) -> None:
        """Repack alongside EnsembleGPT.keep_members."""
        index = torch.tensor(keep, device=self.model.device)
        for moments in (self.exp_avg, self.exp_avg_sq):
            for name, t in moments.items():
                moments[name] = t.index_select(0, index)
        self.steps = [self.steps[k] for k in keep]

    # ---- the update

    @torch.no_grad()
    def clip_gradients(self, max_norm: list[float]) -> None:
        """Scale member k's gradients so their joint 2-norm is at most max_norm[k] (0: no clipping)."""
        grads = [p.grad for p in self.model.params.values()]
        K = self.model.members
        per_tensor = torch.stack([torch.linalg.vector_norm(g.reshape(K, -1), dim=1) for g in grads])  # (tensors, K)
        norm = torch.linalg.vector_norm(per_tensor, dim=0)
        limit = torch.tensor(max_norm, device=norm.device, dtype=norm.dtype)
        coef = torch.where(limit > 0, torch.clamp(limit / (norm + 1e-6), max=1.0), torch.ones_like(norm))
        for g in grads:
            g.mul_(_per_member(coef, g))

    @torch.no_grad()
    def step(self, lr: list[float], weight_decay: list[float], active: list[bool]) -> None:
        """One AdamW step for the members marked active, member k at learning rate lr[k]."""
        K = self.model.members
        ks = [k for k in range(K) if active[k]]
        for k in ks:
            self.steps[k] += 1
        # Per member, in float64 as AdamW computes them in Python, then one (K,) tensor each.
        step_size, bias2_sqrt, decay = [0.0] * K, [1.0] * K, [1.0] * K
        for k in ks:
            step_size[k] = -lr[k] / (1 - self.beta1 ** self.steps[k])
            bias2_sqrt[k] = (1 - self.beta2 ** self.steps[k]) ** 0.5
            decay[k] = 1 - lr[k] * weight_decay[k]
        like = self.model.params["wte.weight"]
        as_tensor = lambda values: torch.tensor(values, device=like.device, dtype=like.dtype)  # noqa: E731
        step_size, bias2_sqrt, decay = as_tensor(step_size), as_tensor(bias2_sqrt), as_tensor(decay)
        everyone = len(ks) == K
        index = None if everyone else torch.tensor(ks, device=like.device)
        for name, p in self.model.params.items():
            w, g, m, v = p.detach(), p.grad, self.exp_avg[name], self.exp_avg_sq[name]
            s, b2, dk = step_size, bias2_sqrt, decay
            if not everyone:  # work on copies of the active members' slices, written back below
                w, g, m, v = (t.index_select(0, index) for t in (w, g, m, v))
                s, b2, dk = (t.index_select(0, index) for t in (s, b2, dk))
            if any(wd for wd in weight_decay):
                w.mul_(_per_member(dk, w))
            m.lerp_(g, 1 - self.beta1)
            v.mul_(self.beta2).addcmul_(g, g, value=1 - self.beta2)
            denom = (v.sqrt() / _per_member(b2, v)).add_(self.eps)
            w.addcdiv_(m * _per_member(s, m), denom)
            if not everyone:
                p.detach().index_copy_(0, index, w)
                self.exp_avg[name].index_copy_(0, index, m)
                self.exp_avg_sq[name].index_copy_(0, index, v)

    def zero_grad(self) -> None:
        for p in self.model.params.values():
            p.grad = None


# How the ensemble's loss may run on CUDA besides eagerly, each timed by the probe: torch.compile's
# fused kernels, and the same kernels replayed as CUDA graphs (one launch for the whole forward,
# and one for the backward: what launch-bound tiny models want).
COMPILE_MODES = ("default", "reduce-overhead")


def compiled_losses(model: EnsembleGPT, mode: str = "default") -> Callable:
    """model.member_losses under torch.compile in `mode` (COMPILE_MODES), our kernels inside as the
    custom ops they are. Meant for CUDA, where tiny models are launch-bound; a repack changes K and
    recompiles. (Unverified: written without a GPU at hand.)"""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {COMPILE_MODES}, got {mode!r}")
    compiled = torch.compile(model.member_losses, dynamic=False, mode=mode)
    if mode == "default":
        return compiled

    def graphed(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        torch.compiler.cudagraph_mark_step_begin()  # a new step: the last replay's outputs are not read again
        return compiled(x, rows)

    return graphed
