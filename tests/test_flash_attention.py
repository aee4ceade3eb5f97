"""The Triton attention kernels (memk.kernels.flash_attention) against a float64 PyTorch reference.

Without CUDA these run under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1),
which is slow: shapes stay small. bfloat16 runs only on CUDA (the interpreter's bf16 dot is wrong).
"""

from __future__ import annotations

import sys

import pytest
import torch

from memk import kernels
from memk.kernels import reference
from memk.kernels.flash_attention import attention, attention_packed
from memk.memorize.model import GPT, GPTConfig

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
attention_module = sys.modules["memk.kernels.flash_attention"]

# Errors are measured as |got - want| <= TOL·(1 + |want|) against float64 math on the same
# (rounded) inputs. 16-bit: a few units of the dtype's epsilon (the kernel rounds the
# probabilities and the score gradients to the input dtype before its tensor-core dots).
TOL = {torch.float32: 1e-5, torch.float16: 5 * 2**-10, torch.bfloat16: 5 * 2**-7}

HEAD_DIMS = [16, 32, 64, 128]
SEQS = [1, 17, 64, 100, 256]


def _inputs(shape, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen).to(device=DEVICE, dtype=dtype).requires_grad_() for _ in range(3)]


def _float64_reference(tensors, fn, grad_out):
    """fn on float64 copies of tensors; returns the output and the gradients for grad_out."""
    copies = [t.detach().double().requires_grad_() for t in tensors]
    out = fn(*copies)
    out.backward(grad_out.double())
    return out, [c.grad for c in copies]


def _assert_close(got, want, dtype, what):
    err = ((got.double() - want).abs() / (1 + want.abs())).max().item() if want.numel() else 0.0
    assert err <= TOL[dtype], f"{what}: relative error {err:.2e} > {TOL[dtype]:.1e}"


def _check_attention(batch, heads, seq, head_dim, causal, dtype, seed=0, scale=None):
    q, k, v = _inputs((batch, heads, seq, head_dim), dtype, seed)
    out = attention(q, k, v, causal=causal, scale=scale)
    assert out.shape == q.shape and out.dtype == dtype
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE, dtype)
    out.backward(grad_out)
    want, want_grads = _float64_reference(
        (q, k, v), lambda a, b, c: reference.attention(a, b, c, causal=causal, scale=scale), grad_out
    )
    _assert_close(out, want, dtype, "output")
    for name, t, g in zip("qkv", (q, k, v), want_grads):
        _assert_close(t.grad, g, dtype, f"d{name}")


