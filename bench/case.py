"""What a benchmark case is, and the helpers every suite builds its cases with.

A Group is one measurement setting (suite, operation, shapes, dtype, the size swept): it makes
the inputs once and knows how to check any implementation's answer against an independent
float64 computation. Its Variants are the implementations compared on those inputs: baselines
(what a user would otherwise write: log_softmax + gather, F.cross_entropy eager or compiled,
each torch SDPA backend with the model's layout copies, the reference model) and candidates
(memk's backends, found through the registry in memk.kernels). Ratios are computed only
between variants of one group, in one run. A Case is one variant of one group: one row of the
results.

A variant that cannot run here raises Skip (or the registry's BackendUnavailable) while it is
built; the runner reports it as skipped with the reason, and the suite goes on.

The suites' groups are defined in suite_logprob.py, suite_attention.py and suite_model.py;
cases.py selects among them.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from memk import kernels
from memk.kernels.interfaces import LogprobOps, PackedAttention

# The dtypes a case can run in; tf32 is float32 tensors with TF32 matmuls (train suite, CUDA).
TORCH_DTYPES = {"float32": torch.float32, "tf32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Backends every suite looks for even before they are registered, so a missing one shows up
# as "skipped: not registered" in the table instead of silently vanishing.
EXPECTED_LOGPROB_BACKENDS = ("fused",)
EXPECTED_ATTENTION_BACKENDS = ("triton",)


class Skip(Exception):
    """This variant cannot run here; the message says why."""


# ---- the data model -----------------------------------------------------------------------


@dataclass
class Runner:
    """A built variant. `call` is what is timed; `outputs` gives the tensors the check reads."""

    call: Callable[[], Any]
    outputs: Callable[[], dict[str, torch.Tensor]]
    close: Callable[[], None] = lambda: None
    # frees what one call leaves behind (gradients), so the memory measurement starts clean
    reset: Callable[[], None] = lambda: None


@dataclass
class Variant:
    name: str
    role: str  # "baseline" | "candidate"
    build: Callable[[dict, torch.device], Runner]
    description: str = ""
    compare_to: tuple[str, ...] = ()  # baseline variants of the same group this one is divided by
    dtype: str | None = None  # when the variants of a group differ in dtype (train): this one's


@dataclass
class Group:
    suite: str
    family: str  # the group minus the swept size: what a scaling curve is drawn over
    sweep_axis: str
    sweep_value: int
    dtype: str
    params: dict
    make_inputs: Callable[[torch.device], dict]
    # check(inputs, outputs) -> {name: (error, tolerance)}; error > tolerance (or NaN) refuses the variant.
    check: Callable[[dict, dict], dict[str, tuple[float, float]]]
    work: int  # units of work per call, for throughput
    work_unit: str  # "tokens" | "sequences"
    flops: float | None = None  # model FLOPs per call (train, attention), for TFLOP/s and MFU
    # floor(inputs, device) -> the least time a call can take on this machine, measured next to the
    # group's cases ({"time_s", "bound", ...}, roofline.py), or None; every time is reported as a fraction of it
    floor: Callable[[dict, torch.device], dict | None] | None = None
    variants: list[Variant] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.suite}/{self.family}/{self.sweep_axis}={self.sweep_value}"


@dataclass
class Case:
    group: Group
    variant: Variant

    @property
    def id(self) -> str:
        return f"{self.group.key}/{self.variant.name}".replace(" ", "_")

    @property
    def dtype(self) -> str:
        """The dtype this case computes in: the variant's own where the group mixes dtypes (train)."""
        return self.variant.dtype or self.group.dtype


# ---- checking against float64 -------------------------------------------------------------


def rel_tolerance(dtype: torch.dtype, device: torch.device, matmul: bool = False) -> float:
    """Error allowed relative to the largest reference magnitude, by the dtype of the compared tensor.

    float32 must agree to ~100 ulps of the largest value (measured errors are ~1e-7), except
    matmuls on CUDA, which may round like TF32 (Triton's tl.dot default for float32).
    bfloat16/float16: a few of their ulps.
    """
    if dtype == torch.bfloat16:
        return 3e-2
    if dtype == torch.float16:
        return 5e-3
    if matmul and device.type == "cuda":
        return 5e-3
    return 1e-5


