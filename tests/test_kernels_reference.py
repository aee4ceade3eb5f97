"""kernels/reference.py: plain PyTorch attention and log-prob ops; here, its SDPA attention on the
CPU for 16-bit inputs (the log-prob ops are checked in tests/test_cross_entropy.py and
tests/test_fused_logprob.py, the written-out attention in tests/test_flash_attention.py)."""

import pytest
import torch

from memk.kernels import reference


def float64_attention(qkv: torch.Tensor, n_head: int) -> torch.Tensor:
    """Causal attention of the packed qkv in float64, written out (the textbook formula)."""
    return reference.packed_causal_attention(qkv.double(), n_head)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(3, 17, 2, 16), (2, 64, 4, 8), (1, 1, 1, 32)])  # batch, seq, heads, head_dim
def test_sdpa_on_16_bit_inputs_is_the_exact_attention_rounded_once(dtype, shape):
    batch, seq, heads, head_dim = shape
    torch.manual_seed(0)
    qkv = (2 * torch.randn(batch, seq, 3 * heads * head_dim)).to(dtype).requires_grad_(True)
    y = reference.packed_causal_attention_sdpa(qkv, heads)
    assert y.dtype == dtype and y.shape == (batch, seq, heads * head_dim)
    exact = float64_attention(qkv.detach(), heads)
    # One rounding to the 16-bit format (at most half a unit in the last place: 2^-8 of the value
    # for bfloat16's 8-bit significand, 2^-11 for float16's 11) plus float32's own error.
    half_ulp = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    assert ((y.double() - exact).abs() <= half_ulp * exact.abs() + 1e-5).all()

    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    qkv64 = qkv.detach().double().requires_grad_(True)
    float64_attention(qkv64, heads).backward(grad_out.double())
    # The gradient is worked in float32 and rounded to the input's dtype once as well.
    err = (qkv.grad.double() - qkv64.grad).abs()
    assert (err <= half_ulp * qkv64.grad.abs() + 1e-4).all(), err.max()


def test_sdpa_under_bfloat16_autocast_runs_in_float32_and_returns_bfloat16():
    torch.manual_seed(1)
    x = torch.randn(2, 9, 32)
    proj = torch.nn.Linear(32, 96)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        qkv = proj(x)
        y = reference.packed_causal_attention_sdpa(qkv, 2)
    assert qkv.dtype == torch.bfloat16 and y.dtype == torch.bfloat16
    exact = float64_attention(qkv.detach(), 2)
    assert ((y.double() - exact).abs() <= 2.0**-8 * exact.abs() + 1e-5).all()


def test_sdpa_on_float32_is_torchs_own():
    torch.manual_seed(2)
    qkv = torch.randn(2, 11, 3 * 2 * 16)
    q, k, v = reference.split_heads(qkv, 2)
    direct = reference.merge_heads(torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))
    assert torch.equal(reference.packed_causal_attention_sdpa(qkv, 2), direct)
