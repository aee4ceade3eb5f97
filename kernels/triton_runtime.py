"""Triton on a GPU or under its interpreter: what memk's Triton kernels share.

Under the interpreter (TRITON_INTERPRET=1, set before triton is imported: tests on the CPU)
kernels run as Python on CPU tensors; the autotuner would time every config there, which takes
minutes, so autotune_configs gives it one, and launch leaves torch.compile's wrapper out.
"""

from __future__ import annotations

import os

import torch
import triton


def interpreting() -> bool:
    try:
        return bool(triton.knobs.runtime.interpret)
    except AttributeError:  # triton without knobs
        return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Read once: triton.jit decides at decoration time whether kernels are interpreted.
INTERPRET = interpreting()


def autotune_configs(gpu: list[triton.Config], interpreter: triton.Config) -> list[triton.Config]:
    """The configs an autotuned kernel tries: `gpu` on a GPU; under the interpreter just `interpreter`,
    launched directly (timing every config on the CPU takes minutes; one still exercises every code path)."""
    return [interpreter] if INTERPRET else gpu


def launch(kernel):
    """The kernel as torch.compile can trace its launch (wrap_triton); interpreted kernels are launched
    as they are (older torch rejects them in wrap_triton)."""
    return kernel if INTERPRET else torch.library.wrap_triton(kernel)