def _shape(seq):
    # Short sequences: batch and heads > 1 and an odd batch·heads, so the several-heads-per-program
    # kernels hit a tail. Long ones stay small: the interpreter's time grows with every block.
    return (3, 3) if seq <= 64 else (1, 2)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("seq", SEQS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
def test_attention_matches_float64(dtype, head_dim, seq, causal):
    _check_attention(*_shape(seq), seq, head_dim, causal, dtype, seed=seq * 1000 + head_dim)


@pytest.mark.cuda
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("seq", SEQS + [1024])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_attention_matches_float64_bfloat16(head_dim, seq, causal):
    _check_attention(*_shape(seq), seq, head_dim, causal, torch.bfloat16, seed=seq * 1000 + head_dim)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("seq", [1, 17, 64, 100])
@pytest.mark.parametrize("head_dim", [16, 64])
def test_blocked_kernels_on_short_sequences(monkeypatch, head_dim, seq, causal):
    # Sequences that fit one tile normally skip the blocked kernels; force them there to test
    # their ragged tails and causal diagonals on lengths that are not multiples of the blocks.
    monkeypatch.setattr(attention_module, "ONE_TILE_MAX_SEQ", 0)
    monkeypatch.setattr(attention_module, "ONE_TILE_MAX_SEQ_BACKWARD", 0)
    _check_attention(2, 2, seq, head_dim, causal, torch.float32, seed=seq + head_dim)


@pytest.mark.parametrize("head_dim", [8, 24])
def test_head_dims_below_or_between_powers_of_two(head_dim):
    # Head sizes that are not 16/32/64/128 (the paper goes down to 8) are padded inside the kernel.
    _check_attention(2, 2, 17, head_dim, True, torch.float32, seed=head_dim)


def test_custom_scale():
    _check_attention(1, 2, 33, 32, True, torch.float32, scale=0.3)


def _check_packed(batch, seq, n_head, head_dim, causal, dtype, scale=None):
    d_model = n_head * head_dim
    gen = torch.Generator().manual_seed(seq + head_dim)
    qkv = torch.randn(batch, seq, 3 * d_model, generator=gen).to(DEVICE, dtype).requires_grad_()
    out = attention_packed(qkv, n_head, causal=causal, scale=scale)
    assert out.shape == (batch, seq, d_model) and out.dtype == dtype
    grad_out = torch.randn(out.shape, generator=gen).to(DEVICE, dtype)
    out.backward(grad_out)

    # The packed entry point against the unpacked one on the same numbers...
    q, k, v = (t.detach().clone().requires_grad_() for t in reference.split_heads(qkv.detach(), n_head))
    unpacked = attention(q, k, v, causal=causal, scale=scale)
    unpacked.backward(grad_out.unflatten(-1, (n_head, head_dim)).transpose(1, 2))
    _assert_close(out, reference.merge_heads(unpacked.detach()).double(), dtype, "packed vs unpacked output")
    split_grads = reference.split_heads(qkv.grad, n_head)
    for name, got, want in zip("qkv", split_grads, (q.grad, k.grad, v.grad)):
        _assert_close(got, want.double(), dtype, f"packed vs unpacked d{name}")

    # ...and both against float64.
    def packed_reference(x):
        a, b, c = reference.split_heads(x, n_head)
        return reference.merge_heads(reference.attention(a, b, c, causal=causal, scale=scale))

    want, (want_grad,) = _float64_reference((qkv,), packed_reference, grad_out)
    _assert_close(out, want, dtype, "packed output")
    _assert_close(qkv.grad, want_grad, dtype, "packed dqkv")


@pytest.mark.parametrize(
    "batch, seq, n_head, head_dim, causal",
    [(2, 17, 2, 16, True), (2, 64, 3, 32, True), (1, 100, 2, 64, False), (1, 256, 2, 16, True), (3, 1, 2, 128, True)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
def test_packed_matches_unpacked_and_float64(dtype, batch, seq, n_head, head_dim, causal):
    _check_packed(batch, seq, n_head, head_dim, causal, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("seq, head_dim", [(64, 32), (64, 64), (256, 64)])
def test_packed_bfloat16(seq, head_dim):
    _check_packed(4, seq, 4, head_dim, True, torch.bfloat16)


def test_packed_reads_a_strided_qkv_without_copying_first():
    # qkv as a slice of a wider tensor: row stride != 3·d_model.
    gen = torch.Generator().manual_seed(5)
    wide = torch.randn(2, 17, 3 * 32 + 8, generator=gen).to(DEVICE)
    qkv = wide[..., : 3 * 32]
    want = reference.packed_causal_attention(qkv.double(), 2)
    _assert_close(attention_packed(qkv, 2), want, torch.float32, "strided qkv")


@pytest.mark.parametrize("n_head, seq_len", [(2, 17), (4, 64)])
def test_gpt2_triton_backend_matches_reference(n_head, seq_len):
    config = GPTConfig(n_layer=2, d_model=64, n_head=n_head, vocab_size=97, seq_len=seq_len)
    torch.manual_seed(0)
    want_model = GPT(config, attention_backend="reference").to(DEVICE)
    got_model = GPT(config, attention_backend="triton").to(DEVICE)
    got_model.load_state_dict(want_model.state_dict())
    x = torch.randint(0, config.vocab_size, (2, seq_len), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    want_loss, got_loss = want_model.loss(x), got_model.loss(x)
    want_loss.backward()
    got_loss.backward()
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
    want_grads = dict(want_model.named_parameters())
    for name, p in got_model.named_parameters():
        torch.testing.assert_close(p.grad, want_grads[name].grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


# Schema, autograd registration and (on CUDA) the fake-tensor implementation torch.compile traces.
# Interpreted kernels cannot be traced with fake tensors (torch launches them as they are).
OPCHECKS = ["test_schema", "test_autograd_registration"] + (["test_faketensor"] if torch.cuda.is_available() else [])


def test_custom_ops_pass_opcheck():
    q, k, v = (t.detach() for t in _inputs((1, 2, 17, 16), torch.float32, 3))
    o, lse = torch.ops.memk.attention(q, k, v, True, 0.25)
    tests = OPCHECKS
    torch.library.opcheck(torch.ops.memk.attention.default, (q, k, v, True, 0.25), test_utils=tests)
    torch.library.opcheck(
        torch.ops.memk.attention_backward.default, (torch.randn_like(o), q, k, v, o, lse, True, 0.25), test_utils=tests
    )
    qkv = torch.randn(1, 17, 3 * 32, device=DEVICE)
    torch.library.opcheck(torch.ops.memk.attention_packed.default, (qkv, 2, True, 0.25), test_utils=tests)


@pytest.mark.cuda
def test_torch_compile_traces_the_custom_ops():
    # fullgraph: the custom ops and their autograd formula trace without graph breaks.
    gen = torch.Generator().manual_seed(9)
    qkv = torch.randn(8, 64, 3 * 128, generator=gen).to(DEVICE, torch.bfloat16)
    grad_out = torch.randn(8, 64, 128, generator=gen).to(DEVICE, torch.bfloat16)
    results = []
    for fn in (attention_packed, torch.compile(attention_packed, fullgraph=True)):
        x = qkv.clone().requires_grad_()
        out = fn(x, 4)
        out.backward(grad_out)
        results.append((out, x.grad))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


def test_bad_inputs_raise_clear_errors():
    q = torch.randn(1, 2, 8, 16, device=DEVICE)
    with pytest.raises(ValueError, match="same shape|shape"):
        attention(q, q[:, :1], q)
    with pytest.raises(ValueError, match="batch, heads, seq, head_dim"):
        attention(q[0], q[0], q[0])
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        attention(q.double(), q.double(), q.double())
    big = torch.randn(1, 1, 8, 256, device=DEVICE)
    with pytest.raises(ValueError, match="head_dim.*sdpa"):
        attention(big, big, big)
    with pytest.raises(ValueError, match="divisible by 6"):
        attention_packed(torch.randn(1, 8, 40, device=DEVICE), 2)
    with pytest.raises(ValueError, match="n_head"):
        attention_packed(torch.randn(1, 8, 48, device=DEVICE), 0)


def test_bfloat16_under_the_interpreter_is_refused(monkeypatch):
    # The interpreter's bfloat16 dots are wrong (errors of ~1e9): refuse, never return garbage.
    monkeypatch.setattr(attention_module, "_INTERPRET", True)
    q = torch.randn(1, 2, 17, 16, device=DEVICE, dtype=torch.bfloat16)
    fix = r"interpreter.*float32 or float16.*bfloat16 on a CUDA GPU"
    with pytest.raises(TypeError, match=fix):
        attention(q, q, q)
    with pytest.raises(TypeError, match=fix):
        attention_packed(torch.randn(1, 17, 96, device=DEVICE, dtype=torch.bfloat16), 2)
    with pytest.raises(TypeError, match=fix):
        GPT(GPTConfig(n_layer=1, d_model=32, n_head=2, vocab_size=17, seq_len=8), attention_backend="triton").to(
            DEVICE, torch.bfloat16
        ).loss(torch.zeros(1, 8, dtype=torch.long, device=DEVICE))


def test_cpu_tensor_outside_interpreter_names_the_alternatives(monkeypatch):
    monkeypatch.setattr(attention_module, "_INTERPRET", False)
    q = torch.randn(1, 1, 4, 16)
    with pytest.raises(RuntimeError, match="'sdpa'.*'reference'"):
        attention(q, q, q)
    with pytest.raises(RuntimeError, match="'sdpa'.*'reference'"):
        attention_packed(torch.randn(1, 4, 48), 1)
    if not torch.cuda.is_available():
        with pytest.raises(kernels.BackendUnavailable, match="'sdpa' or 'reference'"):
            attention_module.load_backend()


def test_memk_kernels_exports_the_triton_ops():
    # The registry's side (the `triton` backend, the defaults) is tested in test_backends.py.
    assert kernels.attention_packed is attention_packed
    q = torch.randn(1, 1, 5, 16, device=DEVICE)
    torch.testing.assert_close(kernels.attention(q, q, q), attention(q, q, q))
