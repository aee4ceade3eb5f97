"""memk.kernels.fused_logprob's own machinery: loading the kernels once and saying why they
cannot load, and the formula that differentiates the backward (second derivatives).

The ops' values against float64 are tested in test_cross_entropy.py, each CPU instruction set's
path in test_cpu_kernel_paths.py, and how the library is built in test_native_build.py.
"""

from __future__ import annotations

import pytest
import torch

from memk import kernels
from memk.kernels import fused_logprob as ce


@pytest.fixture
def not_loaded(monkeypatch):
    """This process as if the kernels had never been asked for (restored afterwards)."""
    monkeypatch.setattr(ce._Extension, "loaded", False)
    monkeypatch.setattr(ce._Extension, "error", None)


def test_without_a_compiler_the_ops_raise_naming_the_reference_backend(monkeypatch, not_loaded):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    assert not ce.can_build("cpu")
    with pytest.raises(kernels.BackendUnavailable, match="reference"):
        ce.load_extension()
    with pytest.raises(kernels.BackendUnavailable, match="C\\+\\+ compiler"):
        kernels.token_logprobs(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))


def test_a_failed_load_is_said_once_and_not_tried_again(monkeypatch, not_loaded):
    tries = []

    def load_library():
        tries.append(1)
        raise kernels.BackendUnavailable("building the fused log-prob kernels failed (test); use 'reference'")

    monkeypatch.setattr(ce, "load_library", load_library)
    with pytest.raises(kernels.BackendUnavailable) as first:
        ce.load_extension()
    with pytest.raises(kernels.BackendUnavailable) as second:
        ce.cross_entropy(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))
    assert second.value is first.value and tries == [1]


def _backward_in_float64(g, logits, targets, ignore_index):
    """logprob_bwd written out: G_ij = g_i ([j == t_i] - softmax(x_i)_j), 0 for ignored rows."""
    onehot = torch.nn.functional.one_hot(targets.clamp(0, logits.shape[-1] - 1), logits.shape[-1]).double()
    used = (targets != ignore_index).double().unsqueeze(-1)
    return used * g.unsqueeze(-1) * (onehot - torch.softmax(logits, dim=-1))


def test_the_backwards_derivative_matches_autograd_of_the_backward_in_float64():
    gen = torch.Generator().manual_seed(7)
    rows, vocab, ignore = 6, 11, -100
    logits = torch.randn(rows, vocab, generator=gen, dtype=torch.float64) * 3
    g = torch.randn(rows, generator=gen, dtype=torch.float64)
    v = torch.randn(rows, vocab, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    targets[2] = ignore

    x, gg = logits.clone().requires_grad_(), g.clone().requires_grad_()
    want_g, want_x = torch.autograd.grad((v * _backward_in_float64(gg, x, targets, ignore)).sum(), (gg, x))
    got_g, got_x = ce._logprob_bwd_backward(v, g, logits, targets, ignore)
    torch.testing.assert_close(got_g, want_g, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_x, want_x, rtol=1e-12, atol=1e-12)
    assert got_g[2] == 0 and (got_x[2] == 0).all()  # the ignored row

    # A target outside [0, V) is NaN in its row, as the kernels' backward is; other rows keep their values.
    targets[4] = vocab
    bad_g, bad_x = ce._logprob_bwd_backward(v, g, logits, targets, ignore)
    assert bad_g[4].isnan() and bad_x[4].isnan().all()
    keep = [0, 1, 2, 3, 5]
    torch.testing.assert_close(bad_g[keep], got_g[keep], rtol=0, atol=0)
    torch.testing.assert_close(bad_x[keep], got_x[keep], rtol=0, atol=0)


def test_the_backwards_derivative_keeps_the_dtypes_of_its_inputs():
    logits = torch.randn(3, 5).to(torch.bfloat16)
    g = torch.randn(3)
    grad_g, grad_x = ce._logprob_bwd_backward(torch.randn(3, 5), g, logits, torch.tensor([0, 4, 2]), None)
    assert grad_g.dtype == torch.float32 and grad_x.dtype == torch.bfloat16
