"""The benchmark's anchors (Liger-Kernel, cut-cross-entropy), the linear_cross_entropy family they
are compared in, and the train suite's compiled baseline.

Neither library is installed here, and both need CUDA: stand-ins written against their documented
APIs (argument order, shapes, Liger's in-place gradient) go through the same code, on CPU.
"""

import sys
import types

import pytest
import torch
import torch.nn.functional as F

from memk.bench import anchors, run
from memk.bench.case import Case
from memk.bench.cases import acceptance_groups
from memk.bench.suite_model import train_groups

CPU = torch.device("cpu")


class _CrossEntropyWritingItsGradient(torch.autograd.Function):
    """Mean cross-entropy that, as Liger's kernel does, overwrites the logits with their gradient."""

    @staticmethod
    def forward(ctx, logits, targets):
        x = logits.float()
        loss = F.cross_entropy(x, targets)
        if logits.requires_grad:
            grad = (torch.softmax(x, -1) - F.one_hot(targets, x.shape[-1]).float()) / x.shape[0]
            logits.detach().copy_(grad.to(logits.dtype))
        ctx.save_for_backward(logits.detach())
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return grad * grad_out, None


class _LigerCrossEntropyLoss(torch.nn.Module):
    def __init__(self, scale=1.0):
        super().__init__()
        self.scale = scale

    def forward(self, logits, targets):
        assert logits.dim() == 2 and targets.dim() == 1, "Liger takes (N, V) logits and (N,) targets"
        return _CrossEntropyWritingItsGradient.apply(logits, targets) * self.scale


class _LigerFusedLinearCrossEntropyLoss(torch.nn.Module):
    def forward(self, lin_weight, _input, target):
        assert lin_weight.shape[0] > _input.shape[1], "Liger takes the (V, d) weight first, then the (N, d) input"
        return F.cross_entropy(F.linear(_input.float(), lin_weight.float()), target)


def _linear_cross_entropy(e, c, targets):
    assert e.shape[-1] == c.shape[-1] and c.shape[0] > e.shape[-1], "cce takes (N, d) embeddings, then the (V, d) classifier"
    return F.cross_entropy(F.linear(e.float(), c.float()), targets)


@pytest.fixture
def libraries(monkeypatch):
    """Stand-ins for liger_kernel.transformers and cut_cross_entropy, run on CPU."""
    liger = types.ModuleType("liger_kernel")
    transformers = types.ModuleType("liger_kernel.transformers")
    transformers.LigerCrossEntropyLoss = _LigerCrossEntropyLoss
    transformers.LigerFusedLinearCrossEntropyLoss = _LigerFusedLinearCrossEntropyLoss
    liger.transformers = transformers
    cce = types.ModuleType("cut_cross_entropy")
    cce.linear_cross_entropy = _linear_cross_entropy
    monkeypatch.setitem(sys.modules, "liger_kernel", liger)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", transformers)
    monkeypatch.setitem(sys.modules, "cut_cross_entropy", cce)
    monkeypatch.setattr(anchors, "ANCHOR_DEVICES", ("cuda", "cpu"))
    return types.SimpleNamespace(liger=transformers, cce=cce)


def _groups(op, dtype="bfloat16"):
    return [g for g in acceptance_groups("logprob", CPU, [dtype], quick=True) if g.params["op"] == op]


def _case(group, variant):
    return Case(group, next(v for v in group.variants if v.name == variant))


def test_the_stand_in_overwrites_its_logits_as_liger_does():
    logits = torch.randn(8, 16, requires_grad=True)
    before = logits.detach().clone()
    _LigerCrossEntropyLoss()(logits, torch.randint(0, 16, (8,)))
    assert not torch.equal(logits.detach(), before)


def test_liger_cross_entropy_runs_on_private_copies(libraries):
    (group,) = _groups("cross_entropy", "float32")
    inputs = group.make_inputs(CPU)
    original = [x.detach().clone() for x, _ in inputs["copies"]]
    runner, check = run.prepare(_case(group, "liger:cross_entropy"), inputs, CPU)
    for _ in range(3):
        runner.call()
    runner.close()
    assert all(e <= t for e, t in check.values())
    assert all(torch.equal(x.detach(), o) for (x, _), o in zip(inputs["copies"], original))


