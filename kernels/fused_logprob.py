"""Fused cross-entropy / log-prob ops: one read of the logits forward, one backward.

`token_logprobs`, `cross_entropy` and `sequence_bits` here compute what their namesakes in
memk.kernels.reference compute, without materializing log-probabilities or probabilities:
the forward reads each row of logits once and keeps three floats per token: log p(target),
and the row's max m and log sum exp(x - m), kept apart; the backward reads the row again and
writes the gradient, g * (onehot - exp((x - m) - log_sum)), in the logits' dtype. Arithmetic
is float32 (float64 for float64 logits) whatever the logits' dtype; the log-sum-exp reads each
row once (online on the GPU, in L1-sized blocks on the CPU). Because m + log_sum is never
rounded to one float, the results are shift invariant: log_softmax(x + c) is as accurate as
log_softmax(x) for any offset c the dtype can hold (csrc/logprob_math.h says why). A row with
a NaN or +inf logit gives NaN; a -inf logit is an ordinary logit of probability 0.

The kernels are C++ (CPU: parallel over rows, in the widest vectors the CPU has, see cpu_isa())
and CUDA, in csrc/; they are registered as the torch operators memk::logprob_fwd_v2 and
memk::logprob_bwd_v2 (with autograd, for the backward too, so second derivatives are right, and
fake/meta implementations, so they work under torch.compile). native_build.py compiles them on
first use, then caches them (the CUDA part is built only where torch has CUDA, nvcc is found and
a GPU is present), and says where and how. Importing this module compiles nothing. Without a
compiler the ops raise BackendUnavailable, which names the pure-PyTorch `reference` backend as
the way around it.

Validation and its cost: shapes, dtypes and devices are checked in Python (free). Targets
outside [0, V) (other than ignore_index) are found by the forward kernel itself; raising
an error for them costs nothing extra on CPU and one device-to-host sync per call on CUDA.
Turn that check off with check_targets=False (per call), or for the whole process with
MEMK_CHECK_TARGETS=0 in the environment or memk.kernels.fused_logprob.CHECK_TARGETS = False:
bad targets then give NaN for their rows (and NaN gradients), never an out-of-bounds read.
Under CUDA graph capture (torch.compile mode="reduce-overhead") the sync is not allowed:
turn the check off there.

(The module is not named cross_entropy so that memk.kernels.cross_entropy is always the
function, never shadowed by its module.)
"""

from __future__ import annotations

import math
import os
import threading

import torch

from .interfaces import BackendUnavailable, LogprobOps
from .native_build import REFERENCE_BACKEND_FIX, load_library
# Whether these ops can be built is asked of them (backends.py, their tests): answered by native_build.
from .native_build import can_build, missing_build_requirements  # noqa: F401
from .reference import check_logits_targets

LN2 = math.log(2.0)
CHECK_TARGETS = os.environ.get("MEMK_CHECK_TARGETS", "1") != "0"
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
REDUCTIONS = ("mean", "sum", "none")


class _Extension:
    """The ops in this process: their library loaded and their Python parts registered, once, on first use."""

    lock = threading.Lock()
    loaded = False
    with_cuda = False
    error: BackendUnavailable | None = None


def load_extension() -> None:
    """Compile (first time only; cached on disk) and load the kernels; raise BackendUnavailable if impossible."""
    if _Extension.loaded:
        return
    with _Extension.lock:
        if _Extension.loaded:
            return
        if _Extension.error is not None:
            raise _Extension.error
        try:
            with_cuda = load_library()
        except BackendUnavailable as exc:  # said once; every later call raises the same
            _Extension.error = exc
            raise
        _register_python_parts()
        _Extension.with_cuda = with_cuda
        _Extension.loaded = True


