"""The logprob suite: memk's log-prob ops (token_logprobs, cross_entropy, sequence_bits) against
what a user writes without them (log_softmax + gather, F.cross_entropy), eager and compiled, and
against other libraries' fused cross-entropy where installed (anchors.py says what is compared).

Each group is one op, pass (fwd or fwd+bwd), vocabulary and dtype at one token count; its check
recomputes log p(target) and the gradient in float64, chunk by chunk. The linear_cross_entropy
family starts one step earlier, from the last hidden states and the classifier weight, so that
libraries that fuse the classifier matmul into the loss (cut-cross-entropy) compare on equal terms;
so does head_token_logprobs (the audit's path: log p(target) from the hidden states, no autograd),
against log_softmax + gather over the full logits. On a CPU, each op group's times are also reported as fractions of its floor (roofline.py): the least
time its reads, writes and exps take at the rates this machine shows in the same run.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from . import anchors, roofline
from .case import (
    TORCH_DTYPES,
    Cycle,
    Group,
    Runner,
    Variant,
    candidate_logprob_backends,
    logprob_ops_or_skip,
    max_rel_err,
    rel_tolerance,
    rotations,
    skip_compile_when_quick,
)

LN2 = math.log(2.0)

# Log-prob inputs are laid out as the model produces them: (batch, 64, V), contiguous.
_LOGPROB_SEQ = 64
_CHECK_ELEMENTS = 2**24  # float64 elements per chunk of the reference (128 MB): never tokens x V doubles at once


def _logprob_inputs(n_tokens: int, vocab: int, dtype: str, backward: bool, seed: int):
    def make(device: torch.device) -> dict:
        gen = torch.Generator(device=device).manual_seed(seed)  # made where used: GPU logits reach 13 GB
        shape = (n_tokens // _LOGPROB_SEQ, _LOGPROB_SEQ, vocab)
        bytes_per_copy = n_tokens * vocab * torch.empty((), dtype=TORCH_DTYPES[dtype]).element_size()
        copies = []
        for _ in range(rotations(bytes_per_copy, device)):
            # logits of a trained model's spread (std 3), so the softmax is neither flat nor one-hot
            logits = torch.randn(shape, generator=gen, device=device).mul_(3).to(TORCH_DTYPES[dtype])
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
        result = {"output": (max_rel_err(out, expected_out), rel_tolerance(out.dtype, device) * grow)}
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
        cycle = Cycle(inputs["copies"])
        upstream = inputs["upstream"]

        def backpropagate(out: torch.Tensor) -> None:
            # token_logprobs gives one value per token and takes an upstream gradient; mean cross_entropy is a scalar
            if op == "token_logprobs":
                out.backward(upstream)
            else:
                out.backward()

        def call():
            logits, targets = cycle.next()
            out = fn(logits, targets)
            if backward:
                logits.grad = None
                backpropagate(out)
            return out

        def outputs():
            logits, targets = inputs["copies"][0]
            logits.grad = None
            out = fn(logits, targets)
            result = {"out": out.detach()}
            if backward:
                backpropagate(out)
                result["grad"] = logits.grad
                logits.grad = None
            return result

        def close():
            for logits, _ in inputs["copies"]:
                logits.grad = None

        return Runner(call, outputs, close, reset=close)

    return build


def _release_cached_gradient() -> None:
    """The CPU kernel keeps a freed gradient for the next backward (csrc/logprob_binding.cpp); let it go, so
    that the memory measurement (after Runner.reset) counts the gradient the measured call writes."""
    try:
        torch.ops.memk.cpu_release_cached()
    except (AttributeError, RuntimeError):  # the fused kernels are not loaded: nothing is kept
        pass


def _memk_logprob_variant(backend: str, op: str, backward: bool, compare_to: tuple[str, ...]) -> Variant:
    def build(inputs: dict, device: torch.device) -> Runner:
        runner = _op_runner(getattr(logprob_ops_or_skip(backend), op), op, backward)(inputs, device)
        if backward and device.type == "cpu":
            reset = runner.reset

            def reset_and_release():
                reset()
                _release_cached_gradient()

            runner.reset = reset_and_release
        return runner

    return Variant(f"memk:{backend}", "candidate", build, f"memk.kernels.logprob_ops({backend!r}).{op}", compare_to)


def _liger_cross_entropy_variant(backward: bool) -> Variant:
    """Liger-Kernel's cross-entropy on private copies of the logits, which it overwrites with
    their gradient (anchors.py); the copies are made at build time, outside the timing."""

    def build(inputs: dict, device: torch.device) -> Runner:
        fn = anchors.liger_cross_entropy(device)
        private = {
            "copies": [(x.detach().clone().requires_grad_(x.requires_grad), t) for x, t in inputs["copies"]],
            "upstream": inputs["upstream"],
        }
        return _op_runner(fn, "cross_entropy", backward)(private, device)

    return Variant("liger:cross_entropy", "baseline", build,
                   "liger_kernel.transformers.LigerCrossEntropyLoss() on the logits (private copies: it writes "
                   "the gradient into them)")


def _compiled(fn: Callable) -> Callable:
    # A fresh dynamo state per variant: the same closure code compiled for many shapes would
    # otherwise hit the recompile limit and silently fall back to eager.
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


def _compiled_or_skip(fn: Callable, quick: bool) -> Callable[[torch.device], Callable]:
    def get(device: torch.device) -> Callable:
        skip_compile_when_quick(quick)
        return _compiled(fn)

    return get


def _compiled_variant_build(fn: Callable, op: str, backward: bool, quick: bool):
    def build(inputs: dict, device: torch.device) -> Runner:
        skip_compile_when_quick(quick)
        return _op_runner(_compiled(fn), op, backward)(inputs, device)

    return build


# ---- the classifier matmul and the loss: linear_cross_entropy -------------------------------


def _linear_inputs(n_tokens: int, vocab: int, d_model: int, dtype: str, seed: int):
    def make(device: torch.device) -> dict:
        gen = torch.Generator(device=device).manual_seed(seed)
        torch_dtype = TORCH_DTYPES[dtype]
        bytes_per_copy = n_tokens * (d_model + vocab) * torch.empty((), dtype=torch_dtype).element_size()
        copies = []
        for _ in range(rotations(bytes_per_copy, device)):
            hidden = torch.randn(n_tokens, d_model, generator=gen, device=device).to(torch_dtype).requires_grad_()
            targets = torch.randint(0, vocab, (n_tokens,), generator=gen, device=device)
            copies.append((hidden, targets))
        # weight scaled so that the logits have a trained model's spread (std 3), as in the other groups
        weight = (torch.randn(vocab, d_model, generator=gen, device=device) * (3 / math.sqrt(d_model)))
        return {"copies": copies, "weight": weight.to(torch_dtype).requires_grad_()}

    return make


def _linear_reference(inputs: dict) -> dict:
    """Mean cross-entropy of hidden @ weightᵀ and its gradients in float64, chunk by chunk; kept in the inputs."""
    if "float64" not in inputs:
        hidden, targets = inputs["copies"][0]
        h, w = hidden.detach().double(), inputs["weight"].detach().double()
        n_rows, vocab = h.shape[0], w.shape[0]
        chunk = max(1, _CHECK_ELEMENTS // vocab)
        nll_sum, grad_h, grad_w = 0.0, torch.empty_like(h), torch.zeros_like(w)
        for start in range(0, n_rows, chunk):
            rows = slice(start, min(start + chunk, n_rows))
            logp = torch.log_softmax(h[rows] @ w.T, dim=-1)
            t = targets[rows].long().unsqueeze(-1)
            nll_sum -= logp.gather(-1, t).sum().item()
            d_logits = logp.exp().scatter_add_(-1, t, -torch.ones_like(t, dtype=logp.dtype)) / n_rows
            grad_h[rows] = d_logits @ w
            grad_w += d_logits.T @ h[rows]
        inputs["float64"] = {"loss": torch.tensor(nll_sum / n_rows, dtype=torch.float64), "grad_hidden": grad_h,
                             "grad_weight": grad_w}
    return inputs["float64"]


def _linear_check(device: torch.device):
    """Against the float64 loss and gradients: d loss / d logits = (softmax - onehot) / N, through the matmul."""

    def check(inputs: dict, outputs: dict) -> dict[str, tuple[float, float]]:
        ref = _linear_reference(inputs)
        dtype = inputs["weight"].dtype
        grad_h, grad_w = outputs["grad_hidden"], outputs["grad_weight"]
        # The variants round the logits (or the matmul's inputs) to the 16-bit dtype; the
        # reference does not: every output is allowed that dtype's error.
        tol = rel_tolerance(dtype, device, matmul=True)
        return {
            "output": (max_rel_err(outputs["out"], ref["loss"]), tol),
            "grad_hidden": (max_rel_err(grad_h, ref["grad_hidden"]) if grad_h is not None else float("inf"), tol),
            "grad_weight": (max_rel_err(grad_w, ref["grad_weight"]) if grad_w is not None else float("inf"), tol),
        }

    return check


def _linear_runner(get_fn: Callable[[torch.device], Callable]) -> Callable[[dict, torch.device], Runner]:
    """fn(hidden, weight, targets) -> mean loss, forward and backward to both hidden and weight."""

    def build(inputs: dict, device: torch.device) -> Runner:
        fn = get_fn(device)
        cycle = Cycle(inputs["copies"])
        weight = inputs["weight"]

        def clear():
            weight.grad = None
            for hidden, _ in inputs["copies"]:
                hidden.grad = None

        def call():
            hidden, targets = cycle.next()
            hidden.grad = weight.grad = None
            loss = fn(hidden, weight, targets)
            loss.backward()
            return loss

        def outputs():
            hidden, targets = inputs["copies"][0]
            clear()
            loss = fn(hidden, weight, targets)
            loss.backward()
            result = {"out": loss.detach(), "grad_hidden": hidden.grad, "grad_weight": weight.grad}
            clear()
            return result

        return Runner(call, outputs, clear, reset=clear)

    return build


def _linear_then(loss: Callable) -> Callable:
    return lambda hidden, weight, targets: loss(F.linear(hidden, weight), targets)


def _linear_groups(device: torch.device, dtypes: list[str], quick: bool, shapes: list[tuple[int, int, int]],
                   backends: list[str] | None) -> list[Group]:
    """Hidden states and classifier weight in, mean loss and both gradients out (fwd+bwd only)."""
    groups = []
    for dtype in [d for d in dtypes if d in ("bfloat16", "float16")]:  # anchors' float32 matmuls round like TF32
        for vocab, n_tokens, d_model in shapes:
            eager = _linear_then(F.cross_entropy)
            variants = [
                Variant("linear+F.cross_entropy", "baseline", _linear_runner(lambda dev, eager=eager: eager),
                        "F.cross_entropy(F.linear(hidden, weight), targets), eager"),
                Variant("linear+F.cross_entropy (compile)", "baseline",
                        _linear_runner(_compiled_or_skip(eager, quick)),
                        "torch.compile of the same"),
                Variant("liger:fused_linear_cross_entropy", "baseline",
                        _linear_runner(anchors.liger_fused_linear_cross_entropy),
                        "liger_kernel.transformers.LigerFusedLinearCrossEntropyLoss()(weight, hidden, targets)"),
                Variant("cce:linear_cross_entropy", "baseline", _linear_runner(anchors.cce_linear_cross_entropy),
                        "cut_cross_entropy.linear_cross_entropy(hidden, weight, targets), default impl and filtering"),
            ]
            compare = tuple(v.name for v in variants)
            variants += [
                Variant(f"linear+memk:{b}", "candidate",
                        _linear_runner(lambda dev, b=b: _linear_then(logprob_ops_or_skip(b).cross_entropy)),
                        f"memk.kernels.logprob_ops({b!r}).cross_entropy(F.linear(hidden, weight), targets)", compare)
                for b in candidate_logprob_backends(backends)
            ]
            groups.append(Group(
                suite="logprob",
                family=f"linear_cross_entropy fwd+bwd V{vocab} d{d_model} {dtype}",
                sweep_axis="tokens",
                sweep_value=n_tokens,
                dtype=dtype,
                params={"op": "linear_cross_entropy", "pass": "fwd+bwd", "tokens": n_tokens, "vocab": vocab,
                        "d_model": d_model, "hidden_shape": [n_tokens, d_model], "weight_shape": [vocab, d_model],
                        "dtype": dtype},
                make_inputs=_linear_inputs(n_tokens, vocab, d_model, dtype, seed=n_tokens + vocab + d_model),
                check=_linear_check(device),
                work=n_tokens,
                work_unit="tokens",
                # the classifier matmul forward and its two gradients
                flops=6.0 * n_tokens * vocab * d_model,
                variants=variants,
            ))
    return groups


# ---- log p(target) from the hidden states and the head: head_token_logprobs ----------------


def _head_inputs(n_tokens: int, vocab: int, d_model: int, dtype: str, seed: int):
    def make(device: torch.device) -> dict:
        gen = torch.Generator(device=device).manual_seed(seed)
        torch_dtype = TORCH_DTYPES[dtype]
        hidden = torch.randn(n_tokens, d_model, generator=gen, device=device).to(torch_dtype)
        targets = torch.randint(0, vocab, (n_tokens,), generator=gen, device=device)
        # weight scaled so that the logits have a trained model's spread (std 3), as in the other groups
        weight = (torch.randn(vocab, d_model, generator=gen, device=device) * (3 / math.sqrt(d_model))).to(torch_dtype)
        return {"hidden": hidden, "weight": weight, "targets": targets}

    return make


def _head_check(device: torch.device):
    """log p(target) of hidden @ weightᵀ in float64, chunk by chunk."""

    def check(inputs: dict, outputs: dict) -> dict[str, tuple[float, float]]:
        h, w, t = inputs["hidden"].double(), inputs["weight"].double(), inputs["targets"]
        chunk = max(1, _CHECK_ELEMENTS // w.shape[0])
        want = torch.cat([torch.log_softmax(h[i:i + chunk] @ w.T, dim=-1).gather(-1, t[i:i + chunk].unsqueeze(-1)).squeeze(-1)
                          for i in range(0, h.shape[0], chunk)])
        return {"output": (max_rel_err(outputs["out"], want), rel_tolerance(inputs["weight"].dtype, device, matmul=True))}

    return check


def _head_runner(get_fn: Callable[[torch.device], Callable]) -> Callable[[dict, torch.device], Runner]:
    def build(inputs: dict, device: torch.device) -> Runner:
        fn = get_fn(device)
        args = (inputs["hidden"], inputs["weight"], inputs["targets"])
        return Runner(lambda: fn(*args), lambda: {"out": fn(*args)})

    return build


def _full_logits_logprobs(hidden, weight, targets):
    """What the head's log-probs are without memk: the full logits, their log_softmax, the targets' entries."""
    return torch.log_softmax(F.linear(hidden, weight).float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def _memk_head(backend: str) -> Callable[[torch.device], Callable]:
    def get(device: torch.device) -> Callable:
        from memk.kernels.head_logprob import head_token_logprobs

        logprob_ops_or_skip(backend)  # Skip with the reason where the backend cannot run
        return lambda hidden, weight, targets: head_token_logprobs(hidden, weight, targets, backend=backend)

    return get


def _head_groups(device: torch.device, dtypes: list[str], quick: bool, shapes: list[tuple[int, int, int]],
                 backends: list[str] | None) -> list[Group]:
    """Hidden states and head weight in, log p(target) out, no autograd (the audit's path)."""
    groups = []
    for dtype in [d for d in dtypes if d in ("float32", "bfloat16")]:
        for vocab, n_tokens, d_model in shapes:
            base = "linear+log_softmax+gather"
            variants = [
                Variant(base, "baseline", _head_runner(lambda dev: _full_logits_logprobs),
                        "log_softmax(F.linear(hidden, weight).float()).gather(targets): the full logits, eager"),
                Variant(f"{base} (compile)", "baseline", _head_runner(_compiled_or_skip(_full_logits_logprobs, quick)),
                        "torch.compile of the same"),
            ]
            compare = tuple(v.name for v in variants)
            variants += [
                Variant(f"memk:head_token_logprobs:{b}", "candidate", _head_runner(_memk_head(b)),
                        f"memk.kernels.head_token_logprobs(hidden, weight, targets, backend={b!r}): blocks of logits",
                        compare)
                for b in candidate_logprob_backends(backends)
            ]
            groups.append(Group(
                suite="logprob",
                family=f"head_token_logprobs fwd V{vocab} d{d_model} {dtype}",
                sweep_axis="tokens",
                sweep_value=n_tokens,
                dtype=dtype,
                params={"op": "head_token_logprobs", "pass": "fwd", "tokens": n_tokens, "vocab": vocab,
                        "d_model": d_model, "hidden_shape": [n_tokens, d_model], "weight_shape": [vocab, d_model],
                        "dtype": dtype},
                make_inputs=_head_inputs(n_tokens, vocab, d_model, dtype, seed=n_tokens + vocab + d_model + 1),
                check=_head_check(device),
                work=n_tokens,
                work_unit="tokens",
                flops=2.0 * n_tokens * vocab * d_model,  # the head's matmul
                floor=roofline.head_group_floor(),
                variants=variants,
            ))
    return groups


def default_head_shapes(device: torch.device, quick: bool) -> list[tuple[int, int, int]]:
    """(vocabulary, tokens, d_model) of the head_token_logprobs family."""
    if quick:
        return [(2048, 4096, 32)]
    if device.type == "cuda":
        return [(2048, 131072, 128), (50257, 16384, 768)]
    return [(2048, 16384, 128), (50257, 4096, 128)]


# ---- the suite ----------------------------------------------------------------------------

ALL_OPS = (("token_logprobs", False), ("token_logprobs", True), ("cross_entropy", False), ("cross_entropy", True),
           ("sequence_bits", False))


def default_shapes(device: torch.device, quick: bool) -> list[tuple[int, int]]:
    """(vocabulary, tokens) of the default sweep."""
    if quick:
        return [(2048, 4096)]
    if device.type == "cuda":
        return [(2048, n) for n in (4096, 16384, 65536, 131072)] + [(50257, n) for n in (4096, 16384, 65536)]
    # 2-core CPU: the sweep stops at 32K tokens to keep the full run near 10 minutes
    return [(2048, n) for n in (4096, 16384, 32768)] + [(50257, 4096)]


def default_linear_shapes(device: torch.device, quick: bool) -> list[tuple[int, int, int]]:
    """(vocabulary, tokens, d_model) of the linear_cross_entropy family: the paper's V, a mid-sized model's d."""
    if quick:
        return [(2048, 4096, 32)]
    return [(2048, 131072 if device.type == "cuda" else 16384, 128)]


def logprob_groups(device: torch.device, dtypes: list[str], quick: bool, backends: list[str] | None = None,
                   shapes: list[tuple[int, int]] | None = None,
                   ops: tuple[tuple[str, bool], ...] = ALL_OPS,
                   linear_shapes: list[tuple[int, int, int]] | None = None,
                   head_shapes: list[tuple[int, int, int]] | None = None) -> list[Group]:
    """The suite's groups: every op and pass at each (vocabulary, tokens) size, per dtype, then the
    linear_cross_entropy family (16-bit dtypes only) and the head_token_logprobs family.

    backends: the memk log-prob backends to compare (default: every registered one but the reference).
    shapes, ops, linear_shapes, head_shapes: a selection (cases.py's presets); default the sweep for the device.
    """
    shapes = default_shapes(device, quick) if shapes is None else shapes
    linear_shapes = default_linear_shapes(device, quick) if linear_shapes is None else linear_shapes
    head_shapes = default_head_shapes(device, quick) if head_shapes is None else head_shapes
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
                if op == "cross_entropy":
                    variants.append(_liger_cross_entropy_variant(backward))
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
                    floor=roofline.logprob_group_floor(backward),
                    variants=variants,
                ))
    return (groups + _linear_groups(device, dtypes, quick, linear_shapes, backends)
            + _head_groups(device, dtypes, quick, head_shapes, backends))
