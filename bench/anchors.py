"""Other libraries' fused cross-entropy, benchmarked as the anchors a user would pick instead of
memk: Liger-Kernel (linkedin/Liger-Kernel) and cut-cross-entropy (apple/ml-cross-entropy).

Neither is a dependency of memk. Where one cannot be imported, or cannot run on the device (both
are Triton kernels for CUDA), its variant is skipped with the reason. Each is called through its
documented public API, with its defaults:

    Liger-Kernel       liger_kernel.transformers.LigerCrossEntropyLoss()(logits (N, V), targets (N,))
                       liger_kernel.transformers.LigerFusedLinearCrossEntropyLoss()(weight (V, d), hidden (N, d), targets (N,))
    cut-cross-entropy  cut_cross_entropy.linear_cross_entropy(hidden (N, d), weight (V, d), targets (N,))

What each comparison measures (suite_logprob.py builds the groups):
- LigerCrossEntropyLoss takes logits, as memk's cross_entropy does: same inputs, same work. It
  writes the gradient into the logits' own storage during the forward (its memory saving), so
  its variant runs on private copies of the inputs made before timing: the group's inputs stay
  intact for the float64 check and for the variants after it.
- cut-cross-entropy, and Liger's fused linear cross-entropy, never materialise the logits: they
  take the last hidden states and the classifier weight and fuse the classifier matmul into the
  loss. They are compared only in the linear_cross_entropy family, where every variant starts
  from the same hidden states and weight (memk and plain PyTorch do the matmul with F.linear and
  then the loss) and the time covers the matmul, the loss and both inputs' gradients.
  cut-cross-entropy's default gradient filtering (filter_eps="auto") is kept, since it is what a
  user gets; the float64 check still bounds its error.
"""

from __future__ import annotations

import importlib
from typing import Callable

import torch

from .case import Skip

# Devices the anchors are run on. Both are Triton kernels for CUDA; tests add "cpu" to run
# stand-ins of the two APIs through the same code.
ANCHOR_DEVICES = ("cuda",)

LIGER = "Liger-Kernel"
CCE = "cut-cross-entropy"
_PIP_NAMES = {LIGER: "liger-kernel", CCE: "cut-cross-entropy"}


def _module(module: str, library: str, device: torch.device):
    """The library's module, or Skip saying why it cannot be used here."""
    try:
        found = importlib.import_module(module)
    except ImportError as exc:
        raise Skip(f"{library} is not installed ({exc}); `pip install {_PIP_NAMES[library]}` to compare with it") from exc
    if device.type not in ANCHOR_DEVICES:
        raise Skip(f"{library} is a Triton kernel for CUDA; it is not run on {device.type}")
    return found


def liger_cross_entropy(device: torch.device) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """(logits (..., V), targets (...)) -> mean cross-entropy, by LigerCrossEntropyLoss.

    Overwrites the logits with their gradient when they require one (see the module docstring).
    """
    loss = _module("liger_kernel.transformers", LIGER, device).LigerCrossEntropyLoss()
    return lambda logits, targets: loss(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def liger_fused_linear_cross_entropy(device: torch.device) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """(hidden (N, d), weight (V, d), targets (N,)) -> mean cross-entropy of hidden @ weightᵀ, by Liger."""
    loss = _module("liger_kernel.transformers", LIGER, device).LigerFusedLinearCrossEntropyLoss()
    return lambda hidden, weight, targets: loss(weight, hidden, targets)  # Liger takes the weight first


def cce_linear_cross_entropy(device: torch.device) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """(hidden (N, d), weight (V, d), targets (N,)) -> mean cross-entropy of hidden @ weightᵀ, by cut-cross-entropy."""
    function = _module("cut_cross_entropy", CCE, device).linear_cross_entropy
    return lambda hidden, weight, targets: function(hidden, weight, targets)