def _register_python_parts() -> None:
    """Fake (shape-only) implementations and autograd for the C++ operators."""

    def acc_dtype(logits: torch.Tensor) -> torch.dtype:
        return torch.float64 if logits.dtype == torch.float64 else torch.float32

    @torch.library.register_fake("memk::logprob_fwd_v2")
    def _fwd_fake(logits, targets, ignore_index, check_targets):
        rows = logits.shape[0]
        return tuple(logits.new_empty((rows,), dtype=acc_dtype(logits)) for _ in range(3))  # logp, row_max, log_sum

    @torch.library.register_fake("memk::logprob_bwd_v2")
    def _bwd_fake(grad_logp, logits, targets, row_max, log_sum, ignore_index):
        return logits.new_empty(logits.shape)

    def setup_context(ctx, inputs, output):
        logits, targets, ignore_index, _check = inputs
        _logp, row_max, log_sum = output
        ctx.mark_non_differentiable(row_max, log_sum)
        ctx.save_for_backward(logits, targets, row_max, log_sum)
        ctx.ignore_index = ignore_index

    def backward(ctx, grad_logp, _grad_row_max, _grad_log_sum):
        logits, targets, row_max, log_sum = ctx.saved_tensors
        grad_logp = grad_logp.contiguous()
        grad = torch.ops.memk.logprob_bwd_v2(grad_logp, logits, targets, row_max, log_sum, ctx.ignore_index)
        return grad, None, None, None

    torch.library.register_autograd("memk::logprob_fwd_v2", backward, setup_context=setup_context)

    # The backward is differentiable too (gradient penalties: autograd.grad(..., create_graph=True),
    # then backward through that gradient). Without this, torch would run logprob_bwd_v2 as a constant
    # of its inputs, with only a warning, and the second derivative would be silently wrong.
    def bwd_setup_context(ctx, inputs, output):
        grad_logp, logits, targets, _row_max, _log_sum, ignore_index = inputs
        ctx.save_for_backward(grad_logp, logits, targets)
        ctx.ignore_index = ignore_index

    def bwd_backward(ctx, grad_grad):
        grad_logp, logits, targets = ctx.saved_tensors
        return (*_logprob_bwd_backward(grad_grad, grad_logp, logits, targets, ctx.ignore_index), None, None, None, None)

    torch.library.register_autograd("memk::logprob_bwd_v2", bwd_backward, setup_context=bwd_setup_context)


