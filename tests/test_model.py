import pytest
import torch

from memk.memorize.model import GPT, GPTConfig, TiedHead, count_parameters, tied_head


def test_parameter_count_by_hand_one_layer():
    # d=32, V=128, S=32, one block. Written out term by term:
    wte, wpe = 128 * 32, 32 * 32
    ln = 2 * 32
    qkv, attn_out = 32 * 96 + 96, 32 * 32 + 32
    fc, mlp_out = 32 * 128 + 128, 128 * 32 + 32
    expected = wte + wpe + (ln + qkv + attn_out + ln + fc + mlp_out) + ln
    assert expected == 17888
    config = GPTConfig(n_layer=1, d_model=32, n_head=2, vocab_size=128, seq_len=32)
    assert count_parameters(config) == expected
    assert sum(p.numel() for p in GPT(config).parameters() if p.requires_grad) == expected


def test_parameter_count_by_hand_paper_sized():
    # The paper's V=2048, S=64 with 2 layers of d=64: 12·d² + 13·d per block.
    d, V, S, L = 64, 2048, 64, 2
    expected = V * d + S * d + L * (12 * d * d + 13 * d) + 2 * d
    config = GPTConfig(n_layer=L, d_model=d, n_head=2, vocab_size=V, seq_len=S)
    assert count_parameters(config) == expected == 235_264
    assert sum(p.numel() for p in GPT(config).parameters()) == expected


def test_output_head_is_the_token_embedding():
    torch.manual_seed(0)
    model = GPT(GPTConfig(1, 16, 2, 11, 8))
    x = torch.randint(0, 11, (2, 8))
    with torch.no_grad():
        h = model.wte(x) + model.wpe(torch.arange(8))
        for block in model.blocks:
            h = block(h)
        expected = model.ln_f(h) @ model.wte.weight.T
    torch.testing.assert_close(model(x), expected)


def test_the_tied_head_has_the_gradients_of_a_linear_map_in_float64():
    torch.manual_seed(0)
    hidden = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(TiedHead.apply, (hidden, weight))
    # and those of the textbook formulas, on a non-contiguous hidden (a transposed view)
    wide = torch.randn(5, 3, 8, dtype=torch.float64).transpose(0, 1).requires_grad_()
    g = torch.randn(3, 5, 11, dtype=torch.float64)
    tied_head(wide, weight).backward(g)
    torch.testing.assert_close(wide.grad, g @ weight.detach(), rtol=1e-12, atol=1e-12)
    expected = torch.einsum("btv,btd->vd", g, wide.detach())
    torch.testing.assert_close(weight.grad, expected, rtol=1e-12, atol=1e-12)


def test_the_tied_head_under_cpu_autocast_matches_float64_to_bfloat16_rounding():
    torch.manual_seed(0)
    hidden = torch.randn(4, 9, 16, requires_grad=True)
    weight = torch.randn(37, 16, requires_grad=True)
    g = torch.randn(4, 9, 37)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = tied_head(hidden, weight)
    assert logits.dtype == torch.bfloat16
    logits.backward(g.bfloat16())
    assert hidden.grad.dtype == hidden.dtype and weight.grad.dtype == weight.dtype
    h64, w64, g64 = hidden.detach().double(), weight.detach().double(), g.double()
    for got, want in ((logits, h64 @ w64.T), (hidden.grad, g64 @ w64), (weight.grad, torch.einsum("btv,btd->vd", g64, h64))):
        rel = (got.double() - want).norm() / want.norm()
        assert rel < 1e-2, rel  # each bfloat16 operand rounded to 2^-9 relative: about 3e-3 for two


def test_causal_a_later_token_never_changes_earlier_logits():
    torch.manual_seed(0)
    model = GPT(GPTConfig(2, 16, 2, 13, 10))
    x = torch.randint(0, 13, (1, 10))
    y = x.clone()
    y[0, 6] = (x[0, 6] + 1) % 13
    with torch.no_grad():
        a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_attention_backends_agree_with_float64(backend):
    torch.manual_seed(0)
    config = GPTConfig(2, 32, 4, 17, 12)
    model = GPT(config, attention_backend=backend)
    reference = GPT(config, attention_backend="reference").double()
    reference.load_state_dict(model.state_dict())
    x = torch.randint(0, 17, (3, 12))
    torch.testing.assert_close(model(x).double(), reference(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(d_model=30, n_head=4), "divisible"),
        (dict(n_layer=0), "n_layer"),
        (dict(vocab_size=-3), "vocab_size"),
        (dict(dropout=0.1), "dropout"),
    ],
)
def test_bad_config_is_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**kwargs)


def test_unknown_backend_names_the_choices():
    with pytest.raises(ValueError, match="reference"):
        GPT(GPTConfig(1, 8, 1, 5, 4), attention_backend="nope")
