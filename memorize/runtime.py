"""Where runs execute: the device, the kernel backends for it, and progress (bars on a terminal, lines in a log).

Shared by every experiment and executor; the backends come from memk.kernels' registry
through its public functions only.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator, NamedTuple

import torch

from memk import kernels

from .errors import ConfigError
from .model import GPTConfig, count_parameters, training_flops_per_sequence

EVAL_BATCH = 512  # sequences per forward pass when a model codes a dataset (bits.model_sequence_bits)
THREADS_ENV = "MEMK_NUM_THREADS"  # pins the CPU threads of every run
# Training FLOPs per step below which a run takes one CPU thread: a second gains little there,
# and a busy CPU makes OpenMP's waiting threads cost far more (bench/results/cpu-threads-2core.json).
ONE_THREAD_BELOW_FLOPS = 3e8


class Backends(NamedTuple):
    """The memk.kernels backends a model is built with."""

    attention: str
    logprob: str


def resolve_device(device: str) -> torch.device:
    """'auto' (CUDA where torch sees one, else the CPU), cpu, cuda or cuda:N; ConfigError otherwise."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but this torch sees no CUDA device; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {device!r} is not supported: use cpu or cuda")
    return dev


def cpu_threads_for(config: GPTConfig, batch_size: int) -> int:
    """The CPU threads a run of this model and batch trains with: MEMK_NUM_THREADS or
    OMP_NUM_THREADS where set, else one for small steps and every core this process may use."""
    return cpu_threads_for_flops(training_flops_per_sequence(config) * batch_size)


def cpu_threads_for_flops(flops: float) -> int:
    """The CPU threads for steps of `flops` each (cpu_threads_for): one while several runs train at
    once (cpu_threads_pinned), else the count the environment pins, else one below
    ONE_THREAD_BELOW_FLOPS and every core this process may use above."""
    if _pinned_threads:
        return _pinned_threads[-1]
    pinned = pinned_cpu_threads()
    if pinned is not None:
        return pinned
    return 1 if flops < ONE_THREAD_BELOW_FLOPS else cpu_cores()


def cpu_cores() -> int:
    """The cores this process may use."""
    return len(os.sched_getaffinity(0))


def pinned_cpu_threads() -> int | None:
    """The thread count MEMK_NUM_THREADS (or else OMP_NUM_THREADS) sets; None where neither is set."""
    for name in (THREADS_ENV, "OMP_NUM_THREADS"):
        pinned = os.environ.get(name, "").strip()
        if pinned:
            if not pinned.isdigit() or int(pinned) < 1:
                raise ConfigError(f"{name}={pinned!r} is not a thread count; set it to a positive integer or unset it")
            return int(pinned)
    return None


_pinned_threads: list[int] = []  # the innermost cpu_threads_pinned's count, while one is open


@contextmanager
def cpu_threads_pinned(threads: int) -> Iterator[None]:
    """Every run started inside takes `threads` torch threads, whatever its size (memorize/runs/workers.py:
    runs training side by side on threads of this process take one each); torch's count is restored after."""
    before = torch.get_num_threads()
    _pinned_threads.append(threads)
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        _pinned_threads.pop()
        torch.set_num_threads(before)


def use_cpu_threads(device: torch.device, config: GPTConfig, batch_size: int) -> None:
    """Set torch's CPU threads for a run (cpu_threads_for); nothing on CUDA."""
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads_for(config, batch_size))


def check_backends(attention_backend: str, logprob_backend: str) -> None:
    """Backend names must be 'auto' or registered in memk.kernels."""
    for kind, name, known in (
        ("attention", attention_backend, kernels.attention_backends()),
        ("log-prob", logprob_backend, kernels.logprob_backends()),
    ):
        if name != "auto" and name not in known:
            raise ConfigError(f"unknown {kind} backend {name!r}; choose auto or one of {', '.join(known)}")


def resolve_backends(device: torch.device, attention_backend: str, logprob_backend: str) -> Backends:
    """'auto' becomes the best backend memk.kernels has for the device."""
    return Backends(
        kernels.default_attention_backend(device) if attention_backend == "auto" else attention_backend,
        kernels.default_logprob_backend(device) if logprob_backend == "auto" else logprob_backend,
    )


LOG_INTERVAL_S = 30.0  # where stderr is no terminal, a bar's state is written at most this often (and as it ends)