def _logprob_bwd_backward(
    v: torch.Tensor, g: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, ignore_index: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of sum(v * logprob_bwd(g, logits)) in g and in logits, with plain torch ops.

    logprob_bwd is G_ij = g_i ([j == t_i] - p_ij), p = softmax(x_i); so with <v, p>_i = sum_j v_ij p_ij:
      d/dg_i  = v_{i,t_i} - <v, p>_i
      d/dx_ij = -g_i p_ij (v_ij - <v, p>_i)
    Rows whose target is ignored get 0 (their G is 0); rows whose target is outside [0, V) get NaN, as in
    the kernels. p is recomputed from the logits by torch.softmax (rows x V floats, for second derivatives
    only), so the graph of this result is exact too and higher derivatives are right.
    """
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    vocab = logits.shape[-1]
    p = torch.softmax(logits.to(acc), dim=-1)
    v = v.to(acc)
    vp = (v * p).sum(-1, keepdim=True)
    used = targets != ignore_index if ignore_index is not None else torch.ones_like(targets, dtype=torch.bool)
    in_range = (targets >= 0) & (targets < vocab)
    v_t = v.gather(-1, torch.where(in_range, targets, 0).unsqueeze(-1))
    grad_g = (v_t - vp).squeeze(-1)
    grad_x = -(g.to(acc).unsqueeze(-1) * p * (v - vp))
    nan = torch.full((), float("nan"), dtype=acc, device=logits.device)
    grad_g = torch.where(used, torch.where(in_range, grad_g, nan), 0.0)
    grad_x = torch.where(used.unsqueeze(-1), torch.where(in_range.unsqueeze(-1), grad_x, nan), 0.0)
    return grad_g.to(g.dtype), grad_x.to(logits.dtype)


def _logprobs(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int | None, check_targets: bool | None
) -> torch.Tensor:
    """log p(target) shaped like targets (0 where target == ignore_index), through memk::logprob_fwd_v2."""
    check_logits_targets(logits, targets)
    if logits.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"logits must be float32, bfloat16, float16 or float64, got {logits.dtype}")
    if logits.device.type not in ("cpu", "cuda"):
        raise ValueError(
            f"the fused log-prob kernels run on cpu and cuda tensors, not {logits.device}; {REFERENCE_BACKEND_FIX}"
        )
    vocab = logits.shape[-1]
    if vocab == 0:
        raise ValueError(f"logits have an empty vocabulary axis (shape {tuple(logits.shape)}); V must be >= 1")
    if not _Extension.loaded:
        load_extension()
    if logits.is_cuda and not _Extension.with_cuda:
        raise BackendUnavailable(
            "the fused log-prob kernels were built without CUDA (torch without CUDA, or no nvcc/CUDA_HOME "
            f"when they were built), so they cannot take {logits.device} tensors; {REFERENCE_BACKEND_FIX}"
        )
    if logits.stride(-1) != 1:
        logits = logits.contiguous()  # the kernels need unit stride along V; rows may be strided
    rows = logits.reshape(-1, vocab)  # a view where the batch axes merge, else one copy
    flat_targets = targets.reshape(-1).to(torch.int64).contiguous()
    check = CHECK_TARGETS if check_targets is None else bool(check_targets)
    logp, _row_max, _log_sum = torch.ops.memk.logprob_fwd_v2(rows, flat_targets, ignore_index, check)
    return logp.reshape(targets.shape)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, *, check_targets: bool | None = None) -> torch.Tensor:
    """log p(target) per position, natural log: logits (..., V), integer targets (...) -> float32 (...).

    float64 for float64 logits. Differentiable in logits. Targets must lie in [0, V); see the
    module docstring for what checking that costs and how to turn it off (check_targets).
    """
    return _logprobs(logits, targets, None, check_targets)


def cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    *,
    check_targets: bool | None = None,
) -> torch.Tensor:
    """torch.nn.functional.cross_entropy over the last axis of logits (..., V), fused.

    Targets equal to ignore_index contribute nothing (and 0 under reduction="none");
    "mean" divides by the number of other targets (NaN if there are none, as torch).
    Result float32 (float64 for float64 logits); differentiable in logits.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    nll = -_logprobs(logits, targets, ignore_index, check_targets)
    if reduction == "none":
        return nll
    if reduction == "sum":
        return nll.sum()
    return nll.sum() / (targets != ignore_index).sum().to(nll.dtype)


def sequence_bits(logits: torch.Tensor, targets: torch.Tensor, *, check_targets: bool | None = None) -> torch.Tensor:
    """-log2 p(x) per sequence: logits (B, T, V), targets (B, T) -> float64 (B,), summed in float64."""
    if logits.dim() != 3:
        raise ValueError(f"sequence_bits needs logits of shape (batch, tokens, V), got {tuple(logits.shape)}")
    return -(token_logprobs(logits, targets, check_targets=check_targets).double().sum(dim=-1)) / LN2


def cpu_isa(name: str | None = None) -> str:
    """The instruction set the CPU kernel runs with here: "avx512" (16 lanes), "avx2" (8 lanes) or "baseline".

    By default the best this CPU has, chosen by its feature bits. `name` makes the kernel run
    with that one from now on, in this process (tests run every path the machine has); "best"
    goes back to the default. ValueError if this CPU cannot run it.
    """
    load_extension()
    return torch.ops.memk.cpu_isa(name or "")


def logprob_ops() -> LogprobOps:
    """The `fused` backend's ops, compiling them first if needed (raises BackendUnavailable)."""
    load_extension()
    return LogprobOps(token_logprobs, cross_entropy, sequence_bits)
