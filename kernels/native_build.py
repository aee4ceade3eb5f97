"""Compile memk's native library (csrc/) once per environment and sources, and load it; never hang.

Built with torch.utils.cpp_extension on first use, cached on disk. What the library holds (the
fused log-prob operators) and the Python parts they need are fused_logprob.py's; this module knows
only how the library gets compiled and loaded:

- what a build needs (missing_build_requirements, can_build): a C++ compiler, ninja, and for the
  CUDA kernels a CUDA build of torch and the CUDA toolkit; checked without compiling anything;
- where it builds (build_directory): each Python environment, torch build and version of the
  sources gets its own folder, under TORCH_EXTENSIONS_DIR or torch's default
  ~/.cache/torch_extensions, so environments never rebuild over one another;
- building it safely (load_library): a build holds an flock on memk-build.lock in that folder;
  the kernel drops it when the process ends, however it ends, so a dead build never blocks the
  next one. torch's own marker, a file named `lock` that a killed build leaves behind and that
  torch would wait on forever, is removed, with a one-line warning, by whoever holds memk's lock
  (once any compilers the dead build left running in the folder have finished). A process waiting
  for another's build, or for such compilers, says so on stderr after BUILD_WAIT_NOTICE_S and
  gives up after BUILD_WAIT_LIMIT_S with an error naming what it waited for and the fix.

Whatever goes wrong is a BackendUnavailable naming the pure-PyTorch `reference` backend as the
way around it (REFERENCE_BACKEND_FIX).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

try:
    import fcntl
except ImportError:  # not POSIX: builds are not locked against each other
    fcntl = None

import torch

from .interfaces import BackendUnavailable

CPU_SOURCES = ("logprob_cpu.cpp", "logprob_binding.cpp")
CUDA_SOURCES = ("logprob_cuda.cu", "logprob_binding_cuda.cpp")
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
REFERENCE_BACKEND_FIX = (
    "use the pure-PyTorch backend instead: memk.kernels.logprob_ops('reference') "
    "(or logprob_backend='reference')"
)


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


def cuda_toolkit_found() -> bool:
    """True where torch is a CUDA build and the CUDA toolkit (nvcc, CUDA_HOME) is found."""
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
    if device.type == "cuda" and not cuda_toolkit_found():
        return (
            "the CUDA kernels need a CUDA build of torch and the CUDA toolkit (nvcc; set CUDA_HOME), "
            f"but torch.version.cuda is {torch.version.cuda!r} and no toolkit was found"
        )
    return None


def can_build(device: torch.device | str = "cpu") -> bool:
    """True where the fused kernels can be compiled for `device` (compiler present); builds nothing."""
    return missing_build_requirements(device) is None


def load_library() -> bool:
    """Compile the library (first time only; cached on disk) and load it into this process.

    Returns whether it holds the CUDA kernels (built where torch has CUDA, nvcc is found and a
    GPU is present). Raises BackendUnavailable saying why it cannot, and the way around it.
    """
    missing = missing_build_requirements("cpu")
    if missing is not None:
        raise BackendUnavailable(f"the fused log-prob kernels cannot be built: {missing}; {REFERENCE_BACKEND_FIX}")
    # A CUDA build of torch on a machine without a GPU has no architecture to compile for
    # (torch's arch list comes out empty): build the CPU kernels there.
    with_cuda = cuda_toolkit_found() and torch.cuda.is_available()
    try:
        _build(with_cuda)
    except BackendUnavailable:  # gave up waiting for another build: says what and how around it
        raise
    except Exception as exc:  # compiler errors, missing headers, ...: say what and how around it
        raise BackendUnavailable(
            f"building the fused log-prob kernels failed ({type(exc).__name__}: {exc}); {REFERENCE_BACKEND_FIX}"
        ) from exc
    return with_cuda


def csrc_dir() -> Path:
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
    csrc = csrc_dir()
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
    sources = CPU_SOURCES + (CUDA_SOURCES if with_cuda else ())
    headers = tuple(sorted(p.name for p in csrc.iterdir() if p.suffix in (".h", ".cuh")))
    for name in sources + headers:
        digest.update(name.encode() + b"\0" + (csrc / name).read_bytes() + b"\0")
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    folder = f"{_extension_name(with_cuda)}-{python}-torch{torch.__version__}-{digest.hexdigest()[:16]}"
    return Path(root) / "memk" / folder


def _build(with_cuda: bool) -> None:
    cpp_extension = _cpp_extension()

    csrc = csrc_dir()
    build_dir = build_directory(with_cuda)
    sources = [str(csrc / name) for name in CPU_SOURCES + (CUDA_SOURCES if with_cuda else ())]
    with build_lock(build_dir):
        remove_stale_baton(build_dir)
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


def lock_path(build_dir: Path) -> Path:
    """memk's lock file in a build folder."""
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
            raise BackendUnavailable(
                f"gave up after {waited:.0f} s waiting for {waiting_for()}; {fix}; or {REFERENCE_BACKEND_FIX}"
            )
        if not told and waited >= BUILD_WAIT_NOTICE_S:
            _warn(f"waiting for {waiting_for()} (giving up after {BUILD_WAIT_LIMIT_S:.0f} s)")
            told = True
        time.sleep(0.1)


@contextlib.contextmanager
def build_lock(build_dir: Path) -> Iterator[None]:
    """Hold the build folder's lock (an flock, so it dies with its process); wait a bounded time for it.

    The lock file stays when released: deleting it would let a waiter that had opened the old
    file and a newcomer that creates a new one both hold "the" lock. Its content, the holder's
    pid, is for messages only.
    """
    build_dir.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield
        return
    lock = lock_path(build_dir)
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


def remove_stale_baton(build_dir: Path) -> None:
    """Remove torch's build marker `lock` if a killed build left it; call only holding build_lock.

    torch.utils.cpp_extension creates it with O_EXCL for the length of a build and waits, with
    no limit, for it to disappear. Every memk build in this folder holds build_lock for as long
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
