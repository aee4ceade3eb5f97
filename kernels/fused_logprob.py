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
memk::logprob_bwd_v2 (with autograd, for the backward too, so second derivatives are right, and fake/meta implementations, so they work under torch.compile) and compiled with
torch.utils.cpp_extension on first use, then cached (the CUDA part is built only where torch
has CUDA, nvcc is found and a GPU is present). Importing this module compiles nothing. Without a compiler the
ops raise BackendUnavailable, which names the pure-PyTorch `reference` backend as the way
around it.

Building: each Python environment, torch build and version of the sources gets its own build
folder (build_directory()), under TORCH_EXTENSIONS_DIR or torch's default
~/.cache/torch_extensions, so environments never rebuild over one another. A build holds an
flock on memk-build.lock in that folder; the kernel drops it when the process ends, however
it ends, so a dead build never blocks the next one. torch's own marker, a file named `lock`
that a killed build leaves behind and that torch would wait on forever, is removed, with a
one-line warning, by whoever holds memk's lock (once any compilers the dead build left
running in the folder have finished). A process waiting for another's build, or for such
compilers, says so on stderr after BUILD_WAIT_NOTICE_S and gives up after BUILD_WAIT_LIMIT_S
with an error naming what it waited for and the fix.

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

import contextlib
import hashlib
import logging
import math
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

try:
    import fcntl
except ImportError:  # not POSIX: builds are not locked against each other
    fcntl = None

import torch

from .interfaces import BackendUnavailable, LogprobOps
from .reference import check_logits_targets

LN2 = math.log(2.0)
CHECK_TARGETS = os.environ.get("MEMK_CHECK_TARGETS", "1") != "0"
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
REDUCTIONS = ("mean", "sum", "none")

_CPU_SOURCES = ("logprob_cpu.cpp", "logprob_binding.cpp")
_CUDA_SOURCES = ("logprob_cuda.cu", "logprob_binding_cuda.cpp")
# -fopenmp: at::parallel_for is header code that runs the kernel's rows on torch's OpenMP threads only
# where the extension is compiled with OpenMP (without it, one thread); the library then loads the
# libgomp.so.1 torch has loaded already. Linux only (torch's macOS and Windows builds differ).
_OPENMP = ("-fopenmp",) if sys.platform.startswith("linux") else ()
_CFLAGS = ("-O3",) + _OPENMP
_LDFLAGS = _OPENMP
_CUDA_CFLAGS = ("-O3", "-lineinfo")
# Waiting for another process's build: say so after this long, give up after this long.
BUILD_WAIT_NOTICE_S = 10.0
BUILD_WAIT_LIMIT_S = 1200.0
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


