"""Which benchmark cases a run has: the suites, their default dtypes, the presets, and the groups
and cases of a selection, shared by `memk bench` (bench/cli.py) and `pytest tests/benchmarks/bench_cases.py` (tests/benchmarks/conftest.py).

What a case is lives in case.py; each suite's groups in suite_logprob.py, suite_attention.py
suite_model.py (train and bits) and suite_ensemble.py (the train suite's ensemble cases). The names the command line offers (suites, dtypes,
presets) live in choices.py, free of torch.
"""

from __future__ import annotations

import torch

from .case import TORCH_DTYPES, Case, Group
from .choices import DTYPE_NAMES, PRESETS, SUITES
from .suite_attention import attention_groups
from .suite_ensemble import ensemble_groups, paper_configs
from .suite_logprob import logprob_groups
from .suite_model import bits_groups, train_groups

__all__ = ["DTYPE_NAMES", "PRESETS", "SUITES", "TORCH_DTYPES", "acceptance_groups", "cases_for", "default_dtypes",
           "groups_for"]



def _train_and_ensemble_groups(device: torch.device, dtypes: list[str], quick: bool, interpreter: bool = False):
    """The train suite: one model's step per size and backend, then K runs one at a time against their ensemble."""
    return train_groups(device, dtypes, quick, interpreter=interpreter) + ensemble_groups(device, dtypes, quick)


_BUILDERS = {"logprob": logprob_groups, "attention": attention_groups, "train": _train_and_ensemble_groups,
             "bits": bits_groups}

# The acceptance run's sizes (PRESETS["acceptance"] says the same in words). GPU: the issue's;
# with --quick: the same cases small enough for a 2-core CPU and Triton's interpreter.
ACCEPTANCE_TOKENS = 131072  # log-prob rows, and tokens per attention call (seq 64: batch 2048, the paper's)
ACCEPTANCE_VOCAB = 2048
ACCEPTANCE_D_MODEL = 128  # the linear_cross_entropy family's hidden size (the paper's 2x128 model)
ACCEPTANCE_ATTENTION = [(64, 32), (64, 64), (1024, 64)]  # (seq, head_dim)
ACCEPTANCE_MODELS = [(1, 64, 2), (2, 128, 4)]  # (n_layer, d_model, n_head), the paper's grid
ACCEPTANCE_BATCH = 2048  # the paper's batch
# Ensembles of the paper's 1x64 model at its batch: K runs one at a time against one stacked model
# (the 5x target of the ensemble issue); compiled only at the largest K in bfloat16 (the paper's
# precision), since every K and dtype compiles anew.
ACCEPTANCE_ENSEMBLE = {"configs": paper_configs([64]), "batches": [ACCEPTANCE_BATCH], "members": [1, 8, 32],
                       "compile_members": [32], "compile_dtypes": ["bfloat16"]}
# The long sequence is 256 with --quick: still the blocked kernel (beyond 128 tokens), at a
# size Triton's interpreter runs in seconds.
_QUICK = {"tokens": 4096, "d_model": 32, "attention": [(64, 32), (64, 64), (256, 64)], "attention_tokens": 1024,
          "n_head": 2, "models": [(1, 32, 2)], "batch": 16,
          "ensemble": {"configs": paper_configs([32]), "batches": [16], "members": [1, 4], "compile_members": [4]}}
ACCEPTANCE_DTYPES = {"logprob": ["bfloat16", "float32"], "attention": ["bfloat16"], "train": ["float32", "bfloat16"]}
# CPU attention runs in float32: Triton's interpreter gets bfloat16 dots wrong (case.py).
_QUICK_DTYPES = {**ACCEPTANCE_DTYPES, "attention": ["float32"]}


def default_dtypes(suite: str, device: torch.device) -> list[str]:
    """The dtypes a suite runs in when none are asked for (cli.py's --dtype help says the same)."""
    if device.type == "cuda":
        return {"logprob": ["bfloat16", "float32"], "attention": ["bfloat16"], "train": ["float32", "tf32", "bfloat16"],
                "bits": ["float32"]}[suite]
    return {"logprob": ["float32"], "attention": ["float32"], "train": ["float32", "bfloat16"], "bits": ["float32"]}[suite]


def acceptance_groups(suite: str, device: torch.device, dtypes: list[str] | None, quick: bool,
                      interpreter: bool = False) -> list[Group]:
    """The groups the acceptance run measures in one suite (none in bits)."""
    dtypes = dtypes or (_QUICK_DTYPES if quick else ACCEPTANCE_DTYPES).get(suite, [])
    tokens = _QUICK["tokens"] if quick else ACCEPTANCE_TOKENS
    if suite == "logprob":
        d_model = _QUICK["d_model"] if quick else ACCEPTANCE_D_MODEL
        return logprob_groups(device, dtypes, quick, shapes=[(ACCEPTANCE_VOCAB, tokens)], ops=(("cross_entropy", True),),
                              linear_shapes=[(ACCEPTANCE_VOCAB, tokens, d_model)], head_shapes=[])
    if suite == "attention":
        return attention_groups(device, dtypes, quick, interpreter=interpreter,
                                shapes=_QUICK["attention"] if quick else ACCEPTANCE_ATTENTION,
                                tokens=_QUICK["attention_tokens"] if quick else ACCEPTANCE_TOKENS,
                                n_head=_QUICK["n_head"] if quick else 8)
    if suite == "train":
        return (train_groups(device, dtypes, quick, interpreter=interpreter,
                             configs=_QUICK["models"] if quick else ACCEPTANCE_MODELS,
                             batch=_QUICK["batch"] if quick else ACCEPTANCE_BATCH)
                + ensemble_groups(device, dtypes, quick, **(_QUICK["ensemble"] if quick else ACCEPTANCE_ENSEMBLE)))
    return []


def groups_for(suites: list[str], device: torch.device, dtypes: list[str] | None = None, quick: bool = False,
               preset: str = "default", interpreter: bool = False) -> list[Group]:
    """The groups of the named suites; dtypes=None takes each suite's default for the device (or
    the preset's). interpreter: memk's Triton kernels run on CPU under Triton's interpreter."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    groups = []
    for suite in suites:
        if suite not in _BUILDERS:
            raise ValueError(f"unknown suite {suite!r}; choose from {', '.join(SUITES)} or all")
        if preset == "acceptance":
            groups += acceptance_groups(suite, device, dtypes, quick, interpreter)
        elif suite == "logprob":  # memk's log-prob kernels are C++/CUDA: no Triton interpreter to pass on
            groups += logprob_groups(device, dtypes or default_dtypes(suite, device), quick)
        else:
            groups += _BUILDERS[suite](device, dtypes or default_dtypes(suite, device), quick, interpreter=interpreter)
    return groups


def cases_for(groups: list[Group]) -> list[Case]:
    return [Case(g, v) for g in groups for v in g.variants]
