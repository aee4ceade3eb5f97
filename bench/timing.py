"""Timing, peak memory and environment metadata for memk's benchmarks.

CPU: pytest-benchmark's method (calibrate the number of calls per round until a round is
long against the timer's resolution, then many rounds, report the median), with the thread
count recorded. `pytest tests/benchmarks/bench_cases.py --benchmark-only` uses pytest-benchmark itself; `memk bench`
uses `time_cpu` below, which follows the same recipe so the two agree.

GPU: triton.testing.do_bench (warm-up, CUDA events around each repetition, the L2 cache
flushed before every repetition, median over the repetitions); the cases also rotate several
copies of their inputs. Where a host clock or memory counter reads GPU work (pytest-benchmark,
peak_memory), the call ends with a device synchronisation (common.synced, common.synchronize).
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import os
import platform
import resource
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass
from typing import Callable, NamedTuple

import torch

from .common import synchronize
from .roofline import cpu_isa_flags


@dataclass
class Timing:
    median_s: float
    mean_s: float
    stdev_s: float
    min_s: float
    max_s: float
    iqr_s: float
    rounds: int
    iterations_per_round: int
    method: str

    def to_dict(self) -> dict:
        return asdict(self)


def _summarise(per_call: list[float], iterations: int, method: str) -> Timing:
    per_call = sorted(per_call)
    quartiles = statistics.quantiles(per_call, n=4) if len(per_call) >= 2 else [per_call[0]] * 3
    return Timing(
        median_s=statistics.median(per_call),
        mean_s=statistics.fmean(per_call),
        stdev_s=statistics.stdev(per_call) if len(per_call) >= 2 else 0.0,
        min_s=per_call[0],
        max_s=per_call[-1],
        iqr_s=quartiles[2] - quartiles[0],
        rounds=len(per_call),
        iterations_per_round=iterations,
        method=method,
    )


def timer_precision(timer: Callable[[], float] = time.perf_counter) -> float:
    """The smallest non-zero step the timer shows (as pytest-benchmark estimates it)."""
    best = float("inf")
    for _ in range(20):
        t0 = timer()
        t1 = timer()
        while t1 == t0:
            t1 = timer()
        best = min(best, t1 - t0)
    return best


def time_cpu(
    fn: Callable[[], object],
    max_time: float = 1.0,
    min_rounds: int = 5,
    max_rounds: int = 1000,
    warmup_time: float = 0.05,
) -> Timing:
    """Median seconds per call of `fn` on the CPU, pytest-benchmark style.

    One call is made first (the caller has already made at least one: the correctness
    check), then warm-up calls for `warmup_time`; calls per round grow until a round lasts
    at least 100x the timer's resolution and 1 ms; rounds fill `max_time`, at least `min_rounds`
    (3 when one call alone outlasts `max_time`), and stop at twice `max_time` once `min_rounds`
    are in (calls slower than the planning call, on a busy machine, would overrun it).
    """
    precision = timer_precision()
    t0 = time.perf_counter()
    fn()
    single = time.perf_counter() - t0
    while time.perf_counter() - t0 < warmup_time:
        fn()
    min_round = max(100 * precision, 1e-3)
    iterations = 1
    while iterations * single < min_round:
        iterations *= 2
    if iterations * single > max_time:  # a call longer than the whole budget (a big training step): 3 rounds
        min_rounds = min(min_rounds, 3)
    rounds = int(min(max_rounds, max(min_rounds, max_time // max(iterations * single, 1e-9))))
    per_call = []
    started = time.perf_counter()
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(iterations):
            fn()
        per_call.append((time.perf_counter() - t0) / iterations)
        # The number of rounds was planned from one call; on a busy machine calls can take far
        # longer than that one did: stop at twice the budget once min_rounds are in.
        if len(per_call) >= min_rounds and time.perf_counter() - started > 2 * max_time:
            break
    return _summarise(per_call, iterations, f"perf_counter, calibrated rounds (pytest-benchmark style), threads={torch.get_num_threads()}")


def time_cuda(fn: Callable[[], object], warmup_ms: float = 25, rep_ms: float = 100) -> Timing:
    """Median seconds per call on the current CUDA device: triton.testing.do_bench, all repetitions kept."""
    try:
        import triton.testing

        times_ms = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="all")
        return _summarise([t / 1e3 for t in times_ms], 1, "triton.testing.do_bench (CUDA events, L2 flushed per rep)")
    except (ImportError, TypeError, ValueError):
        pass
    # Older triton without return_mode="all" (or none at all): the same recipe by hand.
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate_ms = max(start.elapsed_time(end) / 5, 1e-3)
    for _ in range(max(1, int(warmup_ms / estimate_ms))):
        fn()
    per_call = []
    for _ in range(max(10, int(rep_ms / estimate_ms))):
        flush.zero_()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        per_call.append(start.elapsed_time(end) / 1e3)
    return _summarise(per_call, 1, "CUDA events, L2 flushed per rep")


# ---- memory -------------------------------------------------------------------------------


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_rss_peak() -> bool:
    # Writing 5 to clear_refs resets the process's resident high-water mark (Linux >= 4.0).
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: the measurement is only less tight


def peak_memory(fn: Callable[[], object], device: torch.device) -> dict:
    """Peak memory one call of `fn` adds on top of what was already held.

    CUDA: the caching allocator's peak (max_memory_allocated) minus what was allocated before.
    CPU: the resident set's high-water mark (VmHWM, reset through /proc/self/clear_refs)
    minus the resident set before; freed memory the allocator keeps for reuse is not counted,
    so on CPU this can undercount a case that reuses buffers freed by the one before.
    """
    if device.type == "cuda":
        synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        return {"peak_bytes": int(torch.cuda.max_memory_allocated(device) - base), "kind": "cuda allocator peak above baseline"}
    _malloc_trim()  # hand freed heap pages back, so a reused free block cannot hide this call's peak
    before = _proc_status_kib("VmRSS")
    if before is not None and _reset_rss_peak():
        fn()
        hwm = _proc_status_kib("VmHWM")
        return {"peak_bytes": max(0, (hwm - before) * 1024), "kind": "resident set high-water above baseline (VmHWM)"}
    before_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    after_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_bytes": max(0, (after_max - before_max) * 1024), "kind": "growth of the process's lifetime peak RSS (ru_maxrss)"}


# ---- environment ----------------------------------------------------------------------------


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    """The commit of this checkout; in a copy without .git (a GPU machine's), MEMK_COMMIT if set."""
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or os.environ.get("MEMK_COMMIT")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("MEMK_COMMIT")


def _uncommitted_kernel_sources() -> list[str] | None:
    """Kernel sources that differ from the commit recorded (numbers then belong to the working tree)."""
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "-C", here, "status", "--porcelain", "--", "../kernels", "../csrc"],
                             capture_output=True, text=True, timeout=5)
        return [line[3:] for line in out.stdout.splitlines()] if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


