"""What memk bench's front ends share: the device a run uses, waiting for it, and how times,
rates and sizes are written.

`memk bench` (cli.py, run.py), the pytest-benchmark front end (conftest.py,
tests/benchmarks/bench_cases.py) and the benchmarks page's report (report.py) all use these, so a number reads the
same in the terminal table and on the page.
"""

from __future__ import annotations

from typing import Callable

import torch


def resolve_device(name: str | None) -> torch.device:
    """The device named ("cpu" or "cuda"), or cuda where torch sees one and cpu elsewhere; ValueError otherwise."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch sees no CUDA device here; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {name!r}")
    return device


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on `device` (CUDA runs asynchronously; the CPU needs no wait)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synced(fn: Callable[[], object], device: torch.device) -> Callable[[], None]:
    """`fn` followed by a synchronisation of `device`, so a clock around the call covers its kernels."""
    if device.type != "cuda":
        return fn

    def call():
        fn()
        synchronize(device)

    return call


# ---- numbers with units: three significant digits, in the largest unit the value reaches ----

_TIME_UNITS = ((1.0, "s"), (1e-3, "ms"), (1e-6, "µs"))
_RATE_PREFIXES = ((1e9, "G"), (1e6, "M"), (1e3, "k"), (1.0, ""))
_BYTE_UNITS = ((2.0**30, "GiB"), (2.0**20, "MiB"), (2.0**10, "KiB"), (1.0, "B"))


def _with_unit(value: float, units: tuple[tuple[float, str], ...]) -> str:
    """value written in the first of `units` ((size, name), largest first) it reaches, else the last."""
    size, name = next(((s, n) for s, n in units if value >= s), units[-1])
    digits = f"{value / size:.3g}"
    if "e" in digits:  # 1000 or more of the largest unit (or rounded up to it): whole units, no exponent
        digits = f"{value / size:.0f}"
    return f"{digits} {name}"


def format_time(seconds: float) -> str:
    """E.g. "1.23 s", "45.6 ms", "789 µs"."""
    return _with_unit(seconds, _TIME_UNITS)


def format_rate(per_second: float, unit: str) -> str:
    """E.g. format_rate(942570, "tokens/s") == "943 ktokens/s"."""
    return _with_unit(per_second, tuple((size, prefix + unit) for size, prefix in _RATE_PREFIXES))


def format_bytes(n: int | None) -> str:
    """E.g. "512 B", "40 KiB", "31.9 MiB", "1.53 GiB"; "–" where nothing was measured."""
    if n is None:
        return "–"
    return _with_unit(n, _BYTE_UNITS)
