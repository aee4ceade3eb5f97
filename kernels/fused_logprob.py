"""Fused cross-entropy / log-prob ops: one read of the logits forward, one backward.

`token_logprobs`, `cross_entropy` and `sequence_bits` here compute what their namesakes in
memk.kernels.reference compute, without materializing log-probabilities or probabilities:
the forward reads each row of logits once and keeps three floats per token: log p(target),
and the row's max m and log sum exp(x - m), kept apart; the backward reads the row again and
writes the gradient, g * (onehot - exp((x - m) - log_sum)), in the logits' dtype. Arithmetic
is float32 (float64 for float64 logits) whatever the logits' dtype, with a single-pass online
log-sum-exp. Because m + log_sum is never rounded to one float, the results are shift
invariant: log_softmax(x + c) is as accurate as log_softmax(x) for any offset c the dtype can
hold (csrc/logprob_math.h says why). A row with a NaN or +inf logit gives NaN; a -inf logit
is an ordinary logit of probability 0.

The kernels are C++ (CPU: parallel over rows, vectorized) and CUDA, in csrc/; they are
registered as the torch operators memk::logprob_fwd_v2 and memk::logprob_bwd_v2 (with autograd and
fake/meta implementations, so they work under torch.compile) and compiled with
torch.utils.cpp_extension on first use, then cached (TORCH_EXTENSIONS_DIR sets where; the
CUDA part is built only where torch has CUDA and nvcc is found). Importing this module
compiles nothing. Without a compiler the ops raise BackendUnavailable, which names the
pure-PyTorch `reference` backend as the way around it.

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
import shutil
import threading
from pathlib import Path

import torch

from .interfaces import BackendUnavailable, LogprobOps
from .reference import check_logits_targets

LN2 = math.log(2.0)
CHECK_TARGETS = os.environ.get("MEMK_CHECK_TARGETS", "1") != "0"
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
REDUCTIONS = ("mean", "sum", "none")

_CPU_SOURCES = ("logprob_cpu.cpp", "logprob_binding.cpp")
_CUDA_SOURCES = ("logprob_cuda.cu", "logprob_binding_cuda.cpp")
_FIX = (
    "use the pure-PyTorch backend instead: memk.kernels.logprob_ops('reference') "
    "(or logprob_backend='reference')"
)


class _Extension:
    """The compiled library: built and loaded once per process, on first use."""

    lock = threading.Lock()
    loaded = False
    with_cuda = False
    error: BackendUnavailable | None = None


def _cuda_toolkit_found() -> bool:
    from torch.utils import cpp_extension

    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def missing_build_requirements(device: torch.device | str = "cpu") -> str | None:
    """Why the extension cannot be built for `device` here (None if it can); compiles nothing."""
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        return f"the fused log-prob kernels run on cpu and cuda, not {device.type}"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler found (looked for {compiler!r} on PATH; set CXX to choose one)"
    if shutil.which("ninja") is None:
        return "ninja is not installed (pip install ninja); torch.utils.cpp_extension needs it"
    if device.type == "cuda" and not _cuda_toolkit_found():
        return (
            "the CUDA kernels need a CUDA build of torch and the CUDA toolkit (nvcc; set CUDA_HOME), "
            f"but torch.version.cuda is {torch.version.cuda!r} and no toolkit was found"
        )
    return None


def can_build(device: torch.device | str = "cpu") -> bool:
    """True where the fused kernels can be compiled for `device` (compiler present); builds nothing."""
    return missing_build_requirements(device) is None


def load_extension() -> None:
    """Compile (first time only; cached on disk) and load the kernels; raise BackendUnavailable if impossible."""
    if _Extension.loaded:
        return
    with _Extension.lock:
        if _Extension.loaded:
            return
        if _Extension.error is not None:
            raise _Extension.error
        missing = missing_build_requirements("cpu")
        if missing is not None:
            _Extension.error = BackendUnavailable(f"the fused log-prob kernels cannot be built: {missing}; {_FIX}")
            raise _Extension.error
        with_cuda = _cuda_toolkit_found()
        try:
            _build(with_cuda)
        except Exception as exc:  # compiler errors, missing headers, ...: say what and how around it
            _Extension.error = BackendUnavailable(
                f"building the fused log-prob kernels failed ({type(exc).__name__}: {exc}); {_FIX}"
            )
            raise _Extension.error from exc
        _register_python_parts()
        _Extension.with_cuda = with_cuda
        _Extension.loaded = True


def _csrc_dir() -> Path:
    """The C++/CUDA sources, shipped as the package data of memk.csrc."""
    from importlib.resources import files

    return Path(str(files("memk.csrc")))


def _build(with_cuda: bool) -> None:
    from torch.utils import cpp_extension

    csrc = _csrc_dir()
    sources = [str(csrc / name) for name in _CPU_SOURCES + (_CUDA_SOURCES if with_cuda else ())]
    cpp_extension.load(
        name="memk_logprob_cuda" if with_cuda else "memk_logprob_cpu",
        sources=sources,
        extra_include_paths=[str(csrc)],
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3", "-lineinfo"],
        with_cuda=with_cuda,
        is_python_module=False,
        verbose=os.environ.get("MEMK_VERBOSE_BUILD", "0") == "1",
    )


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


def _logprobs(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int | None, check_targets: bool | None
) -> torch.Tensor:
    """log p(target) shaped like targets (0 where target == ignore_index), through memk::logprob_fwd_v2."""
    check_logits_targets(logits, targets)
    if logits.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"logits must be float32, bfloat16, float16 or float64, got {logits.dtype}")
    if logits.device.type not in ("cpu", "cuda"):
        raise ValueError(f"the fused log-prob kernels run on cpu and cuda tensors, not {logits.device}; {_FIX}")
    vocab = logits.shape[-1]
    if vocab == 0:
        raise ValueError(f"logits have an empty vocabulary axis (shape {tuple(logits.shape)}); V must be >= 1")
    if not _Extension.loaded:
        load_extension()
    if logits.is_cuda and not _Extension.with_cuda:
        raise BackendUnavailable(
            "the fused log-prob kernels were built without CUDA (torch without CUDA, or no nvcc/CUDA_HOME "
            f"when they were built), so they cannot take {logits.device} tensors; {_FIX}"
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


def logprob_ops() -> LogprobOps:
    """The `fused` backend's ops, compiling them first if needed (raises BackendUnavailable)."""
    load_extension()
    return LogprobOps(token_logprobs, cross_entropy, sequence_bits)