def _cpp_extension():
    """torch.utils.cpp_extension, imported without the warning a CUDA build of torch logs where no
    CUDA runtime is (a CPU machine): memk builds its CPU kernels there, and its one-line errors stay one line."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        logger.setLevel(level)
    return cpp_extension


def _cuda_toolkit_found() -> bool:
    cpp_extension = _cpp_extension()

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
        # A CUDA build of torch on a machine without a GPU has no architecture to compile for
        # (torch's arch list comes out empty): build the CPU kernels there.
        with_cuda = _cuda_toolkit_found() and torch.cuda.is_available()
        try:
            _build(with_cuda)
        except BackendUnavailable as exc:  # gave up waiting for another build: says what and how around it
            _Extension.error = exc
            raise
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


def _extension_name(with_cuda: bool) -> str:
    return "memk_logprob_cuda" if with_cuda else "memk_logprob_cpu"


def build_directory(with_cuda: bool) -> Path:
    """The folder the kernels build in: one per Python environment, torch build and version of the sources.

    <TORCH_EXTENSIONS_DIR, else ~/.cache/torch_extensions>/memk/memk_logprob_{cpu,cuda}-py3X-torch<version>-<digest>,
    the digest over the environment (sys.prefix), Python, torch and its CUDA version, the compiler
    (CXX), the flags and the bytes of every source and header. A new version of the sources
    builds in a new folder; old ones are left in place.
    """
    cpp_extension = _cpp_extension()

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    csrc = _csrc_dir()
    digest = hashlib.sha256()
    for part in (
        os.path.realpath(sys.prefix),
        sys.version,
        torch.__version__,
        str(torch.version.cuda),
        str(cpp_extension.CUDA_HOME) if with_cuda else "",
        os.environ.get("CXX", ""),
        repr((_CFLAGS, _LDFLAGS, _CUDA_CFLAGS if with_cuda else ())),
    ):
        digest.update(part.encode() + b"\0")
    sources = _CPU_SOURCES + (_CUDA_SOURCES if with_cuda else ())
    headers = tuple(sorted(p.name for p in csrc.iterdir() if p.suffix in (".h", ".cuh")))
    for name in sources + headers:
        digest.update(name.encode() + b"\0" + (csrc / name).read_bytes() + b"\0")
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    folder = f"{_extension_name(with_cuda)}-{python}-torch{torch.__version__}-{digest.hexdigest()[:16]}"
    return Path(root) / "memk" / folder


def _build(with_cuda: bool) -> None:
    cpp_extension = _cpp_extension()

    csrc = _csrc_dir()
    build_dir = build_directory(with_cuda)
    sources = [str(csrc / name) for name in _CPU_SOURCES + (_CUDA_SOURCES if with_cuda else ())]
    with _build_lock(build_dir):
        _remove_stale_baton(build_dir)
        cpp_extension.load(
            name=_extension_name(with_cuda),
            sources=sources,
            extra_include_paths=[str(csrc)],
            extra_cflags=list(_CFLAGS),
            extra_ldflags=list(_LDFLAGS),
            extra_cuda_cflags=list(_CUDA_CFLAGS),
            build_directory=str(build_dir),
            with_cuda=with_cuda,
            is_python_module=False,
            verbose=os.environ.get("MEMK_VERBOSE_BUILD", "0") == "1",
        )


def _warn(message: str) -> None:
    print(f"memk: warning: {message}", file=sys.stderr, flush=True)


def _lock_path(build_dir: Path) -> Path:
    return build_dir / "memk-build.lock"


def _lock_holder(lock: Path) -> str:
    """'process <pid>' as the holder wrote it into the lock file, or 'another process'."""
    try:
        pid = int(lock.read_text().strip())
    except (OSError, ValueError):
        return "another process"
    return f"process {pid}"


def _wait_until(ready: Callable[[], bool], waiting_for: Callable[[], str], fix: str) -> None:
    """Poll ready() until true; say what we wait for after BUILD_WAIT_NOTICE_S; give up after BUILD_WAIT_LIMIT_S."""
    start = time.monotonic()
    told = False
    while not ready():
        waited = time.monotonic() - start
        if waited >= BUILD_WAIT_LIMIT_S:
            raise BackendUnavailable(f"gave up after {waited:.0f} s waiting for {waiting_for()}; {fix}; or {_FIX}")
        if not told and waited >= BUILD_WAIT_NOTICE_S:
            _warn(f"waiting for {waiting_for()} (giving up after {BUILD_WAIT_LIMIT_S:.0f} s)")
            told = True
        time.sleep(0.1)


@contextlib.contextmanager
def _build_lock(build_dir: Path) -> Iterator[None]:
    """Hold the build folder's lock (an flock, so it dies with its process); wait a bounded time for it.

    The lock file stays when released: deleting it would let a waiter that had opened the old
    file and a newcomer that creates a new one both hold "the" lock. Its content, the holder's
    pid, is for messages only.
    """
    build_dir.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield
        return
    lock = _lock_path(build_dir)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)

    def acquired() -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    try:
        _wait_until(
            acquired,
            lambda: f"{_lock_holder(lock)}, which holds {lock} while it builds the fused log-prob kernels",
            "if that process is stuck, end it and run again",
        )
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the flock


def _processes_working_in(folder: Path) -> list[int]:
    """Processes (not this one) whose working directory is `folder` (Linux /proc; [] elsewhere).

    torch runs ninja, and ninja the compilers, in the build folder: a builder killed alone
    (kill -9, the OOM killer) leaves them running there, orphaned.
    """
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    target = os.path.realpath(folder)
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if os.readlink(entry / "cwd") == target:
                found.append(int(entry.name))
        except OSError:  # gone, or another user's
            continue
    return found


def _remove_stale_baton(build_dir: Path) -> None:
    """Remove torch's build marker `lock` if a killed build left it; call only holding _build_lock.

    torch.utils.cpp_extension creates it with O_EXCL for the length of a build and waits, with
    no limit, for it to disappear. Every memk build in this folder holds _build_lock for as long
    as the marker exists, so one found while holding that lock was left by a dead process. Its
    compilers may outlive it: wait for them before building over their outputs.
    """
    baton = build_dir / "lock"
    if not baton.exists():
        return
    _wait_until(
        lambda: not _processes_working_in(build_dir),
        lambda: f"processes {', '.join(map(str, _processes_working_in(build_dir)))} left running in {build_dir} "
        "by an interrupted build",
        "end them (kill PID) and run again",
    )
    _warn(f"removed {baton}, left by a build of the fused kernels that was interrupted; building again")
    baton.unlink(missing_ok=True)


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
