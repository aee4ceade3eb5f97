"""The fused log-prob ops (memk.kernels.fused_logprob) against torch in float64.

Every comparison is with log_softmax + gather or F.cross_entropy computed on the same
logits upcast to float64; tolerances are float32 arithmetic (or, for gradients, the
rounding of the gradient's own dtype), scaled by the size of the logits.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.nn.functional as F

from memk import kernels

from memk.kernels import fused_logprob as ce

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# Gradient tolerance: the rounding of a value of the gradient's dtype (relative).
GRAD_EPS = {torch.float32: 2e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3, torch.float64: 1e-10}


@pytest.fixture(scope="module", autouse=True)
def built():
    missing = ce.missing_build_requirements("cpu")
    if missing is not None:
        pytest.skip(f"cannot build the fused kernels here: {missing}")
    ce.load_extension()


def _seed(*parts) -> int:
    return sum((i + 1) * 7919 * ord(c) for i, c in enumerate(repr(parts))) % (2**31)


def _logits(shape, dtype, seed, scale=4.0, offset=0.0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * scale + offset
    return x.to(dtype).to(device)


def _targets(shape, vocab, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, vocab, shape, generator=g).to(device)


def _ref_logprobs(logits, targets):
    return torch.log_softmax(logits.double(), -1).gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)


def _fwd_tol(logits):
    """float32 arithmetic (float64 logits: float64 arithmetic), relative to log p itself.

    No term in the size of the logits: log p = (x_t - max) - log sum exp(x - max) is two terms
    of one sign, each computed to float32 rounding, whatever the offset of the logits.
    """
    if logits.dtype == torch.float64:
        return dict(rtol=1e-12, atol=1e-12)
    return dict(rtol=1e-5, atol=2e-5)


def _grad_tol(logits, ref_grad):
    eps = GRAD_EPS[logits.dtype]
    return dict(rtol=eps, atol=eps * max(float(ref_grad.abs().max()), 1e-30))


# --------------------------------------------------------------------------------------
# Forward and backward against float64 torch
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab,batch", [(2, (37,)), (7, (3, 5, 4)), (2048, (2, 9, 6)), (50257, (3,))])
def test_token_logprobs_and_grad_match_float64(dtype, vocab, batch):
    seed = _seed(dtype, vocab, batch)
    x = _logits(batch + (vocab,), dtype, seed).requires_grad_(True)
    t = _targets(batch, vocab, seed)
    got = kernels.token_logprobs(x, t)
    assert got.shape == batch
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    x64 = x.detach().double().requires_grad_(True)
    want = _ref_logprobs(x64, t)
    torch.testing.assert_close(got.double(), want.detach(), **_fwd_tol(x))

    upstream = torch.randn(batch, generator=torch.Generator().manual_seed(seed + 2), dtype=torch.float64)
    (got.double() * upstream).sum().backward()
    (want * upstream).sum().backward()
    assert x.grad.dtype == dtype and x.grad.shape == x.shape
    torch.testing.assert_close(x.grad.double(), x64.grad, **_grad_tol(x, x64.grad))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignore_index", [-100, 3])
def test_cross_entropy_matches_torch(dtype, reduction, ignore_index):
    vocab, batch = 7 if ignore_index == 3 else 2048, (4, 11)
    seed = _seed(dtype, reduction, ignore_index)
    x = _logits(batch + (vocab,), dtype, seed).requires_grad_(True)
    t = _targets(batch, vocab, seed)
    t[0, :3] = ignore_index  # some ignored targets (index 3 is also a valid class when V = 7)
    got = kernels.cross_entropy(x, t, ignore_index=ignore_index, reduction=reduction)
    x64 = x.detach().double().requires_grad_(True)
    want = F.cross_entropy(x64.reshape(-1, vocab), t.reshape(-1), ignore_index=ignore_index, reduction=reduction)
    want = want.reshape(batch) if reduction == "none" else want
    assert got.shape == want.shape
    torch.testing.assert_close(got.double(), want.detach(), **_fwd_tol(x))

    upstream = torch.rand(want.shape, generator=torch.Generator().manual_seed(seed + 3), dtype=torch.float64) + 0.5
    (got.double() * upstream).sum().backward()
    (want * upstream).sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, **_grad_tol(x, x64.grad))
    assert torch.all(x.grad[0, :3] == 0)  # ignored rows get exactly zero gradient


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sequence_bits_matches_float64(dtype):
    x = _logits((3, 17, 50), dtype, 11)
    t = _targets((3, 17), 50, 11)
    got = kernels.sequence_bits(x, t)
    want = -_ref_logprobs(x, t).sum(-1) / math.log(2.0)
    assert got.dtype == torch.float64 and got.shape == (3,)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=17 * 5e-5)


def test_large_offset_logits_are_stable():
    # exp(1000) overflows; the online log-sum-exp must not.
    x = _logits((64, 300), torch.float32, 5, offset=1000.0)
    t = _targets((64,), 300, 5)
    torch.testing.assert_close(kernels.token_logprobs(x, t).double(), _ref_logprobs(x, t), **_fwd_tol(x))


# Long rows: each CPU lane (each GPU thread) sums V / 8 (V / 256) terms exp(x - m); summed in plain
# float the small ones are lost against the large running sum, an error that grows with V.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_long_rows_match_float64(dtype):
    vocab = 2**22
    x = _logits((2, vocab), dtype, 7).requires_grad_(True)
    t = torch.tensor([0, vocab - 1])
    got = kernels.token_logprobs(x, t)
    x64 = x.detach().double().requires_grad_(True)
    want = _ref_logprobs(x64, t)
    torch.testing.assert_close(got.double(), want.detach(), **_fwd_tol(x))
    got.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, **_grad_tol(x, x64.grad))


@pytest.mark.slow
def test_vocabulary_of_two_to_the_28():
    # 1 GiB of float32 logits (and 1 GiB of gradient): one row, freed before the test ends.
    vocab = 2**28
    x = torch.randn((1, vocab), generator=torch.Generator().manual_seed(28)).requires_grad_(True)
    t = torch.tensor([vocab - 1])
    got = kernels.token_logprobs(x, t)
    row = x.detach()[0]
    m = float(row.max())
    sum_exp = sum(float(torch.exp(part.double() - m).sum()) for part in row.split(2**24))
    lse = m + math.log(sum_exp)
    want = float(row[-1]) - lse
    assert abs(float(got) - want) <= 1e-5 * abs(want) + 2e-5, (float(got), want)
    got.sum().backward()
    tail = row[-2**20:].double()
    want_grad = -torch.exp(tail - lse)
    want_grad[-1] += 1.0
    torch.testing.assert_close(x.grad[0, -2**20:].double(), want_grad, rtol=2e-5, atol=2e-5 * float(want_grad.abs().max()))
    del x, row, got, tail


# log_softmax(x + c) = log_softmax(x): the error may not grow with the logits' offset (the
# tolerance, _fwd_tol, has no term in the logits' size).
OFFSETS = [0.0, 1e4, 1e6, 1e8]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("offset", OFFSETS, ids=lambda o: f"offset={o:g}")
def test_shift_invariance_against_float64(offset, dtype, backend, device):
    ops = kernels.logprob_ops(backend)
    vocab, rows = 1000, 48  # V not a multiple of the CPU kernel's 32-element chunks
    x = _logits((rows, vocab), dtype, _seed("shift", offset, dtype), offset=offset, device=device).requires_grad_(True)
    t = _targets((rows,), vocab, 3, device=device)
    t[::7] = -100
    x64 = x.detach().double().requires_grad_(True)  # float64 on the same rounded inputs

    got = ops.token_logprobs(x, t.clamp(min=0))
    torch.testing.assert_close(got.double(), _ref_logprobs(x64, t.clamp(min=0)).detach(), **_fwd_tol(x))

    loss = ops.cross_entropy(x, t, reduction="sum")
    want = F.cross_entropy(x64, t, reduction="sum")
    torch.testing.assert_close(loss.double(), want.detach(), **_fwd_tol(x))
    loss.backward()
    want.backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, **_grad_tol(x, x64.grad))
    # Each row of the gradient is onehot - softmax: it sums to 0, up to the rounding of its entries.
    row_sums = x.grad.double().sum(-1)
    bound = 2 * GRAD_EPS[dtype] * x.grad.double().abs().sum(-1) + 1e-30
    assert torch.all(row_sums.abs() <= bound), f"gradient rows sum to {row_sums.abs().max():.3g}, not 0"


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_logits_near_float32_max(backend, device):
    ops = kernels.logprob_ops(backend)
    big = torch.finfo(torch.float32).max
    near = torch.tensor(3e38)
    below = float(torch.nextafter(near, torch.tensor(0.0)))  # one float32 step (2^104) below 3e38
    x = torch.tensor(
        [
            [3e38] * 10,  # all equal: p = 1/10 whatever their size
            [big, -big, 0.0, big] + [-3e38] * 6,  # two maxima, the rest (and x - max) beyond float32: p = 1/2
            [3e38] * 9 + [below],  # target 9 one step below the rest: log p = -2^104 - log 9
        ],
        device=device,
    ).requires_grad_(True)
    assert float(x[2, 0] - x[2, 9]) == 2.0**104
    t = torch.tensor([3, 0, 9], device=device)
    x64 = x.detach().double().requires_grad_(True)
    want = _ref_logprobs(x64, t)
    exact = torch.tensor([math.log(0.1), math.log(0.5)], dtype=torch.float64)
    torch.testing.assert_close(want[:2].detach().cpu(), exact)
    got = ops.token_logprobs(x, t)
    torch.testing.assert_close(got.double(), want.detach(), **_fwd_tol(x))
    loss = ops.cross_entropy(x, t, reduction="sum")
    loss.backward()
    F.cross_entropy(x64, t, reduction="sum").backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, **_grad_tol(x, x64.grad))


def test_non_contiguous_views():
    base = _logits((6, 9, 64), torch.float32, 21).requires_grad_(True)
    views = {
        "rows strided": lambda b: b[::2],  # a view the kernel reads with a row stride
        "shifted (copy)": lambda b: b[:, :-1],  # batch axes that do not merge: one copy
        "V strided": lambda b: b.transpose(0, 2).transpose(0, 2)[..., ::2],  # stride 2 along V
        "transposed": lambda b: b.transpose(0, 1),
    }
    for name, view in views.items():
        x = view(base)
        t = _targets(x.shape[:-1], x.shape[-1], 22).t().contiguous().t() if x.dim() == 2 else _targets(
            x.shape[:-1], x.shape[-1], 22
        )
        got = kernels.cross_entropy(x, t, reduction="sum")
        want = F.cross_entropy(x.double().reshape(-1, x.shape[-1]), t.reshape(-1), reduction="sum")
        torch.testing.assert_close(got.double(), want, **_fwd_tol(x), msg=lambda m: f"{name}: {m}")
        (g_got,) = torch.autograd.grad(got, base)
        (g_want,) = torch.autograd.grad(want, base)
        torch.testing.assert_close(g_got.double(), g_want.double(), **_grad_tol(base, g_want), msg=lambda m: f"{name}: {m}")
    # non-contiguous targets (every other column of a larger tensor)
    x = _logits((5, 8, 33), torch.float32, 23)
    t = _targets((5, 16), 33, 23)[:, ::2]
    torch.testing.assert_close(kernels.token_logprobs(x, t).double(), _ref_logprobs(x, t), **_fwd_tol(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_nan_and_inf_rows(dtype):
    x = _logits((5, 70), dtype, 31)
    t = _targets((5,), 70, 31)
    t[2] = 5
    x[0, 13] = float("nan")
    x[1, 64] = float("inf")  # in the padded tail chunk of the CPU kernel
    x[2, 5] = float("-inf")  # the target itself has probability 0
    x[3, 40] = float("-inf")  # a masked logit: an ordinary row otherwise
    x[4] = float("-inf")  # nothing has probability: undefined
    got = kernels.token_logprobs(x, t)
    assert torch.isnan(got[0]) and torch.isnan(got[1]) and torch.isnan(got[4])
    assert got[2] == float("-inf")
    torch.testing.assert_close(got[3].double(), _ref_logprobs(x[3], t[3]), **_fwd_tol(x[3]))
    loss = kernels.cross_entropy(x[3:4].clone().requires_grad_(True), t[3:4])
    assert torch.isfinite(loss)


def test_all_ignored_and_empty_batches():
    x = _logits((4, 10), torch.float32, 41).requires_grad_(True)
    t = torch.full((4,), -100)
    for reduction in ("mean", "sum", "none"):
        got = kernels.cross_entropy(x, t, reduction=reduction)
        want = F.cross_entropy(x.double(), t, reduction=reduction)
        torch.testing.assert_close(got.double(), want, equal_nan=True)
    empty = torch.zeros(0, 10, requires_grad=True)
    no_targets = torch.zeros(0, dtype=torch.long)
    assert kernels.token_logprobs(empty, no_targets).shape == (0,)
    assert torch.isnan(kernels.cross_entropy(empty, no_targets))  # 0 / 0, as torch
    loss = kernels.cross_entropy(empty, no_targets, reduction="sum")
    assert loss == 0
    loss.backward()
    assert empty.grad.shape == (0, 10)
    assert kernels.token_logprobs(_logits((3, 0, 5), torch.float32, 1), torch.zeros(3, 0, dtype=torch.long)).shape == (
        3,
        0,
    )


# --------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------
def test_bad_input_raises_clear_errors():
    x = _logits((4, 10), torch.float32, 51)
    t = _targets((4,), 10, 51)
    with pytest.raises(TypeError, match="integer"):
        kernels.cross_entropy(x, t.float())
    with pytest.raises(ValueError, match="shape"):
        kernels.cross_entropy(x, t[:3])
    with pytest.raises(TypeError, match="floating point"):
        kernels.token_logprobs(x.long(), t)
    with pytest.raises(TypeError, match="float32, bfloat16, float16 or float64"):
        kernels.token_logprobs(x.to(torch.float8_e4m3fn), t)
    with pytest.raises(ValueError, match="device"):
        kernels.token_logprobs(x, t.to("meta"))
    with pytest.raises(ValueError, match="V must be >= 1"):
        kernels.token_logprobs(torch.zeros(4, 0), t)
    with pytest.raises(ValueError, match="reduction"):
        kernels.cross_entropy(x, t, reduction="avg")
    with pytest.raises(TypeError, match="ignore_index"):
        kernels.cross_entropy(x, t, ignore_index=1.5)
    with pytest.raises(ValueError, match="cpu and cuda"):
        kernels.token_logprobs(x.to("meta"), t.to("meta"))


@pytest.mark.parametrize("bad", [10, -1, 2**40, -100])
def test_out_of_range_targets(bad):
    x = _logits((6, 10), torch.float32, 61)
    t = _targets((6,), 10, 61)
    t[4] = bad
    with pytest.raises(ValueError, match=rf"\[0, 10\).*{bad}"):
        kernels.token_logprobs(x, t)  # no ignore_index here: -100 is out of range too
    if bad != -100:
        with pytest.raises(ValueError, match="ignore_index=-100"):
            kernels.cross_entropy(x, t)
    # Unchecked: the bad row is NaN (never a read out of bounds), the others exact.
    got = kernels.token_logprobs(x, t, check_targets=False)
    assert torch.isnan(got[4])
    keep = torch.arange(6) != 4
    torch.testing.assert_close(got[keep].double(), _ref_logprobs(x[keep], t[keep]), **_fwd_tol(x))
    xg = x.clone().requires_grad_(True)
    kernels.token_logprobs(xg, t, check_targets=False).nansum().backward()
    assert torch.isnan(xg.grad[4]).all() and torch.isfinite(xg.grad[keep]).all()


def test_out_of_range_check_can_be_turned_off_globally(monkeypatch):
    monkeypatch.setattr(ce, "CHECK_TARGETS", False)
    x = _logits((3, 10), torch.float32, 71)
    assert torch.isnan(kernels.token_logprobs(x, torch.tensor([1, 99, 2]))[1])


def test_op_level_errors_name_the_problem():
    x = _logits((4, 10), torch.float32, 81)
    t = _targets((4,), 10, 81)
    with pytest.raises(TypeError, match="int64"):
        torch.ops.memk.logprob_fwd_v2(x, t.int(), None, True)
    with pytest.raises(ValueError, match="2-D"):
        torch.ops.memk.logprob_fwd_v2(x[None], t, None, True)
    with pytest.raises(ValueError, match="stride 1"):
        torch.ops.memk.logprob_fwd_v2(x.t(), _targets((10,), 4, 81), None, True)
    _, row_max, log_sum = torch.ops.memk.logprob_fwd_v2(x, t, None, True)
    with pytest.raises(TypeError, match="grad_logp must be Float"):
        torch.ops.memk.logprob_bwd_v2(torch.ones(4, dtype=torch.float64), x, t, row_max, log_sum, None)
    with pytest.raises(ValueError, match="log_sum must have shape"):
        torch.ops.memk.logprob_bwd_v2(torch.ones(4), x, t, row_max, log_sum[:3], None)


# --------------------------------------------------------------------------------------
# Autograd, torch.library, torch.compile
# --------------------------------------------------------------------------------------
def test_gradcheck_float64():
    x = _logits((3, 2, 5), torch.float64, 91).requires_grad_(True)
    t = _targets((3, 2), 5, 91)
    t[1, 0] = -100
    assert torch.autograd.gradcheck(lambda z: kernels.token_logprobs(z, t.clamp(min=0)), (x,))
    for reduction in ("mean", "sum", "none"):
        assert torch.autograd.gradcheck(lambda z: kernels.cross_entropy(z, t, reduction=reduction), (x,))


# Double backward (a gradient penalty): d/dx of a function of d loss/dx, against the same
# computed by torch's own ops on the logits in float64.
def _penalty_grad(fn, x, weights):
    """d/dx of sum(weights * (d fn(x) / dx)^2), with create_graph=True through the first gradient."""
    x = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(x), x, create_graph=True)
    (g.double().square() * weights).sum().backward()
    return x.grad


def _reference_loss(name, ignore_index=-100, reduction="mean"):
    from memk.kernels import reference

    if name == "cross_entropy":
        return lambda x, t: reference.cross_entropy(x.double(), t, ignore_index=ignore_index, reduction=reduction)
    return lambda x, t: getattr(reference, name)(x.double(), t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize(
    "name,kwargs",
    [("token_logprobs", {}), ("sequence_bits", {}),
     ("cross_entropy", {"reduction": "mean"}), ("cross_entropy", {"reduction": "sum", "ignore_index": 2}),
     ("cross_entropy", {"reduction": "none"})],
    ids=lambda v: v if isinstance(v, str) else "-".join(map(str, v.values())),
)
def test_double_backward_matches_float64(dtype, name, kwargs):
    seed = _seed(dtype, name, kwargs)
    x = _logits((3, 4, 37), dtype, seed, scale=2.0)
    t = _targets((3, 4), 37, seed)
    if "ignore_index" in kwargs:
        t[0, :2] = kwargs["ignore_index"]
    g = torch.Generator().manual_seed(seed + 5)
    weights = torch.rand(x.shape, generator=g, dtype=torch.float64) + 0.5
    upstream = torch.rand(t.shape[:1] if name == "sequence_bits" else t.shape, generator=g, dtype=torch.float64) + 0.5
    reduced = name == "cross_entropy" and kwargs["reduction"] != "none"

    def through(op):
        return lambda z: op(z, t).double().sum() if reduced else (op(z, t).double() * upstream).sum()

    ours = getattr(kernels, name)
    got = _penalty_grad(through(lambda z, tt: ours(z, tt, **kwargs)), x, weights)
    want = _penalty_grad(through(_reference_loss(name, **kwargs)), x.double(), weights)
    assert got.dtype == dtype and got.shape == x.shape
    torch.testing.assert_close(got.double(), want, **_grad_tol(x, want))


def test_double_and_triple_backward_gradcheck_float64():
    x = _logits((3, 2, 5), torch.float64, 93).requires_grad_(True)
    t = _targets((3, 2), 5, 93)
    t[1, 0] = -100
    assert torch.autograd.gradgradcheck(lambda z: kernels.token_logprobs(z, t.clamp(min=0)), (x,))
    assert torch.autograd.gradgradcheck(lambda z: kernels.cross_entropy(z, t, reduction="none"), (x,))

    def grad_of_grad(z):  # a third derivative: the double backward's own graph is right too
        (g,) = torch.autograd.grad(kernels.cross_entropy(z, t), z, create_graph=True)
        return torch.autograd.grad(g.square().sum(), z, create_graph=True)[0]

    assert torch.autograd.gradcheck(grad_of_grad, (x,))


def test_opcheck():
    x = _logits((5, 33), torch.float32, 101).requires_grad_(True)
    t = _targets((5,), 33, 101)
    torch.library.opcheck(torch.ops.memk.logprob_fwd_v2, (x, t, -100, True))
    _, row_max, log_sum = torch.ops.memk.logprob_fwd_v2(x.detach(), t, None, True)
    torch.library.opcheck(torch.ops.memk.logprob_bwd_v2, (torch.randn(5), x.detach(), t, row_max, log_sum, None))


def test_torch_compile_small_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(40, 16), torch.nn.Linear(16, 40))
    idx = torch.randint(0, 40, (4, 12))

    def loss_fn(m, idx):
        logits = m(idx[:, :-1])
        return kernels.cross_entropy(logits, idx[:, 1:])

    compiled = torch.compile(loss_fn, fullgraph=True, dynamic=False)
    got = compiled(model, idx)
    got.backward()
    got_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    want = F.cross_entropy(model(idx[:, :-1]).reshape(-1, 40), idx[:, 1:].reshape(-1))
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for g, p in zip(got_grads, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)


def test_hf_gpt2_loss_equals_cross_entropy_of_its_logits(monkeypatch):
    # transformers looks for Hugging Face's `kernels` package by that bare name; from the
    # repository root that would find (and import a second copy of) our kernels/ folder.
    monkeypatch.setitem(sys.modules, "kernels", None)
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=1, n_head=2)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()  # random weights, nothing downloaded
    ids = torch.randint(0, 97, (3, 20))
    labels = ids.clone()
    labels[0, 12:] = -100  # padding
    out = model(input_ids=ids, labels=labels)
    ours = kernels.cross_entropy(out.logits[:, :-1], labels[:, 1:])
    torch.testing.assert_close(ours, out.loss.float(), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------
# In a model (loading and the backend registry: test_fused_logprob.py, test_backends.py)
# --------------------------------------------------------------------------------------
def test_gpt_model_fused_matches_reference_backend():
    from memk.memorize.model import GPT, GPTConfig

    config = GPTConfig(n_layer=1, d_model=32, n_head=2, vocab_size=64, seq_len=16)
    torch.manual_seed(0)
    ref = GPT(config, logprob_backend="reference")
    fused = GPT(config, logprob_backend="fused")
    fused.load_state_dict(ref.state_dict())
    x = torch.randint(0, 64, (4, 16))
    torch.testing.assert_close(fused.loss(x), ref.loss(x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fused.sequence_bits(x), ref.sequence_bits(x), rtol=1e-6, atol=1e-4)
    fused.loss(x).backward()
    ref.loss(x).backward()
    for (name, a), b in zip(fused.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)


# --------------------------------------------------------------------------------------
# CUDA (skipped where there is none)
# --------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab,rows", [(2, 1000), (7, 333), (2048, 257), (50257, 9), (33000, 5)])
def test_cuda_matches_cpu_kernel(dtype, vocab, rows):
    seed = _seed("cuda", dtype, vocab)
    flat = _logits((rows * vocab + 1,), dtype, seed)
    t = _targets((rows,), vocab, seed)
    t[::5] = -100
    # Rows as stored, then the same buffer read one element further on: no row 16-byte aligned.
    for offset in (0, 1):
        n = rows - offset
        xc = flat.detach()[offset : offset + n * vocab].view(n, vocab).clone().requires_grad_(True)
        xg_base = flat.detach().cuda().requires_grad_(True)
        xg = xg_base[offset : offset + n * vocab].view(n, vocab)
        tv = t[:n]
        lc = kernels.cross_entropy(xc, tv, reduction="sum")
        lg = kernels.cross_entropy(xg, tv.cuda(), reduction="sum")
        torch.testing.assert_close(lg.cpu().double(), lc.double(), **_fwd_tol(xc))
        lc.backward()
        lg.backward()
        g_gpu = xg_base.grad[offset : offset + n * vocab].view(n, vocab)
        torch.testing.assert_close(g_gpu.cpu().double(), xc.grad.double(), **_grad_tol(xc, xc.grad.double()))
        tp = tv.clamp(min=0)
        torch.testing.assert_close(
            kernels.token_logprobs(xg.detach(), tp.cuda()).cpu().double(), _ref_logprobs(xc.detach(), tp), **_fwd_tol(xc)
        )


@pytest.mark.cuda
def test_cuda_bad_targets_and_strided_rows():
    x = _logits((8, 100), torch.float32, 7, device="cuda")
    t = _targets((8,), 100, 7, device="cuda")
    t[3] = 100
    with pytest.raises(ValueError, match=r"\[0, 100\)"):
        kernels.token_logprobs(x, t)
    assert torch.isnan(kernels.token_logprobs(x, t, check_targets=False)[3].cpu())
    t[3] = 1
    # Strided rows starting one element in: input and gradient rows are aligned differently
    # in some rows (the scalar backward path) and alike in others (the vector path).
    base = x.clone().requires_grad_(True)
    kernels.cross_entropy(base[::2, 1:], t[::2] - 1, ignore_index=-1, reduction="sum").backward()
    want = x[::2, 1:].double().cpu().requires_grad_(True)
    F.cross_entropy(want, (t[::2] - 1).cpu(), ignore_index=-1, reduction="sum").backward()
    torch.testing.assert_close(base.grad[::2, 1:].cpu().double(), want.grad, rtol=2e-5, atol=2e-6)


@pytest.mark.cuda
def test_cuda_bfloat16_large_batch_and_compile():
    x = _logits((4096, 2048), torch.bfloat16, 9, device="cuda").requires_grad_(True)
    t = _targets((4096,), 2048, 9, device="cuda")
    loss = torch.compile(kernels.cross_entropy, fullgraph=True)(x, t)
    want = F.cross_entropy(x.detach().double(), t)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-5)
