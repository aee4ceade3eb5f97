"""Which benchmark cases a run has: the suites, their default dtypes, and the groups and cases
of a selection, shared by `memk bench` (bench/cli.py) and `pytest bench/` (bench/conftest.py).

What a case is lives in case.py; each suite's groups in suite_logprob.py, suite_attention.py
and suite_model.py (train and bits).
"""

from __future__ import annotations

import torch

from .case import TORCH_DTYPES, Case, Group
from .suite_attention import attention_groups
from .suite_logprob import logprob_groups
from .suite_model import bits_groups, train_groups

SUITES = ("logprob", "attention", "train", "bits")
DTYPE_NAMES = tuple(TORCH_DTYPES)  # float32, tf32, bfloat16, float16

_BUILDERS = {"logprob": logprob_groups, "attention": attention_groups, "train": train_groups, "bits": bits_groups}


def default_dtypes(suite: str, device: torch.device) -> list[str]:
    """The dtypes a suite runs in when none are asked for (cli.py's --dtype help says the same)."""
    if device.type == "cuda":
        return {"logprob": ["bfloat16", "float32"], "attention": ["bfloat16"], "train": ["float32", "tf32", "bfloat16"],
                "bits": ["float32"]}[suite]
    return {"logprob": ["float32"], "attention": ["float32"], "train": ["float32", "bfloat16"], "bits": ["float32"]}[suite]


def groups_for(suites: list[str], device: torch.device, dtypes: list[str] | None = None, quick: bool = False) -> list[Group]:
    """The groups of the named suites; dtypes=None takes each suite's default for the device."""
    groups = []
    for suite in suites:
        if suite not in _BUILDERS:
            raise ValueError(f"unknown suite {suite!r}; choose from {', '.join(SUITES)} or all")
        groups += _BUILDERS[suite](device, dtypes or default_dtypes(suite, device), quick)
    return groups


def cases_for(groups: list[Group]) -> list[Case]:
    return [Case(g, v) for g in groups for v in g.variants]
