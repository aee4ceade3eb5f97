"""memorize/precision.py: the three training precisions and BFloat16AdamW, against float64."""

import copy
import math

import numpy as np
import pytest
import torch

from memk.memorize.bits import model_sequence_bits
from memk.memorize.data import uniform_random_sequences
from memk.memorize.model import GPT, GPTConfig
from memk.memorize.precision import BFloat16AdamW, autocast_context, optimizer_for, weights_dtype
from memk.memorize.schedule import TrainConfig
from memk.memorize.train import train_to_saturation


def float64_adamw(p, grad, m, v, step, lr, betas, eps, wd):
    """One AdamW step (torch.optim.AdamW's formula) in float64 from the given numbers."""
    p, grad, m, v = (t.double() for t in (p, grad, m, v))
    b1, b2 = betas
    m = b1 * m + (1 - b1) * grad
    v = b2 * v + (1 - b2) * grad * grad
    p = p * (1 - lr * wd) - lr / (1 - b1**step) * m / ((v / (1 - b2**step)).sqrt() + eps)
    return p, m, v


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bfloat16 numbers at |x| (8 significant bits)."""
    exponent = torch.floor(torch.log2(x.abs().double().clamp_min(2.0**-126)))
    return torch.pow(2.0, exponent - 7)


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_bfloat16_adamw_rounds_the_float64_step_once(wd):
    torch.manual_seed(0)
    p = torch.nn.Parameter((torch.randn(4099) * 0.5).to(torch.bfloat16))  # odd size
    lr, betas, eps = 3e-3, (0.9, 0.98), 1e-8
    opt = BFloat16AdamW([p], lr=lr, betas=betas, eps=eps, weight_decay=wd)
    for step in range(1, 6):
        grad = (torch.randn(4099) * 10.0 ** torch.randint(-3, 1, (4099,))).to(torch.bfloat16)
        before = p.detach().clone()
        state = opt.state.get(p) or {}
        m0 = state["exp_avg"].clone() if state else torch.zeros_like(p)
        v0 = state["exp_avg_sq"].clone() if state else torch.zeros_like(p)
        p.grad = grad
        opt.step()
        want_p, want_m, want_v = float64_adamw(before, grad, m0, v0, step, lr, betas, eps, wd)
        assert p.dtype == opt.state[p]["exp_avg"].dtype == opt.state[p]["exp_avg_sq"].dtype == torch.bfloat16
        for got, want in ((p.detach(), want_p), (opt.state[p]["exp_avg"], want_m), (opt.state[p]["exp_avg_sq"], want_v)):
            got = got.double()
            # float32 arithmetic then one rounding: the float64 result rounded to nearest, or (where the
            # float64 value lies within float32 rounding of a halfway point) its neighbour
            rounded = want.to(torch.bfloat16).double()
            assert (got == rounded).float().mean() > 0.995
            assert torch.all((got - want).abs() <= bf16_ulp(want) * 0.5 + 1e-6 * want.abs() + 1e-30)


def test_bfloat16_adamw_loses_updates_below_half_a_spacing():
    # round to nearest: a step of 1e-4 on a weight of 1.0 (spacing 2^-7) leaves it unchanged
    p = torch.nn.Parameter(torch.ones(8, dtype=torch.bfloat16))
    opt = BFloat16AdamW([p], lr=1e-4, betas=(0.9, 0.98))
    p.grad = torch.ones_like(p)
    opt.step()
    assert torch.equal(p.detach(), torch.ones(8, dtype=torch.bfloat16))
    assert opt.state[p]["exp_avg"].float().allclose(torch.full((8,), 0.1), rtol=1e-2)


def test_bfloat16_adamw_state_dict_resumes_the_same_steps():
    torch.manual_seed(1)
    grads = [torch.randn(37).to(torch.bfloat16) for _ in range(6)]
    a = torch.nn.Parameter(torch.randn(37).to(torch.bfloat16))
    b = torch.nn.Parameter(a.detach().clone())
    opt_a = BFloat16AdamW([a], lr=1e-2)
    for g in grads[:3]:
        a.grad = g
        opt_a.step()
    b.data.copy_(a.detach())
    opt_b = BFloat16AdamW([b], lr=1e-2)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))  # as a checkpoint holds it: no shared tensors
    for g in grads[3:]:
        a.grad, b.grad = g, g.clone()
        opt_a.step()
        opt_b.step()
    assert torch.equal(a.detach(), b.detach())


def test_precisions_store_and_compute_as_named():
    torch.manual_seed(2)
    model = GPT(GPTConfig(1, 16, 2, 40, 12))
    x = uniform_random_sequences(5, 40, 12, seed=0)
    with autocast_context(torch.device("cpu"), "bfloat16-autocast"):
        assert model.next_token_logits(x).dtype == torch.bfloat16
    with autocast_context(torch.device("cpu"), "float32"):
        assert model.next_token_logits(x).dtype == torch.float32
    assert weights_dtype("bfloat16") == torch.bfloat16
    assert weights_dtype("bfloat16-autocast") is None and weights_dtype("float32") is None  # as built
    assert isinstance(optimizer_for(model.parameters(), "float32", 1e-3, (0.9, 0.98), 0.0), torch.optim.AdamW)
    with pytest.raises(ValueError, match="precision must be one of"):
        weights_dtype("float16")


def test_bfloat16_weights_are_measured_in_float32_from_their_logits():
    """The bits of a bfloat16-weight model: float32 log-probs of its bfloat16 logits, summed in float64;
    against a float64 softmax of the same logits."""
    torch.manual_seed(3)
    model = GPT(GPTConfig(1, 16, 2, 33, 10)).to(torch.bfloat16)
    x = uniform_random_sequences(9, 33, 10, seed=1)
    ours = model_sequence_bits(model, x, precision="bfloat16")
    with torch.no_grad():
        logits = model.next_token_logits(x).double()
    want = -torch.log_softmax(logits, -1).gather(-1, x[:, 1:, None])[..., 0].sum(-1).numpy() / math.log(2)
    np.testing.assert_allclose(ours, want, rtol=0, atol=9 * 1e-4)


def test_a_bfloat16_run_trains_bfloat16_weights_and_memorizes():
    data = uniform_random_sequences(16, 16, 8, seed=0)
    cfg = TrainConfig(lr=1e-2, warmup_steps=5, batch_size=16, max_steps=300, cooldown_steps=60, min_steps=300,
                      eval_every=50, precision="bfloat16")
    model, outcome = train_to_saturation(GPTConfig(1, 16, 2, 16, 8), data, cfg, torch.device("cpu"))
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    # 16 sequences of 7 tokens of 4 bits: 448 bits; a 1x16 model holds a good share of them
    assert outcome.memorized_bits > 100


XEON = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
EPYC_ZEN2 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n"
ARM_V8_2 = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes crc32\n"
ARM_V8_6 = "processor\t: 0\nFeatures\t: fp asimd bf16 i8mm sve2\n"


def test_bfloat16_instructions_are_read_from_the_cpus_flags():
    from memk.memorize.precision import cpu_has_bfloat16

    assert cpu_has_bfloat16(XEON) is True
    assert cpu_has_bfloat16(ARM_V8_6) is True
    assert cpu_has_bfloat16(EPYC_ZEN2) is False
    assert cpu_has_bfloat16(ARM_V8_2) is False


def test_bfloat16_on_a_cpu_without_its_instructions_gets_one_line_suggesting_float32():
    from memk.memorize.precision import bfloat16_cpu_note

    note = bfloat16_cpu_note("cpu", ["float32", "bfloat16"], EPYC_ZEN2)
    assert "no bfloat16 instructions" in note and "--precision float32" in note and "\n" not in note
    assert bfloat16_cpu_note("cpu", ["bfloat16-autocast"], ARM_V8_2) is not None
    assert bfloat16_cpu_note("cpu", ["bfloat16"], XEON) is None  # the hardware has them
    assert bfloat16_cpu_note("cpu", ["float32"], EPYC_ZEN2) is None  # not asked for
    assert bfloat16_cpu_note("cuda", ["bfloat16"], EPYC_ZEN2) is None  # not on the CPU