def draws_bars(stream) -> bool:
    """Whether progress is drawn as bars redrawn in place: on a terminal only. A log or a pipe gets
    a plain line now and then instead (LogProgress), never a stream of carriage-return redraws."""
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress_bar(*, total=None, initial=0, desc="", unit="it", leave=True, disable=False, each_update=False, file=None):
    """A progress bar on stderr: tqdm's on a terminal (draws_bars), else a LogProgress with the same
    methods. each_update: in a log, a line at every update (e.g. a finished run) and not only every
    LOG_INTERVAL_S; leave=False bars (one run's steps) write no closing line there."""
    stream = sys.stderr if file is None else file
    if draws_bars(stream):
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=leave, disable=disable, file=stream,
                    dynamic_ncols=True)
    return LogProgress(total=total, initial=initial, desc=desc, unit=unit, leave=leave, disable=disable,
                       each_update=each_update, stream=stream)


class LogProgress:
    """Progress for a log: a plain line (desc, count, postfix, time elapsed) at most every
    `interval` seconds, at each update where each_update, and when a leave=True bar closes.
    The methods tqdm's bars are used with here: update, set_postfix, set_postfix_str, close."""

    def __init__(self, total=None, initial=0, desc="", unit="it", leave=True, disable=False, each_update=False,
                 stream=None, interval: float = LOG_INTERVAL_S, clock: Callable[[], float] = time.monotonic):
        self.total, self.n, self.desc, self.unit = total, initial, desc, unit
        self.leave, self.disable, self.each_update = leave, disable, each_update
        self.stream = sys.stderr if stream is None else stream
        self.interval, self.clock = interval, clock
        self.postfix = ""
        self.started = self.last_line = clock()
        self.written = None  # (count, postfix) of the last line written
        self.closed = False

    def update(self, n: int = 1) -> None:
        if self.disable or self.closed:
            return
        self.n += n
        if self.each_update or self.clock() - self.last_line >= self.interval:
            self._write()

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def set_postfix_str(self, s: str = "") -> None:
        self.postfix = s

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.leave and not self.disable and self.written != (self.n, self.postfix):
            self._write()

    def line(self) -> str:
        """The line this bar writes now."""
        count = f"{self.n}/{self.total}" if self.total is not None else f"{self.n}"
        elapsed = int(self.clock() - self.started)
        clock = f"{elapsed // 3600}:{elapsed // 60 % 60:02d}:{elapsed % 60:02d}"
        units = self.unit if self.unit == "it" else f"{self.unit}s"
        return f"{self.desc + ': ' if self.desc else ''}{count} {units}" + (
            f" ({self.postfix})" if self.postfix else "") + f" [{clock} elapsed]"

    def _write(self) -> None:
        self.last_line, self.written = self.clock(), (self.n, self.postfix)
        print(self.line(), file=self.stream, flush=True)


def step_progress(bar, max_steps: int) -> Callable[[dict], None]:
    """train_to_saturation's on_progress for a step bar: moved every 10 steps, loss and bits shown."""
    last = [0]

    def on_progress(p: dict) -> None:
        if p["step"] % 10 == 0 or p["step"] == max_steps:
            bar.update(p["step"] - last[0])
            last[0] = p["step"]
            bar.set_postfix(loss=f"{p['loss']:.3f}", bits=f"{p['bits']:.0f}")

    return on_progress


def free_memory_bytes(device: torch.device) -> int | None:
    """Memory a run could still take on the device: CUDA's free memory, or the kernel's
    MemAvailable on the CPU; None where it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def training_memory_bytes(config: GPTConfig, n_sequences: int, batch_size: int, dataset_copies: int = 2) -> int:
    """A generous estimate of what training one run holds at its peak: the dataset (int64,
    `dataset_copies` at once while it is drawn), the parameters with their gradients and AdamW
    moments, one step's activations and the logits of an evaluation batch."""
    d, V, S, L = config.d_model, config.vocab_size, config.seq_len, config.n_layer
    dataset = dataset_copies * n_sequences * S * 8
    weights = 4 * 4 * count_parameters(config)
    activations = 4 * 3 * batch_size * S * (L * (16 * d + 2 * config.n_head * S) + 2 * V)
    evaluation = 4 * 2 * min(n_sequences, EVAL_BATCH) * S * V
    return dataset + weights + activations + evaluation


def check_fits(need: int, device: torch.device, what: str, fix: str) -> None:
    """ConfigError, before anything is allocated, where `need` bytes exceed what the device has free."""
    free = free_memory_bytes(device)
    if free is not None and need > free:
        raise ConfigError(
            f"{what} needs about {need / 2**30:.1f} GiB, but {device.type} has {free / 2**30:.1f} GiB free; {fix}"
        )
