"""memk.kernels.backends, the registry models take their ops from: which backends exist, that a
backend loads only when asked and then once, which one a model gets by default, and that a
backend that cannot run is an error naming the others, never a silent switch.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from memk import kernels
from memk.kernels import backends, fused_logprob, reference


@pytest.fixture
def registry(monkeypatch):
    """The registry, restored after the test: its loaders and what they loaded."""
    monkeypatch.setattr(backends, "_LOGPROB_LOADERS", dict(backends._LOGPROB_LOADERS))
    monkeypatch.setattr(backends, "_ATTENTION_LOADERS", dict(backends._ATTENTION_LOADERS))
    monkeypatch.setattr(backends, "_loaded", dict(backends._loaded))
    return backends


def test_the_built_in_backends_sorted():
    assert kernels.logprob_backends() == ["fused", "reference"]
    assert kernels.attention_backends() == ["reference", "sdpa", "triton"]


def test_the_reference_backends_are_the_plain_pytorch_functions():
    ops = kernels.logprob_ops("reference")
    assert (ops.token_logprobs, ops.cross_entropy, ops.sequence_bits) == (
        reference.token_logprobs, reference.cross_entropy, reference.sequence_bits)
    assert kernels.packed_attention("reference") is reference.packed_causal_attention
    assert kernels.packed_attention("sdpa") is reference.packed_causal_attention_sdpa


def test_an_unknown_name_is_an_error_listing_the_choices():
    with pytest.raises(ValueError, match=r"unknown log-prob backend 'fast'; choose one of fused, reference"):
        kernels.logprob_ops("fast")
    with pytest.raises(ValueError, match=r"unknown attention backend 'fast'; choose one of reference, sdpa, triton"):
        kernels.packed_attention("fast")


def test_a_registered_backend_loads_on_first_use_and_only_once(registry):
    calls = []
    ops = kernels.LogprobOps(reference.token_logprobs, reference.cross_entropy, reference.sequence_bits)

    def loader():
        calls.append(1)
        return ops

    registry.register_logprob_backend("counted", loader)
    assert calls == [] and "counted" in kernels.logprob_backends()  # registered, not loaded
    assert kernels.logprob_ops("counted") is ops
    assert kernels.logprob_ops("counted") is ops
    assert calls == [1]

    attend = reference.packed_causal_attention
    registry.register_attention_backend("counted", lambda: calls.append(2) or attend)
    assert kernels.packed_attention("counted") is attend and kernels.packed_attention("counted") is attend
    assert calls == [1, 2]


def test_a_backend_that_cannot_load_raises_each_time_and_nothing_replaces_it(registry):
    calls = []

    def unavailable():
        calls.append(1)
        raise kernels.BackendUnavailable("no compiler here; use 'reference'")

    registry.register_logprob_backend("unavailable", unavailable)
    for _ in range(2):  # not remembered as loaded: asked again, it tries again
        with pytest.raises(kernels.BackendUnavailable, match="no compiler here"):
            kernels.logprob_ops("unavailable")
    assert calls == [1, 1]


def test_default_logprob_backend_is_fused_only_where_it_can_be_built(monkeypatch):
    want = "fused" if fused_logprob.can_build("cpu") else "reference"
    assert kernels.default_logprob_backend("cpu") == want
    monkeypatch.setenv("CXX", "/nonexistent/c++")  # no compiler: the reference backend
    assert kernels.default_logprob_backend("cpu") == "reference"
    monkeypatch.delenv("CXX")
    monkeypatch.setattr(torch.version, "cuda", None)  # a CPU build of torch cannot build the CUDA kernels
    assert kernels.default_logprob_backend("cuda") == "reference"


def test_default_attention_backend_is_triton_on_cuda_where_triton_is_installed(monkeypatch):
    assert kernels.default_attention_backend("cpu") == "sdpa"
    installed = backends.importlib.util.find_spec("triton") is not None
    assert kernels.default_attention_backend(torch.device("cuda", 0)) == ("triton" if installed else "sdpa")
    monkeypatch.setattr(backends.importlib.util, "find_spec", lambda name: None)  # triton not installed
    assert kernels.default_attention_backend("cuda") == "sdpa"


def test_the_triton_backend_is_the_flash_attention_op():
    pytest.importorskip("triton")
    from memk.kernels import flash_attention

    if not torch.cuda.is_available() and not flash_attention._INTERPRET:
        pytest.skip("no GPU and not under Triton's interpreter")
    assert kernels.packed_attention("triton") is flash_attention.packed_causal_attention


def test_the_fused_backend_is_the_fused_logprob_ops():
    missing = fused_logprob.missing_build_requirements("cpu")
    if missing is not None:
        pytest.skip(f"cannot build the fused kernels here: {missing}")
    ops = kernels.logprob_ops("fused")
    assert (ops.token_logprobs, ops.cross_entropy, ops.sequence_bits) == (
        fused_logprob.token_logprobs, fused_logprob.cross_entropy, fused_logprob.sequence_bits)
    assert ops.cross_entropy is kernels.cross_entropy


def test_importing_memk_kernels_and_asking_the_default_compiles_nothing():
    code = (
        "import importlib, memk.kernels as k; "
        "k.default_logprob_backend('cpu'); "
        "assert not importlib.import_module('memk.kernels.fused_logprob')._Extension.loaded"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_importing_memk_kernels_does_not_import_triton():
    code = "import sys, memk.kernels; assert 'triton' not in sys.modules, 'memk.kernels imported triton'"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
