"""K GPTs of one shape trained as one: every parameter stacked on a leading member axis.

`EnsembleGPT` holds K members of one GPTConfig. Each parameter of GPT (memorize/model.py's
parameter_shapes) becomes one tensor of shape (K, ...) under the same name, so member k's
plain GPT state dict is `{name: tensor[k]}`: `export_member(k)` gives it and
`import_member(k, state)` takes one. Its forward is GPT's own (model.gpt_logits) over
`StackedOps`: the projections as batched matrix products (torch.baddbmm), LayerNorms and
embeddings per member; attention and the log-prob ops are memk.kernels' own, unchanged,
because they work per sequence and per row: the ensemble hands them K·batch sequences. Members never mix: member k's outputs depend on member k's weights and inputs
only, so the gradient of the sum of the members' losses is, member by member, each
member's own gradient.

`compiled_losses` is member_losses under torch.compile, or compiled and replayed as CUDA
graphs: the ways the ensemble executor may run it on CUDA.

`EnsembleAdamW` is torch.optim.AdamW's update (decoupled weight decay, bias corrections,
eps) written on the stacked tensors with a learning rate, weight decay, step count and
gradient-norm clip per member, and an `active` mask: members outside it are not touched.

`EnsembleStep` is the two as the training loop's TrainingStep (memorize/train.py), a run in
each slot; its checkpoints are a plain GPT's and torch.optim.AdamW's state dicts, as a run
alone writes them, so a run resumes under either.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F

from memk import kernels

from .model import GPT, LAYER_NORM_EPS, GPTConfig, gpt_logits, parameter_shapes
from .schedule import TrainConfig
from .train import GLOBAL_RNG, seeded_gpt

IGNORE = -100  # target of a padding row: the log-prob ops skip it (their ignore_index)


def _per_member(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A (K,) or (K, n) tensor shaped to broadcast against `like` (K, ...) along its member axis."""
    return t.reshape(t.shape + (1,) * (like.dim() - t.dim()))