def max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|; inf when shapes differ, NaN propagates."""
    if tuple(actual.shape) != tuple(expected.shape):
        return float("inf")
    diff = (actual.detach().double() - expected.double()).abs().max().item() if actual.numel() else 0.0
    scale = expected.double().abs().max().item() if expected.numel() else 1.0
    return diff / max(scale, 1e-30)


def norm_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| over the whole tensor (used for parameter gradients)."""
    if tuple(actual.shape) != tuple(expected.shape):
        return float("inf")
    return ((actual.detach().double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30)).item()


# ---- input rotation -----------------------------------------------------------------------


def rotations(bytes_per_copy: int, device: torch.device) -> int:
    """How many copies of the inputs to cycle through so that the working set outgrows the
    last-level cache (H100 L2 is 50 MB; a server CPU's L3 a few tens of MB)."""
    target = (128 if device.type == "cuda" else 64) * 2**20
    return max(1, min(4, math.ceil(target / max(bytes_per_copy, 1))))


class Cycle:
    """Hands out the rotated input copies in turn."""

    def __init__(self, items: list):
        self.items, self.i = items, 0

    def next(self):
        item = self.items[self.i]
        self.i = (self.i + 1) % len(self.items)
        return item


def skip_compile_when_quick(quick: bool) -> None:
    """--quick leaves torch.compile baselines out: a cold compile takes ~20 s on 2 cores."""
    if quick:
        raise Skip("torch.compile baselines run in the full suite only (a cold compile takes ~20 s on 2 cores)")


# ---- memk's backends, from the registry -----------------------------------------------------


def logprob_ops_or_skip(name: str) -> LogprobOps:
    """The registry's ops for backend `name`, or Skip saying why they cannot be had."""
    if name not in kernels.logprob_backends():
        raise Skip(f"log-prob backend {name!r} is not registered (have {kernels.logprob_backends()})")
    try:
        return kernels.logprob_ops(name)
    except kernels.BackendUnavailable as exc:
        raise Skip(f"log-prob backend {name!r} unavailable: {exc}") from exc


def interpreter_active() -> bool:
    """Triton runs its kernels on the CPU, in Python (TRITON_INTERPRET=1, read when triton is imported)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def packed_attention_or_skip(name: str, device: torch.device, interpreter: bool = False,
                             dtype: str | None = None) -> PackedAttention:
    """The registry's packed attention for backend `name`, or Skip saying why it cannot run on `device`
    in `dtype` (the dtype attention computes in, where known).

    interpreter: on CPU, run the triton backend under Triton's interpreter (TRITON_INTERPRET=1 must
    be set before triton is imported). That checks the code path end to end, e.g. in the CPU mode
    of bench/gpu_acceptance.sh; its times mean nothing.
    """
    if name not in kernels.attention_backends():
        raise Skip(f"attention backend {name!r} is not registered (have {kernels.attention_backends()})")
    if name == "triton" and device.type != "cuda":
        if not interpreter:
            raise Skip("the triton attention backend runs on CUDA; on CPU only the interpreter runs it "
                       "(memk bench --triton-interpreter), and interpreter timings mean nothing")
        if not interpreter_active():
            raise Skip("--triton-interpreter needs TRITON_INTERPRET=1 in the environment before triton is imported")
        if dtype == "bfloat16":
            raise Skip("Triton's interpreter computes bfloat16 dots wrongly (tests/test_flash_attention.py says so); "
                       "bfloat16 runs on CUDA only")
    try:
        return kernels.packed_attention(name)
    except kernels.BackendUnavailable as exc:
        raise Skip(f"attention backend {name!r} unavailable: {exc}") from exc


def candidate_logprob_backends(backends: list[str] | None = None) -> list[str]:
    """The log-prob backends benchmarked as candidates: `backends` if given, else every one but the reference."""
    if backends is not None:
        return list(backends)
    names = set(EXPECTED_LOGPROB_BACKENDS) | set(kernels.logprob_backends())
    return sorted(names - {"reference"})


def candidate_attention_backends(backends: list[str] | None = None) -> list[str]:
    """The attention backends benchmarked as candidates: `backends` if given, else every one but torch's."""
    if backends is not None:
        return list(backends)
    names = set(EXPECTED_ATTENTION_BACKENDS) | set(kernels.attention_backends())
    return sorted(names - {"reference", "sdpa"})
