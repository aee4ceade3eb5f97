"""Where runs execute: the device, the backends for it, the CPU threads a run takes."""

import os

import pytest
import torch

from memk.memorize import runtime
from memk.memorize.errors import ConfigError
from memk.memorize.model import GPTConfig, training_flops_per_token

TINY = GPTConfig(1, 8, 1, 64, 32)
LARGE = GPTConfig(2, 128, 4, 2048, 64)


@pytest.fixture
def unpinned(monkeypatch):
    monkeypatch.delenv(runtime.THREADS_ENV, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)


def test_flops_per_token_by_hand():
    # 1 layer, d 8, V 64, S 32: matmuls 12·8² = 768, head 8·64 = 512; attention 12·1·31·8 = 2976
    assert training_flops_per_token(TINY) == 6 * (768 + 512) + 2976


def test_small_steps_take_one_thread_and_large_ones_every_core(unpinned):
    assert runtime.cpu_threads_for(TINY, 64) == 1
    assert runtime.cpu_threads_for(LARGE, 64) == len(os.sched_getaffinity(0))


def test_a_pinned_thread_count_wins_and_a_bad_one_is_named(unpinned, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert runtime.cpu_threads_for(TINY, 64) == 3
    monkeypatch.setenv(runtime.THREADS_ENV, "2")  # memk's own variable first
    assert runtime.cpu_threads_for(LARGE, 64) == 2
    monkeypatch.setenv(runtime.THREADS_ENV, "two")
    with pytest.raises(ConfigError, match="MEMK_NUM_THREADS='two' is not a thread count"):
        runtime.cpu_threads_for(TINY, 64)


def test_use_cpu_threads_sets_torch_on_the_cpu_only(unpinned):
    before = torch.get_num_threads()
    try:
        runtime.use_cpu_threads(torch.device("cpu"), TINY, 64)
        assert torch.get_num_threads() == 1
        torch.set_num_threads(before)
        runtime.use_cpu_threads(torch.device("cuda"), TINY, 64)  # no CUDA work touches the CPU pool
        assert torch.get_num_threads() == before
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("device, message", [("tpu", "unknown device"), ("mps", "not supported")])
def test_devices_memk_cannot_use_are_named(device, message):
    with pytest.raises(ConfigError, match=message):
        runtime.resolve_device(device)


def test_auto_backends_are_registered_names():
    backends = runtime.resolve_backends(torch.device("cpu"), "auto", "reference")
    assert backends.logprob == "reference" and backends.attention in ("sdpa", "reference", "triton")


def test_a_run_too_large_for_memory_is_refused_with_what_it_needs():
    need = runtime.training_memory_bytes(TINY, 10**11, 64)
    assert need >= 2 * 10**11 * 32 * 8  # the dataset alone, drawn as int64 blocks and joined
    with pytest.raises(ConfigError, match=r"needs about .* GiB, but cpu has .* GiB free; fewer"):
        runtime.check_fits(need, torch.device("cpu"), "this run", "fewer")
