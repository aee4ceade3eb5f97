"""torch.compile'd baselines of the benchmarks: a fresh dynamo state for each, none under --quick."""

from __future__ import annotations

from typing import Callable

import torch

from .case import skip_compile_when_quick


def compiled(fn: Callable) -> Callable:
    # A fresh dynamo state per variant: the same closure code compiled for many shapes would
    # otherwise hit the recompile limit and silently fall back to eager.
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


def compiled_or_skip(fn: Callable, quick: bool) -> Callable[[torch.device], Callable]:
    """A variant's get(device): fn compiled, or Skip under --quick."""

    def get(device: torch.device) -> Callable:
        skip_compile_when_quick(quick)
        return compiled(fn)

    return get