def test_a_wrong_liger_answer_is_refused(libraries, monkeypatch):
    monkeypatch.setattr(libraries.liger, "LigerCrossEntropyLoss", lambda: _LigerCrossEntropyLoss(scale=1.01))
    (group,) = _groups("cross_entropy", "float32")
    with pytest.raises(run.Refused):
        run.prepare(_case(group, "liger:cross_entropy"), group.make_inputs(CPU), CPU)


def test_linear_family_compares_memk_with_every_anchor(libraries):
    (group,) = _groups("linear_cross_entropy")
    assert group.params["vocab"] == 2048 and group.dtype == "bfloat16"
    results = run.run_groups([group], CPU, run.RunOptions(max_time=0.01))["results"]
    by_variant = {r["variant"]: r for r in results}
    for name in ("linear+F.cross_entropy", "liger:fused_linear_cross_entropy", "cce:linear_cross_entropy"):
        assert by_variant[name]["status"] == "ok", by_variant[name]["reason"]
        assert set(by_variant[name]["check"]) == {"output", "grad_hidden", "grad_weight"}
    memk = next(r for r in results if r["role"] == "candidate")
    assert set(memk["compare_to"]) == {"linear+F.cross_entropy", "linear+F.cross_entropy (compile)",
                                       "liger:fused_linear_cross_entropy", "cce:linear_cross_entropy"}
    if memk["status"] == "ok":  # where memk's fused kernels build
        assert set(memk["ratios"]) == {"linear+F.cross_entropy", "liger:fused_linear_cross_entropy",
                                       "cce:linear_cross_entropy"}


def test_a_linear_anchor_without_the_weight_gradient_is_refused(libraries):
    libraries.cce.linear_cross_entropy = lambda e, c, t: _linear_cross_entropy(e, c.detach(), t)
    (group,) = _groups("linear_cross_entropy")
    with pytest.raises(run.Refused) as refused:
        run.prepare(_case(group, "cce:linear_cross_entropy"), group.make_inputs(CPU), CPU)
    assert not refused.value.check["grad_weight"][0] <= refused.value.check["grad_weight"][1]
    assert refused.value.check["grad_hidden"][0] <= refused.value.check["grad_hidden"][1]


def test_missing_libraries_are_skipped_with_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # an import of it fails
    monkeypatch.setitem(sys.modules, "cut_cross_entropy", None)
    (group,) = _groups("linear_cross_entropy")
    results = run.run_groups([group], CPU, run.RunOptions(max_time=0.01),
                             case_filter=lambda c: c.variant.name.startswith(("liger", "cce")))["results"]
    reasons = {r["variant"]: r["reason"] for r in results}
    assert all(r["status"] == "skipped" for r in results)
    assert "pip install liger-kernel" in reasons["liger:fused_linear_cross_entropy"]
    assert "pip install cut-cross-entropy" in reasons["cce:linear_cross_entropy"]


def test_installed_libraries_are_not_run_off_cuda(libraries, monkeypatch):
    monkeypatch.setattr(anchors, "ANCHOR_DEVICES", ("cuda",))
    (group,) = _groups("cross_entropy", "float32")
    results = run.run_groups([group], CPU, run.RunOptions(max_time=0.01),
                             case_filter=lambda c: c.variant.name.startswith("liger"))["results"]
    assert results[0]["status"] == "skipped" and "Triton kernel for CUDA" in results[0]["reason"]


@pytest.mark.slow
def test_compiled_reference_model_is_checked_and_timed():
    """torch.compile of the reference model's loss: checked against float64 like the others (a cold compile, ~30 s)."""
    (group,) = train_groups(CPU, ["float32"], quick=False, configs=[(1, 16, 2)], batch=4)
    names = [v.name for v in group.variants]
    assert "sdpa+reference float32 (compile)" in names
    candidate = next(v for v in group.variants if v.role == "candidate")
    assert "sdpa+reference float32 (compile)" in candidate.compare_to
    (result,) = run.run_groups([group], CPU, run.RunOptions(max_time=0.05),
                               case_filter=lambda c: c.variant.name.endswith("(compile)"))["results"]
    assert result["status"] == "ok", result["reason"]
    assert result["check"]["loss"]["error"] <= result["check"]["loss"]["tolerance"]
