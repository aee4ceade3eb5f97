"""Every benchmark case, defined once, shared by `memk bench` (bench/run.py) and `pytest bench/`.

A Group is one measurement setting (suite, operation, shapes, dtype, the size swept): it makes
the inputs once and knows how to check any implementation's answer against an independent
float64 computation. Its Variants are the implementations compared on those inputs: baselines
(what a user would otherwise write: log_softmax + gather, F.cross_entropy eager or compiled,
each torch SDPA backend with the model's layout copies, the reference model) and candidates
(memk's backends, found through the registry in memk.kernels). Ratios are computed only
between variants of one group, in one run.

A variant that cannot run here raises Skip (or the registry's BackendUnavailable) while it is
built; the runner reports it as skipped with the reason, and the suite goes on.
"""

from __future__ import annotations

import math
import os
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from memk import kernels
from memk.kernels import reference

SUITES = ("logprob", "attention", "train", "bits")
DTYPE_NAMES = ("float32", "tf32", "bfloat16", "float16")
_TORCH_DTYPES = {"float32": torch.float32, "tf32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LN2 = math.log(2.0)

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


# ---- shared helpers -----------------------------------------------------------------------


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


def _max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|; inf when shapes differ, NaN propagates."""
    if tuple(actual.shape) != tuple(expected.shape):
        return float("inf")
    diff = (actual.detach().double() - expected.double()).abs().max().item() if actual.numel() else 0.0
    scale = expected.double().abs().max().item() if expected.numel() else 1.0
    return diff / max(scale, 1e-30)


def _norm_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| over the whole tensor (used for parameter gradients)."""
    if tuple(actual.shape) != tuple(expected.shape):
        return float("inf")
    return ((actual.detach().double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30)).item()


def _rotations(bytes_per_copy: int, device: torch.device) -> int:
    """How many copies of the inputs to cycle through so that the working set outgrows the
    last-level cache (H100 L2 is 50 MB; a server CPU's L3 a few tens of MB)."""
    target = (128 if device.type == "cuda" else 64) * 2**20
    return max(1, min(4, math.ceil(target / max(bytes_per_copy, 1))))


class _Cycle:
    """Hands out the rotated input copies in turn."""

    def __init__(self, items: list):
        self.items, self.i = items, 0

    def next(self):
        item = self.items[self.i]
        self.i = (self.i + 1) % len(self.items)
        return item


def _compiled(fn: Callable) -> Callable:
    # A fresh dynamo state per variant: the same closure code compiled for many shapes would
    # otherwise hit the recompile limit and silently fall back to eager.
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


def _logprob_ops(name: str):
    """The registry's ops for backend `name`, or Skip saying why they cannot be had."""
    if name not in kernels.logprob_backends():
        raise Skip(f"log-prob backend {name!r} is not registered (have {kernels.logprob_backends()})")
    try:
        return kernels.logprob_ops(name)
    except kernels.BackendUnavailable as exc:
        raise Skip(f"log-prob backend {name!r} unavailable: {exc}") from exc


def _attention_fn(name: str, device: torch.device):
    if name not in kernels.attention_backends():
        raise Skip(f"attention backend {name!r} is not registered (have {kernels.attention_backends()})")
    if name == "triton" and device.type != "cuda":
        raise Skip("the triton attention backend runs on CUDA; on CPU only the test interpreter runs it, "
                   "and interpreter timings mean nothing")
    try:
        return kernels.packed_attention(name)
    except kernels.BackendUnavailable as exc:
        raise Skip(f"attention backend {name!r} unavailable: {exc}") from exc


def candidate_logprob_backends(backends: list[str] | None = None) -> list[str]:
    if backends is not None:
        return list(backends)
    names = set(EXPECTED_LOGPROB_BACKENDS) | set(kernels.logprob_backends())
    return sorted(names - {"reference"})


def candidate_attention_backends(backends: list[str] | None = None) -> list[str]:
    if backends is not None:
        return list(backends)
    names = set(EXPECTED_ATTENTION_BACKENDS) | set(kernels.attention_backends())
    return sorted(names - {"reference", "sdpa"})


def _autocast(device: torch.device, dtype: str):
    if dtype in ("bfloat16", "float16"):
        return torch.autocast(device.type, dtype=_TORCH_DTYPES[dtype])
    return torch.autocast(device.type, enabled=False)


@contextmanager
def _tf32(enabled: bool):
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# ---- logprob suite ------------------------------------------------------------------------

# Log-prob inputs are laid out as the model produces them: (batch, 64, V), contiguous.
_LOGPROB_SEQ = 64
_CHECK_ELEMENTS = 2**24  # float64 elements per chunk of the reference (128 MB): never tokens x V doubles at once


def _logprob_inputs(n_tokens: int, vocab: int, dtype: str, backward: bool, seed: int):
    def make(device: torch.device) -> dict:
        gen = torch.Generator(device=device).manual_seed(seed)  # made where used: GPU logits reach 13 GB
        shape = (n_tokens // _LOGPROB_SEQ, _LOGPROB_SEQ, vocab)
        bytes_per_copy = n_tokens * vocab * torch.empty((), dtype=_TORCH_DTYPES[dtype]).element_size()
        copies = []
        for _ in range(_rotations(bytes_per_copy, device)):
            # logits of a trained model's spread (std 3), so the softmax is neither flat nor one-hot
            logits = torch.randn(shape, generator=gen, device=device).mul_(3).to(_TORCH_DTYPES[dtype])
            targets = torch.randint(0, vocab, shape[:-1], generator=gen, device=device)
            copies.append((logits.requires_grad_(backward), targets))
        upstream = torch.randn(shape[:-1], generator=gen, device=device)
        return {"copies": copies, "upstream": upstream}

    return make


def _logprob_reference(logits: torch.Tensor, targets: torch.Tensor):
    """Yields (row slice, float64 log p(target), float64 softmax) chunk by chunk over flattened rows."""
    flat = logits.detach().reshape(-1, logits.shape[-1])
    flat_t = targets.reshape(-1)
    chunk = max(1, _CHECK_ELEMENTS // logits.shape[-1])
    for start in range(0, flat.shape[0], chunk):
        rows = slice(start, min(start + chunk, flat.shape[0]))
        x = flat[rows].double()
        logp = torch.log_softmax(x, dim=-1)
        yield rows, logp.gather(-1, flat_t[rows].long().unsqueeze(-1)).squeeze(-1), logp.exp()


def _logprob_check(op: str, backward: bool, device: torch.device):
    """Check against float64 formulas: log p = x_t - logsumexp(x); d log p / dx = onehot - softmax."""

    def check(inputs: dict, outputs: dict) -> dict[str, tuple[float, float]]:
        logits, targets = inputs["copies"][0]
        upstream = inputs["upstream"].reshape(-1).double()
        n_rows = targets.numel()
        out = outputs["out"].detach()
        grad = outputs.get("grad")
        if backward and (grad is None or grad.shape != logits.shape):
            return {"output": (0.0, 0.0), "grad_logits": (float("inf"), 0.0)}  # no gradient, or a misshapen one
        flat_grad = grad.reshape(-1, logits.shape[-1]) if backward else None
        per_row = []
        grad_err = grad_scale = 0.0
        for rows, logp, probs in _logprob_reference(logits, targets):
            per_row.append(logp)
            if flat_grad is None:
                continue
            onehot = torch.zeros_like(probs).scatter_(-1, targets.reshape(-1)[rows].long().unsqueeze(-1), 1.0)
            if op == "token_logprobs":
                expected = upstream[rows].unsqueeze(-1) * (onehot - probs)
            else:  # mean cross-entropy
                expected = (probs - onehot) / n_rows
            grad_err = max(grad_err, (flat_grad[rows].double() - expected).abs().max().item())
            grad_scale = max(grad_scale, expected.abs().max().item())
        logp = torch.cat(per_row)
        if op == "token_logprobs":
            expected_out = logp.reshape(targets.shape)
        elif op == "cross_entropy":
            expected_out = -logp.mean()
        else:  # sequence_bits
            expected_out = -logp.reshape(targets.shape).sum(-1) / LN2
        # A float32 sum over V terms is off by ~sqrt(V) ulps: V = 50257 measures 1.6e-5 for
        # torch's own F.cross_entropy gradient, so the bound grows as sqrt(V / 2048).
        grow = max(1.0, math.sqrt(logits.shape[-1] / 2048))
        result = {"output": (_max_rel_err(out, expected_out), rel_tolerance(out.dtype, device) * grow)}
        if backward:
            result["grad_logits"] = (grad_err / max(grad_scale, 1e-30), rel_tolerance(grad.dtype, device) * grow)
        return result

    return check


def _baseline_fn(op: str) -> Callable:
    """What a user writes without memk (named after it)."""
    if op == "token_logprobs":
        # upcast first: memk returns float32 log-probs, and so must the baseline
        return lambda x, t: torch.log_softmax(x.float(), dim=-1).gather(-1, t.unsqueeze(-1)).squeeze(-1)
    if op == "cross_entropy":
        return lambda x, t: F.cross_entropy(x.reshape(-1, x.shape[-1]), t.reshape(-1))
    return lambda x, t: -(
        torch.log_softmax(x.float(), dim=-1).gather(-1, t.unsqueeze(-1)).squeeze(-1).double().sum(-1)
    ) / LN2


_BASELINE_NAMES = {"token_logprobs": "log_softmax+gather", "cross_entropy": "F.cross_entropy", "sequence_bits": "log_softmax+gather+sum"}


def _op_runner(fn: Callable, op: str, backward: bool) -> Callable[[dict, torch.device], Runner]:
    def build(inputs: dict, device: torch.device) -> Runner:
        cycle = _Cycle(inputs["copies"])
        upstream = inputs["upstream"]

        def call():
            logits, targets = cycle.next()
            out = fn(logits, targets)
            if backward:
                logits.grad = None
                if op == "token_logprobs":
                    out.backward(upstream)
                else:
                    out.backward()
            return out

        def outputs():
            logits, targets = inputs["copies"][0]
            logits.grad = None
            out = fn(logits, targets)
            result = {"out": out.detach()}
            if backward:
                if op == "token_logprobs":
                    out.backward(upstream)
                else:
                    out.backward()
                result["grad"] = logits.grad
                logits.grad = None
            return result

        def close():
            for logits, _ in inputs["copies"]:
                logits.grad = None

        return Runner(call, outputs, close, reset=close)

    return build


def _memk_logprob_variant(backend: str, op: str, backward: bool, compare_to: tuple[str, ...]) -> Variant:
    def build(inputs: dict, device: torch.device) -> Runner:
        return _op_runner(getattr(_logprob_ops(backend), op), op, backward)(inputs, device)

    return Variant(f"memk:{backend}", "candidate", build, f"memk.kernels.logprob_ops({backend!r}).{op}", compare_to)


def logprob_groups(device: torch.device, dtypes: list[str], quick: bool, backends: list[str] | None = None) -> list[Group]:
    if quick:
        shapes = [(2048, 4096)]
    elif device.type == "cuda":
        shapes = [(2048, n) for n in (4096, 16384, 65536, 131072)] + [(50257, n) for n in (4096, 16384, 65536)]
    else:  # 2-core CPU: the sweep stops at 32K tokens to keep the full run near 10 minutes
        shapes = [(2048, n) for n in (4096, 16384, 32768)] + [(50257, 4096)]
    ops = [("token_logprobs", False), ("token_logprobs", True), ("cross_entropy", False), ("cross_entropy", True), ("sequence_bits", False)]
    groups = []
    for dtype in [d for d in dtypes if d in ("float32", "bfloat16", "float16")]:
        for op, backward in ops:
            for vocab, n_tokens in shapes:
                pass_name = "fwd+bwd" if backward else "fwd"
                base = _BASELINE_NAMES[op]
                baseline_fn = _baseline_fn(op)
                variants = [
                    Variant(base, "baseline", _op_runner(baseline_fn, op, backward), f"eager {base}"),
                    Variant(
                        f"{base} (compile)", "baseline",
                        _compiled_variant_build(baseline_fn, op, backward, quick),
                        f"torch.compile({base})",
                    ),
                ]
                compare = tuple(v.name for v in variants)
                variants += [_memk_logprob_variant(b, op, backward, compare) for b in candidate_logprob_backends(backends)]
                groups.append(Group(
                    suite="logprob",
                    family=f"{op} {pass_name} V{vocab} {dtype}",
                    sweep_axis="tokens",
                    sweep_value=n_tokens,
                    dtype=dtype,
                    params={"op": op, "pass": pass_name, "tokens": n_tokens, "vocab": vocab,
                            "logits_shape": [n_tokens // _LOGPROB_SEQ, _LOGPROB_SEQ, vocab], "dtype": dtype},
                    make_inputs=_logprob_inputs(n_tokens, vocab, dtype, backward, seed=n_tokens + vocab),
                    check=_logprob_check(op, backward, device),
                    work=n_tokens,
                    work_unit="tokens",
                    variants=variants,
                ))
    return groups


def _compiled_variant_build(fn: Callable, op: str, backward: bool, quick: bool):
    def build(inputs: dict, device: torch.device) -> Runner:
        if quick:
            raise Skip("torch.compile baselines run in the full suite only (a cold compile takes ~20 s on 2 cores)")
        return _op_runner(_compiled(fn), op, backward)(inputs, device)

    return build


# ---- attention suite ----------------------------------------------------------------------

_SDPA_BACKENDS = ("MATH", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION")


def _sdpa_packed(backend_name: str) -> Callable:
    """The model's path without memk: split the qkv projection into heads, SDPA with one
    backend forced, merge the heads back (the copies are part of the cost)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name, None)
    if backend is None:
        raise Skip(f"torch {torch.__version__} has no SDPBackend.{backend_name}")

    def attend(qkv: torch.Tensor, n_head: int) -> torch.Tensor:
        with sdpa_kernel(backend):
            q, k, v = reference.split_heads(qkv, n_head)
            return reference.merge_heads(F.scaled_dot_product_attention(q, k, v, is_causal=True))

    return attend


def _attention_inputs(batch: int, seq: int, n_head: int, head_dim: int, dtype: str, backward: bool, seed: int):
    def make(device: torch.device) -> dict:
        gen = torch.Generator(device=device).manual_seed(seed)
        d_model = n_head * head_dim
        bytes_per_copy = batch * seq * 3 * d_model * torch.empty((), dtype=_TORCH_DTYPES[dtype]).element_size()
        copies = [
            torch.randn(batch, seq, 3 * d_model, generator=gen, device=device).to(_TORCH_DTYPES[dtype]).requires_grad_(backward)
            for _ in range(_rotations(bytes_per_copy, device))
        ]
        upstream = torch.randn(batch, seq, d_model, generator=gen, device=device).to(_TORCH_DTYPES[dtype])
        return {"copies": copies, "upstream": upstream, "n_head": n_head}

    return make


def _attention_check(backward: bool, device: torch.device):
    """Against the written-out softmax(q kᵀ/√d + mask) v in float64, and its autograd gradient."""

    def check(inputs: dict, outputs: dict) -> dict[str, tuple[float, float]]:
        # Sequences are independent: the first few (up to 2^26 float64 scores) stand for all of them.
        batch, seq, _ = inputs["copies"][0].shape
        n = max(1, min(batch, 2**26 // (inputs["n_head"] * seq * seq)))
        qkv = inputs["copies"][0][:n].detach().double().requires_grad_(backward)
        expected = reference.packed_causal_attention(qkv, inputs["n_head"])
        out = outputs["out"]
        if out.shape[0] != batch:
            return {"output": (float("inf"), 0.0)}
        result = {"output": (_max_rel_err(out[:n], expected), rel_tolerance(out.dtype, device, matmul=True))}
        if backward:
            expected.backward(inputs["upstream"][:n].double())
            grad = outputs["grad"]
            err = _max_rel_err(grad[:n], qkv.grad) if grad is not None and grad.shape[0] == batch else float("inf")
            result["grad_qkv"] = (err, rel_tolerance(inputs["copies"][0].dtype, device, matmul=True))
        return result

    return check


def _packed_runner(get_fn: Callable[[torch.device], Callable], backward: bool, trial_skips: bool):
    def build(inputs: dict, device: torch.device) -> Runner:
        fn = get_fn(device)
        n_head, upstream = inputs["n_head"], inputs["upstream"]
        cycle = _Cycle(inputs["copies"])
        if trial_skips:
            # SDPA raises when the forced backend does not support these inputs (device, dtype,
            # head size): that is "not available here", not a failure of the suite.
            try:
                with torch.no_grad():
                    fn(inputs["copies"][0], n_head)
            except RuntimeError as exc:
                raise Skip(str(exc).strip().splitlines()[0][:200]) from exc

        def call():
            qkv = cycle.next()
            y = fn(qkv, n_head)
            if backward:
                qkv.grad = None
                y.backward(upstream)
            return y

        def outputs():
            qkv = inputs["copies"][0]
            qkv.grad = None
            y = fn(qkv, n_head)
            result = {"out": y.detach()}
            if backward:
                y.backward(upstream)
                result["grad"] = qkv.grad
                qkv.grad = None
            return result

        def close():
            for qkv in inputs["copies"]:
                qkv.grad = None

        return Runner(call, outputs, close, reset=close)

    return build


def attention_groups(device: torch.device, dtypes: list[str], quick: bool, backends: list[str] | None = None) -> list[Group]:
    if device.type == "cuda":
        n_head, tokens = 8, 131072  # seq 64: batch 2048, the paper's batch; seq 1024: batch 128
    else:
        n_head, tokens = 4, 4096
    seqs = (64,) if quick else (64, 1024)
    head_dims = (32, 64) if quick else (32, 64, 128)
    groups = []
    for dtype in [d for d in dtypes if d in ("float32", "bfloat16", "float16")]:
        for backward in (False, True):
            pass_name = "fwd+bwd" if backward else "fwd"
            for head_dim in head_dims:
                for seq in seqs:
                    batch = tokens // seq
                    variants = [
                        Variant(f"sdpa:{b.lower()}", "baseline",
                                _packed_runner(lambda dev, b=b: _sdpa_packed(b), backward, trial_skips=True),
                                f"split heads, SDPA with SDPBackend.{b} forced, merge heads")
                        for b in _SDPA_BACKENDS
                    ]
                    compare = tuple(v.name for v in variants)
                    variants += [
                        Variant(f"memk:{name}", "candidate",
                                _packed_runner(lambda dev, name=name: _attention_fn(name, dev), backward, trial_skips=False),
                                f"memk.kernels.packed_attention({name!r}) on the qkv projection output", compare)
                        for name in candidate_attention_backends(backends)
                    ]
                    # causal FLOPs (half the square), FlashAttention's convention; backward = 2.5x forward
                    fwd_flops = 2.0 * batch * n_head * seq * seq * head_dim
                    groups.append(Group(
                        suite="attention",
                        family=f"packed causal {pass_name} D{head_dim} H{n_head} {dtype}",
                        sweep_axis="seq",
                        sweep_value=seq,
                        dtype=dtype,
                        params={"pass": pass_name, "batch": batch, "seq": seq, "n_head": n_head, "head_dim": head_dim,
                                "qkv_shape": [batch, seq, 3 * n_head * head_dim], "dtype": dtype, "causal": True},
                        make_inputs=_attention_inputs(batch, seq, n_head, head_dim, dtype, backward, seed=seq * 1000 + head_dim),
                        check=_attention_check(backward, device),
                        work=batch * seq,
                        work_unit="tokens",
                        flops=fwd_flops * (3.5 if backward else 1.0),
                        variants=variants,
                    ))
    return groups


# ---- train and bits suites: the GPT-2 model -----------------------------------------------


def _model_configs(device: torch.device, quick: bool):
    """(n_layer, d_model, n_head) from the paper's grid (V 2048, S 64); head_dim 16-64."""
    if quick:
        return [(1, 32, 2)]
    if device.type == "cuda":
        return [(1, 64, 2), (2, 128, 4), (4, 256, 8), (8, 512, 8)]
    return [(1, 32, 2), (2, 64, 2), (4, 128, 4)]


def _backend_pairs(device: torch.device, logprob: list[str] | None, attention: list[str] | None):
    """(attention, logprob) backend pairs: the reference model first, then memk's fused paths."""
    pairs = [("sdpa", "reference")]
    for lp in candidate_logprob_backends(logprob):
        pairs.append(("sdpa", lp))
        if device.type == "cuda":
            pairs += [(att, lp) for att in candidate_attention_backends(attention)]
    return pairs


def _model_flops_per_token(config) -> float:
    """Training FLOPs per predicted token: 6 x (the matmul parameters + the tied head) plus the
    attention scores and values (12 L S d, PaLM's convention: causal mask not discounted)."""
    d, L = config.d_model, config.n_layer
    matmul_params = L * 12 * d * d + d * config.vocab_size
    return 6.0 * matmul_params + 12.0 * L * (config.seq_len - 1) * d


def _build_model(config, attention: str, logprob: str, device: torch.device, state: dict):
    from memk.memorize.model import GPT

    try:
        model = GPT(config, attention_backend=attention, logprob_backend=logprob)
    except kernels.BackendUnavailable as exc:
        raise Skip(f"backend unavailable: {exc}") from exc
    except ValueError as exc:
        raise Skip(str(exc)) from exc
    model.load_state_dict(state)
    return model.to(device)


def _model_inputs(config, batch: int, n_batches: int, seed: int):
    def make(device: torch.device) -> dict:
        from memk.memorize.model import GPT

        torch.manual_seed(seed)
        state = GPT(config, "reference", "reference").state_dict()
        gen = torch.Generator(device="cpu").manual_seed(seed + 1)
        batches = [torch.randint(0, config.vocab_size, (batch, config.seq_len), generator=gen).to(device) for _ in range(n_batches)]
        return {"config": config, "state": state, "batches": batches, "check_batch": batches[0][:256]}

    return make


def _float64_reference(inputs: dict, device: torch.device, need_grads: bool):
    """Loss, gradients and bits of the reference model (explicit attention, plain log-probs) in float64."""
    if "float64" not in inputs:
        model = _build_model(inputs["config"], "reference", "reference", device, inputs["state"]).double()
        x = inputs["check_batch"]
        loss = model.loss(x)
        loss.backward()
        with torch.no_grad():
            bits = model.sequence_bits(x)
        inputs["float64"] = {
            "loss": loss.detach(),
            "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters()},
            "bits": bits,
        }
        del model
    return inputs["float64"]


_MODEL_TOL = {  # relative error allowed against float64, by compute dtype: (loss or bits, gradients)
    "float32": (1e-5, 1e-4),
    "tf32": (5e-3, 5e-2),
    "bfloat16": (3e-2, 5e-2),
    "float16": (5e-3, 5e-2),
}


def _train_check(device: torch.device):
    def check(inputs: dict, outputs: dict) -> dict[str, tuple[float, float]]:
        ref = _float64_reference(inputs, device, need_grads=True)
        loss_tol, grad_tol = _MODEL_TOL[outputs["dtype"]]
        loss_err = abs(outputs["loss"].double().item() - ref["loss"].item()) / abs(ref["loss"].item())
        grad_err = max(_norm_rel_err(outputs["grads"][n], g) for n, g in ref["grads"].items())
        return {"loss": (loss_err, loss_tol), "grads (worst parameter)": (grad_err, grad_tol)}

    return check


def _train_variant(attention: str, logprob: str, dtype: str, compare_to: tuple[str, ...]) -> Variant:
    def build(inputs: dict, device: torch.device) -> Runner:
        if dtype == "tf32" and device.type != "cuda":
            raise Skip("TF32 is a CUDA tensor-core mode")
        if logprob != "reference":
            _logprob_ops(logprob)
        if attention not in ("sdpa", "reference"):
            _attention_fn(attention, device)
        model = _build_model(inputs["config"], attention, logprob, device, inputs["state"])
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=device.type == "cuda")
        cycle = _Cycle(inputs["batches"])
        stack = ExitStack()
        stack.enter_context(_tf32(dtype == "tf32"))

        def call():
            optimizer.zero_grad(set_to_none=True)
            with _autocast(device, dtype):
                loss = model.loss(cycle.next())
            loss.backward()
            optimizer.step()
            return loss

        def outputs():
            # at the initial weights, before any step: compare with the float64 reference
            model.zero_grad(set_to_none=True)
            with _autocast(device, dtype):
                loss = model.loss(inputs["check_batch"])
            loss.backward()
            grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
            model.zero_grad(set_to_none=True)
            return {"loss": loss.detach(), "grads": grads, "dtype": dtype}

        return Runner(call, outputs, stack.close, reset=lambda: optimizer.zero_grad(set_to_none=True))

    name = f"{attention}+{logprob} {dtype}"
    return Variant(name, "baseline" if not compare_to else "candidate", build,
                   f"GPT(attention_backend={attention!r}, logprob_backend={logprob!r}), "
                   + (f"{dtype} autocast" if dtype in ("bfloat16", "float16") else dtype) + ", AdamW step",
                   compare_to, dtype=dtype)


def train_groups(device: torch.device, dtypes: list[str], quick: bool, logprob: list[str] | None = None,
                 attention: list[str] | None = None) -> list[Group]:
    from memk.memorize.model import GPTConfig, count_parameters

    batch = 16 if quick else (2048 if device.type == "cuda" else 32)
    dtypes = [d for d in dtypes if d in ("float32", "tf32", "bfloat16", "float16")]
    pairs = _backend_pairs(device, logprob, attention)
    groups = []
    for n_layer, d_model, n_head in _model_configs(device, quick):
        config = GPTConfig(n_layer=n_layer, d_model=d_model, n_head=n_head, vocab_size=2048, seq_len=64)
        variants = []
        for dtype in dtypes:
            for att, lp in pairs:
                compare = []
                if (att, lp) != pairs[0] or dtype != dtypes[0]:
                    compare.append(f"{pairs[0][0]}+{pairs[0][1]} {dtypes[0]}")  # the float32 reference model
                    if (att, lp) != pairs[0]:
                        compare.append(f"{pairs[0][0]}+{pairs[0][1]} {dtype}")  # the reference at this dtype
                variants.append(_train_variant(att, lp, dtype, tuple(dict.fromkeys(compare))))
        tokens = batch * (config.seq_len - 1)
        groups.append(Group(
            suite="train",
            family=f"train step B{batch}",
            sweep_axis="params",
            sweep_value=count_parameters(config),
            dtype=",".join(dtypes),
            params={"config": config.to_dict(), "name": config.name, "batch": batch, "tokens_per_step": tokens,
                    "optimizer": "AdamW", "params": count_parameters(config)},
            make_inputs=_model_inputs(config, batch, n_batches=4, seed=n_layer * 1000 + d_model),
            check=_train_check(device),
            work=tokens,
            work_unit="tokens",
            flops=_model_flops_per_token(config) * tokens,
            variants=variants,
        ))
    return groups


def _bits_check(device: torch.device):
    def check(inputs: dict, outputs: dict) -> dict[str, tuple[float, float]]:
        ref = _float64_reference(inputs, device, need_grads=False)
        return {"bits": (_max_rel_err(outputs["bits"], ref["bits"]), _MODEL_TOL[outputs["dtype"]][0])}

    return check


def _bits_variant(attention: str, logprob: str, dtype: str, compare_to: tuple[str, ...]) -> Variant:
    def build(inputs: dict, device: torch.device) -> Runner:
        if logprob != "reference":
            _logprob_ops(logprob)
        if attention not in ("sdpa", "reference"):
            _attention_fn(attention, device)
        model = _build_model(inputs["config"], attention, logprob, device, inputs["state"]).eval()

        def bits_of(batches):
            with torch.inference_mode(), _autocast(device, dtype):
                return torch.cat([model.sequence_bits(x) for x in batches])

        return Runner(lambda: bits_of(inputs["batches"]),
                      lambda: {"bits": bits_of([inputs["check_batch"]]), "dtype": dtype})

    return Variant(f"{attention}+{logprob} {dtype}", "baseline" if not compare_to else "candidate", build,
                   f"GPT.sequence_bits over the dataset, {attention} attention, {logprob} log-probs, {dtype}", compare_to)


def bits_groups(device: torch.device, dtypes: list[str], quick: bool, logprob: list[str] | None = None,
                attention: list[str] | None = None) -> list[Group]:
    from memk.memorize.model import GPTConfig, count_parameters

    if quick:
        n_seqs, batch = 256, 128
    elif device.type == "cuda":
        n_seqs, batch = 16384, 2048
    else:
        n_seqs, batch = 1024, 256
    pairs = _backend_pairs(device, logprob, attention)
    groups = []
    for dtype in [d for d in dtypes if d in ("float32", "bfloat16")]:
        for n_layer, d_model, n_head in _model_configs(device, quick):
            config = GPTConfig(n_layer=n_layer, d_model=d_model, n_head=n_head, vocab_size=2048, seq_len=64)
            base = f"{pairs[0][0]}+{pairs[0][1]} {dtype}"
            variants = [_bits_variant(att, lp, dtype, () if i == 0 else (base,)) for i, (att, lp) in enumerate(pairs)]
            groups.append(Group(
                suite="bits",
                family=f"sequence_bits {n_seqs} seqs {dtype}",
                sweep_axis="params",
                sweep_value=count_parameters(config),
                dtype=dtype,
                params={"config": config.to_dict(), "name": config.name, "sequences": n_seqs, "batch": batch,
                        "dtype": dtype, "params": count_parameters(config),
                        "weights": "random init (throughput does not depend on training)"},
                make_inputs=_model_inputs(config, batch, n_batches=n_seqs // batch, seed=n_layer * 1000 + d_model + 7),
                check=_bits_check(device),
                work=n_seqs,
                work_unit="sequences",
                variants=variants,
            ))
    return groups


# ---- selection ----------------------------------------------------------------------------


def default_dtypes(suite: str, device: torch.device) -> list[str]:
    if device.type == "cuda":
        return {"logprob": ["bfloat16", "float32"], "attention": ["bfloat16"], "train": ["float32", "tf32", "bfloat16"],
                "bits": ["float32"]}[suite]
    return {"logprob": ["float32"], "attention": ["float32"], "train": ["float32", "bfloat16"], "bits": ["float32"]}[suite]


_BUILDERS = {"logprob": logprob_groups, "attention": attention_groups, "train": train_groups, "bits": bits_groups}


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


def interpreter_active() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"
