"""Training precisions: what a run's weights are stored in and what its arithmetic runs in.

- "float32": float32 weights, optimizer state and arithmetic.
- "bfloat16": the paper's setting (PAPER.md: α 3.51 against float32's 3.83, although float32
  parameters hold twice the bits): the weights and Adam's moments are stored in bfloat16,
  the forward and backward run in bfloat16, the log-probabilities are taken in float32 from
  the bfloat16 logits. Each optimizer step (BFloat16AdamW) reads the stored bfloat16
  numbers, computes AdamW's update in float32 and rounds the new weights and moments to
  the nearest bfloat16 (ties to even). Round-to-nearest is what a model cast to bfloat16
  and stepped by torch.optim.AdamW does, the plainest reading of the paper; an update below
  half a weight's bfloat16 spacing is lost, which is part of what bfloat16 costs.
  (Stochastic rounding would keep such updates in expectation: another experiment.)
- "bfloat16-autocast": float32 master weights and optimizer state, forward and backward
  under bfloat16 autocast (memk's "bfloat16" before 2026-12).
"""

from __future__ import annotations

import contextlib
import math

import torch

from .constants import PRECISIONS

# None: the parameters stay as built, in torch's default dtype (float32; float64 in memk's float64 tests)
WEIGHTS_DTYPE = {"float32": None, "bfloat16": torch.bfloat16, "bfloat16-autocast": None}


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def weights_dtype(precision: str) -> torch.dtype | None:
    """The dtype a run's parameters and optimizer state are cast to; None: as built (torch's default)."""
    check_precision(precision)
    return WEIGHTS_DTYPE[precision]


def autocast_context(device: torch.device, precision: str):
    """bfloat16 autocast for 'bfloat16-autocast'; nothing otherwise (the weights' dtype rules)."""
    check_precision(precision)
    if precision == "bfloat16-autocast":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def optimizer_for(parameters, precision: str, lr: float, betas: tuple[float, float], weight_decay: float,
                  eps: float = 1e-8) -> torch.optim.Optimizer:
    """torch.optim.AdamW for float32 weights; BFloat16AdamW for bfloat16 ones."""
    if weights_dtype(precision) is torch.bfloat16:
        return BFloat16AdamW(parameters, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)
    return torch.optim.AdamW(parameters, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)


class BFloat16AdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias corrections: torch.optim.AdamW's arithmetic) on
    bfloat16 parameters with bfloat16 moments: each step computes in float32 from the stored
    numbers and rounds weights and moments to the nearest bfloat16 once.

    Its state dict has torch.optim.AdamW's layout (step, exp_avg, exp_avg_sq per parameter)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        if not (lr > 0 and math.isfinite(lr)):
            raise ValueError(f"lr must be positive and finite, got {lr}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                step = float(state["step"])
                grad = p.grad.float()
                m = state["exp_avg"].float().lerp_(grad, 1 - beta1)
                v = state["exp_avg_sq"].float().mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                weights = p.float().mul_(1 - lr * wd)
                denom = (v / (1 - beta2**step)).sqrt_().add_(eps)
                weights.addcdiv_(m, denom, value=-lr / (1 - beta1**step))
                p.copy_(weights)  # round to nearest, ties to even
                state["exp_avg"].copy_(m)
                state["exp_avg_sq"].copy_(v)
        return loss


# The CPU flags (Linux /proc/cpuinfo) that mean bfloat16 arithmetic in hardware: AVX-512 BF16 or
# AMX on x86-64, BF16 on Arm. Without them torch emulates bfloat16 in float32 and converts at
# every op, which costs more than float32 itself.
BFLOAT16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


def cpu_has_bfloat16(cpuinfo: str | None = None) -> bool | None:
    """Whether this CPU does bfloat16 arithmetic in hardware (BFLOAT16_CPU_FLAGS); None where
    /proc/cpuinfo cannot be read (not Linux). `cpuinfo`: its text, for tests."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return None
    flags = set()
    for line in cpuinfo.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):  # x86-64, Arm
            flags.update(value.split())
    return any(flag in flags for flag in BFLOAT16_CPU_FLAGS)


def bfloat16_cpu_note(device_type: str, precisions, cpuinfo: str | None = None) -> str | None:
    """The one line to show where bfloat16 is asked for on a CPU without bfloat16 instructions; None otherwise."""
    asked = [p for p in precisions if p.startswith("bfloat16")]
    if device_type != "cpu" or not asked or cpu_has_bfloat16(cpuinfo) is not False:
        return None
    return (f"this CPU has no bfloat16 instructions (AVX-512 BF16 or AMX on x86, BF16 on Arm), so {', '.join(asked)} "
            "runs emulated here, slower than float32; use --precision float32 unless you need bfloat16's arithmetic")