# Other libraries some cases compare with (anchors.py); their versions go with every result.
COMPARED_LIBRARIES = ("liger-kernel", "cut-cross-entropy")


def _installed_version(distribution: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def environment(device: torch.device) -> dict:
    """What a number needs next to it to be read: machine, versions, threads, date."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = {
        "device_type": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "memk_commit": _git_commit(),
        "uncommitted_kernel_sources": _uncommitted_kernel_sources(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
    }
    env["libraries"] = {name: _installed_version(name) for name in COMPARED_LIBRARIES}
    env["cpu_isa_flags"] = cpu_isa_flags()  # the vector units of the CPU (the host's, on a GPU machine)
    try:
        env["load_average_1m"] = os.getloadavg()[0]
    except OSError:
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu_memory_bytes"] = props.total_memory
        env["compute_capability"] = f"{props.major}.{props.minor}"
    return env


# ---- peak throughput for MFU ---------------------------------------------------------------

# Dense (no sparsity) peak TFLOP/s from NVIDIA's datasheets, by substring of the device name;
# first match wins, so more specific names come first. float32 is the CUDA-core rate.
GPU_PEAK_TFLOPS: list[tuple[str, str, dict[str, float]]] = [
    ("H100 PCIe", "H100 PCIe datasheet", {"bfloat16": 756.0, "float16": 756.0, "tf32": 378.0, "float32": 51.0}),
    ("H100 NVL", "H100 NVL datasheet", {"bfloat16": 835.0, "float16": 835.0, "tf32": 418.0, "float32": 60.0}),
    ("H200", "H200 SXM datasheet", {"bfloat16": 989.0, "float16": 989.0, "tf32": 494.0, "float32": 67.0}),
    ("GH200", "GH200 datasheet", {"bfloat16": 989.0, "float16": 989.0, "tf32": 494.0, "float32": 67.0}),
    ("H100", "H100 SXM datasheet", {"bfloat16": 989.0, "float16": 989.0, "tf32": 494.0, "float32": 67.0}),
    ("A100", "A100 datasheet", {"bfloat16": 312.0, "float16": 312.0, "tf32": 156.0, "float32": 19.5}),
    ("L40S", "L40S datasheet", {"bfloat16": 362.0, "float16": 362.0, "tf32": 183.0, "float32": 91.6}),
    ("A10G", "A10G datasheet", {"bfloat16": 70.0, "float16": 70.0, "tf32": 35.0, "float32": 31.2}),
    ("L4", "L4 datasheet", {"bfloat16": 121.0, "float16": 121.0, "tf32": 60.0, "float32": 30.3}),
]


class PeakTflops(NamedTuple):
    tflops: float  # dense peak for one compute dtype
    source: str  # the datasheet it comes from


def peak_tflops(device_name: str, dtype: str) -> PeakTflops | None:
    """The peak dense TFLOP/s of a device name in a compute dtype, with its source, or None if unknown."""
    for key, source, peaks in GPU_PEAK_TFLOPS:
        if key in device_name and dtype in peaks:
            return PeakTflops(peaks[dtype], f"{source}, dense {dtype}")
    return None


# ---- peak memory bandwidth, for the bandwidth floor of memory-bound kernels -----------------

# HBM bandwidth in bytes/s from NVIDIA's datasheets (H100: "NVIDIA H100 Tensor Core GPU"
# datasheet, GPU memory bandwidth row; H200: "NVIDIA H200 Tensor Core GPU" datasheet), by
# substring of the device name; first match wins. torch names the H100 SXM5 "NVIDIA H100 80GB
# HBM3". GH200 ships with two memory configurations (4.0 or 4.9 TB/s) that its name does not
# tell apart, so it has no entry (and "GH200" must not fall through to "H200").
GPU_PEAK_BANDWIDTH: list[tuple[str, str, float | None]] = [
    ("GH200", "GH200: the memory configuration is not known from the name", None),
    ("H100 PCIe", "H100 PCIe datasheet, 2.0 TB/s HBM2e", 2.0e12),
    ("H100 NVL", "H100 NVL datasheet, 3.9 TB/s HBM3", 3.9e12),
    ("H100", "H100 SXM datasheet, 3.35 TB/s HBM3", 3.35e12),
    ("H200", "H200 datasheet (SXM and NVL), 4.8 TB/s HBM3e", 4.8e12),
]


class PeakBandwidth(NamedTuple):
    bytes_per_s: float
    source: str  # the datasheet it comes from


def peak_bandwidth(device_name: str) -> PeakBandwidth | None:
    """The datasheet memory bandwidth of a device name, with its source, or None if unknown."""
    for key, source, bandwidth in GPU_PEAK_BANDWIDTH:
        if key in device_name:
            return PeakBandwidth(bandwidth, source) if bandwidth else None
    return None
