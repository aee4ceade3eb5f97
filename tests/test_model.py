import math

import pytest
import torch
import torch.nn as nn

from memk.memorize.model import GPT, GPTConfig, TiedHead, count_parameters, gpt_layers, parameter_shapes, tied_head


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


# ---------------------------------------------------------------------------------------
# The one definition: layers, init and forward


CONFIGS = [GPTConfig(1, 8, 1, 16, 8), GPTConfig(3, 16, 4, 11, 5), GPTConfig(2, 32, 2, 64, 16)]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
def test_gpts_state_dict_is_the_layer_table_name_for_name(config):
    state = GPT(config).state_dict()
    assert {n: tuple(t.shape) for n, t in state.items()} == parameter_shapes(config)
    assert list(state) == list(parameter_shapes(config))  # in its order, too
    assert [f"{layer.name}.weight" for layer in gpt_layers(config)] == [n for n in state if n.endswith("weight")]
    assert sum(math.prod(s) for s in parameter_shapes(config).values()) == count_parameters(config)


def test_gpts_init_draws_gpt2s_recipe_in_the_order_memk_always_drew_it():
    # Written out with plain torch.nn modules, built in the order GPT has always built them: seeded runs
    # (seeded_gpt) start from the same weights as they always have.
    config = GPTConfig(2, 16, 2, 32, 8)
    d, L = config.d_model, config.n_layer
    torch.manual_seed(11)
    modules = [nn.Embedding(32, d), nn.Embedding(8, d)]
    for _ in range(L):
        modules += [nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d), nn.LayerNorm(d), nn.Linear(d, 4 * d),
                    nn.Linear(4 * d, d)]
    modules.append(nn.LayerNorm(d))
    for m in modules:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)
    for i in range(L):  # the projections into the residual stream: attn.proj, then mlp.proj
        for m in (modules[2 + 6 * i + 2], modules[2 + 6 * i + 5]):
            nn.init.normal_(m.weight, std=0.02 / math.sqrt(2 * L))
    expected = [t for m in modules for t in (m.weight, getattr(m, "bias", None)) if t is not None]
    torch.manual_seed(11)
    got = list(GPT(config).state_dict().values())
    assert len(got) == len(expected) and all(torch.equal(a, b) for a, b in zip(got, expected))


def _gelu_tanh(u):
    return 0.5 * u * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u**3)))


def _layer_norm(x, w, b):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5) * w + b


def _attention(qkv, n_head):
    B, T, three_d = qkv.shape
    d = three_d // 3
    q, k, v = (t.reshape(B, T, n_head, d // n_head).transpose(1, 2) for t in qkv.split(d, dim=-1))
    scores = q @ k.transpose(-1, -2) / math.sqrt(d // n_head)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, d)


def test_the_forward_is_gpt2_written_out_by_hand_in_float64():
    config = GPTConfig(2, 16, 4, 23, 9)
    torch.manual_seed(0)
    model = GPT(config, attention_backend="sdpa").double()  # (the reference backend's softmax is float32)
    with torch.no_grad():  # biases and LayerNorm weights away from their init, so each one counts
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    p = {n: t.detach() for n, t in model.named_parameters()}
    x = torch.randint(0, 23, (3, 9))
    h = p["wte.weight"][x] + p["wpe.weight"][:9]
    for i in range(2):
        b = f"blocks.{i}."
        qkv = _layer_norm(h, p[b + "ln_1.weight"], p[b + "ln_1.bias"]) @ p[b + "attn.qkv.weight"].T + p[b + "attn.qkv.bias"]
        h = h + _attention(qkv, 4) @ p[b + "attn.proj.weight"].T + p[b + "attn.proj.bias"]
        u = _layer_norm(h, p[b + "ln_2.weight"], p[b + "ln_2.bias"]) @ p[b + "mlp.fc.weight"].T + p[b + "mlp.fc.bias"]
        h = h + _gelu_tanh(u) @ p[b + "mlp.proj.weight"].T + p[b + "mlp.proj.bias"]
    expected = _layer_norm(h, p["ln_f.weight"], p["ln_f.bias"]) @ p["wte.weight"].T
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)