class StackedOps:
    """model.TransformerOps of K stacked GPTs: member k's layers on member k's rows, x (K, B, T, ...)."""

    def __init__(self, attend: Callable[[torch.Tensor, int], torch.Tensor]):
        self.attend_sequences = attend

    @staticmethod
    def embed(wte: torch.Tensor, wpe: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        K, V, d = wte.shape
        # Member k's token table sits at rows k·V .. k·V+V-1 of the flattened tables.
        offsets = torch.arange(K, device=idx.device).view(K, 1, 1) * V
        return F.embedding(idx + offsets, wte.reshape(K * V, d)) + wpe[:, None, :idx.shape[2], :]

    @staticmethod
    def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Member k's nn.Linear on member k's rows: x (K, B, T, in), weight (K, out, in), bias (K, out)."""
        K, B, T, n_in = x.shape
        y = torch.baddbmm(bias.unsqueeze(1), x.reshape(K, B * T, n_in), weight.transpose(1, 2))
        return y.reshape(K, B, T, -1)

    @staticmethod
    def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Member k's nn.LayerNorm: normalise each row, then member k's scale and shift."""
        normed = F.layer_norm(x, x.shape[-1:], eps=LAYER_NORM_EPS)
        return torch.addcmul(bias[:, None, None, :], normed, weight[:, None, None, :])

    def attend(self, qkv: torch.Tensor, n_head: int) -> torch.Tensor:
        """Every member's sequences through the kernels' attention as K·B sequences."""
        K, B, T, width = qkv.shape
        return self.attend_sequences(qkv.reshape(K * B, T, width), n_head).reshape(K, B, T, width // 3)

    @staticmethod
    def head(hidden: torch.Tensor, wte: torch.Tensor) -> torch.Tensor:
        K, B, T, d = hidden.shape
        return torch.bmm(hidden.reshape(K, B * T, d), wte.transpose(1, 2)).reshape(K, B, T, -1)


class EnsembleGPT:
    """K members of one GPTConfig; `params[name]` is GPT's parameter `name` for all members, (K, ...)."""

    def __init__(self, config: GPTConfig, members: int, attention_backend: str, logprob_backend: str,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        if members < 1:
            raise ValueError(f"an ensemble needs at least one member, got {members}")
        self.config = config
        self.attention_backend, self.logprob_backend = attention_backend, logprob_backend
        self.ops = StackedOps(kernels.packed_attention(attention_backend))
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
        if K != self.members or T > self.config.seq_len:
            raise ValueError(f"idx must be ({self.members}, batch, t) with t <= {self.config.seq_len}, got {tuple(idx.shape)}")
        return gpt_logits(self.ops, self.params, self.config, idx)

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


# ---------------------------------------------------------------------------------------
# The ensemble as the training loop's step (memorize/train.py's TrainingStep)


class EnsembleStep:
    """train.TrainingStep of up to K runs of one shape: an EnsembleGPT and its EnsembleAdamW, a run a slot.

    A fresh run starts from the weights it would start from alone (train.seeded_gpt of its seed);
    checkpoints hold a GPT state dict and a torch.optim.AdamW state dict, as train.AloneStep
    writes them with float32 weights, so a run checkpointed by either resumes under the other."""

    def __init__(self, config: GPTConfig, slots: int, attention_backend: str, logprob_backend: str,
                 betas: tuple[float, float], device: torch.device, compile_mode: str | None = None):
        # GPT's parameters take torch's default dtype; the members must too, to start from its weights.
        self.model = EnsembleGPT(config, slots, attention_backend, logprob_backend, device=device,
                                 dtype=torch.get_default_dtype())
        self.optimizer = EnsembleAdamW(self.model, betas)
        self.member_losses = self.model.member_losses if compile_mode is None else compiled_losses(self.model, compile_mode)
        self.names = list(self.model.params)
        with GLOBAL_RNG, torch.random.fork_rng(devices=[]):  # building it must not move the global generator
            self.template = GPT(config, attention_backend=attention_backend,
                                logprob_backend=logprob_backend).to(device=device, dtype=self.model.dtype)

    @property
    def slots(self) -> int:
        return self.model.members

    def load(self, k: int, cfg: TrainConfig, checkpoint: dict | None) -> None:
        m = self.model
        if checkpoint is None:
            fresh = seeded_gpt(m.config, cfg.seed, m.attention_backend, m.logprob_backend, m.device)
            m.import_member(k, fresh.state_dict())
            self.optimizer.reset_member(k)
            return
        m.import_member(k, checkpoint["model"])
        moments = moments_from_adamw_state(checkpoint["optimizer"], self.names)
        if moments is None:
            self.optimizer.reset_member(k)
        else:
            self.optimizer.import_member(k, *moments)

    def gpt(self, k: int) -> GPT:
        """Member k as a plain GPT of its own (later steps do not change it)."""
        gpt = copy.deepcopy(self.template)
        gpt.load_state_dict(self.model.export_member(k))
        return gpt

    def checkpoint(self, k: int, gpt: GPT, cfg: TrainConfig, lr: float) -> dict:
        step, exp_avg, exp_avg_sq = self.optimizer.export_member(k)
        return {"model": gpt.state_dict(), "optimizer": torch_adamw_state(gpt, cfg, lr, step, exp_avg, exp_avg_sq)}

    def losses(self, batches: list[torch.Tensor | None]) -> torch.Tensor:
        rows = [len(b) if b is not None else 0 for b in batches]
        width = max(rows)
        filler = next(b for b in batches if b is not None)[:1]
        # Members with fewer sequences than the widest batch (n < batch_size) are padded with
        # rows whose targets the loss ignores; empty slots are all padding.
        x = torch.stack([
            torch.cat([b if b is not None else filler[:0], filler.expand(width - r, -1)]) for b, r in zip(batches, rows)
        ])
        return self.member_losses(x, torch.tensor(rows, device=self.model.device))

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()

    def clip_gradients(self, max_norm: list[float]) -> None:
        self.optimizer.clip_gradients(max_norm)

    def step(self, lr: list[float], weight_decay: list[float], active: list[bool]) -> None:
        self.optimizer.step(lr, weight_decay, active)

    def keep(self, slots: list[int]) -> None:
        self.model.keep_members(slots)
        self.optimizer.keep_members(slots)


def torch_adamw_state(gpt: GPT, cfg: TrainConfig, lr: float, step: int, exp_avg: dict, exp_avg_sq: dict) -> dict:
    """A torch.optim.AdamW state dict for `gpt` holding these moments: what a run alone checkpoints."""
    optimizer = torch.optim.AdamW(gpt.parameters(), lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    if step > 0:  # AdamW creates its state on the first step; a checkpoint at step 0 has none
        for name, p in gpt.named_parameters():
            optimizer.state[p] = {"step": torch.tensor(float(step)), "exp_avg": exp_avg[name],
                                  "exp_avg_sq": exp_avg_sq[name]}
    return optimizer.state_dict()


def moments_from_adamw_state(state: dict, names: list[str]) -> tuple[int, dict, dict] | None:
    """(step, exp_avg, exp_avg_sq) by parameter name from a torch AdamW state dict; None before the first step."""
    per_index = state["state"]
    if not per_index:
        return None
    order = state["param_groups"][0]["params"]  # the indices of GPT.parameters(), in order
    step = int(per_index[order[0]]["step"])
    return (step, {n: per_index[i]["exp_avg"] for n, i in zip(names, order)},
            {n: per_index[i]["exp_avg_sq"] for n, i in zip(names, order)})
