"""The settings of one `memk audit` (AuditSettings), and their checks: a bad one is a ConfigError naming the
fix, raised before any model loads."""

from __future__ import annotations

from dataclasses import dataclass

from .extraction import DEFAULT_LENGTH, DEFAULT_PREFIXES, check_settings as check_extraction
from .gate import parse_limits
from ..errors import ConfigError


@dataclass(frozen=True)
class AuditSettings:
    window: int | None = None  # tokens a window holds; default (and at most): each model's context
    stride: int | None = None  # tokens a window moves by; default: half the window
    batch_tokens: int = 8192  # padded tokens a forward pass holds
    min_k: float = 0.2  # Min-K% and Min-K%++'s fraction of tokens
    # Min-K%++ needs the mean and spread of log p over the vocabulary at every token, a second
    # pass over each block of logits: about half the scoring time at V 50257.
    min_k_pp: bool = True
    bootstrap: int = 1000  # resamples for the intervals (0: none)
    seed: int = 0
    top: int = 20  # most-memorized samples kept in the summary
    chunk: int = 64  # texts coded between two writes of samples.jsonl
    extract_prefixes: tuple[int, ...] = DEFAULT_PREFIXES  # extraction's prefix lengths k in tokens (): none
    extract_length: int = DEFAULT_LENGTH  # tokens decoded after the prefix, at most
    # ReCaLL's prefix: this many non-members (0: no ReCaLL). Each text is coded again with the prefix in
    # front: about (shots + 1) times the model's pass where texts are of like length (recall_dc_pdd.py).
    recall_shots: int = 0
    dc_pdd_cap: float = 0.01  # DC-PDD's a: each first-occurrence token's term is capped at it
    capacity_summary: str | None = None  # a run-capacity summary.json for α (None: memk's measured default)
    f1_law: str | None = None  # a run-generalization summary.json whose F1 law to use (None: memk's committed fit)
    # --fail-if's limits, e.g. ("auc>0.6", "mem_u_bits>100") (gate.py): their outcome is audit.json's "fail_if"
    fail_if: tuple[str, ...] = ()

    def check(self) -> None:
        if self.window is not None and self.window < 2:
            raise ConfigError(f"--window {self.window} is too small; a window needs at least 2 tokens")
        if self.stride is not None and self.stride < 1:
            raise ConfigError(f"--stride {self.stride} must be at least 1")
        if self.batch_tokens < 1:
            raise ConfigError(f"--batch-tokens {self.batch_tokens} must be positive")
        if not 0 < self.min_k <= 1:
            raise ConfigError(f"--min-k {self.min_k} must be a fraction in (0, 1], e.g. 0.2")
        if self.bootstrap < 0 or self.top < 0:
            raise ConfigError(f"--bootstrap ({self.bootstrap}) and --top ({self.top}) must be >= 0")
        if self.chunk < 1:
            raise ConfigError(f"chunk ({self.chunk}) must be at least 1 text")
        check_extraction(tuple(self.extract_prefixes), self.extract_length)
        if self.recall_shots < 0:
            raise ConfigError(f"--recall-shots {self.recall_shots} must be >= 0 (0: no ReCaLL)")
        if not self.dc_pdd_cap > 0:
            raise ConfigError(f"--dc-pdd-cap {self.dc_pdd_cap} must be positive (the paper's a is 0.01)")
        parse_limits(self.fail_if)  # a malformed limit is refused before any work
