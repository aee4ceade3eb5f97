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


# ---- progress: bars on a terminal, plain lines in a log -------------------------------------


def test_a_terminal_gets_a_bar_and_a_pipe_file_or_buffer_gets_lines(tmp_path):
    import io

    from tqdm import tqdm

    controller, terminal = os.openpty()
    try:
        with os.fdopen(terminal, "w") as tty:
            assert runtime.draws_bars(tty)
            bar = runtime.progress_bar(total=3, desc="sweep", file=tty)
            assert isinstance(bar, tqdm)
            bar.close()
        read_end, write_end = os.pipe()
        with os.fdopen(read_end) as r, os.fdopen(write_end, "w") as pipe, open(tmp_path / "log", "w") as log:
            for stream in (pipe, log, io.StringIO()):
                assert not runtime.draws_bars(stream)
                assert isinstance(runtime.progress_bar(total=3, file=stream), runtime.LogProgress)
    finally:
        os.close(controller)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_a_log_gets_a_line_at_most_every_interval_and_at_the_end_never_a_redraw():
    import io

    out, clock = io.StringIO(), Clock()
    bar = runtime.LogProgress(total=100, desc="  run-a", unit="step", leave=True, stream=out, interval=30, clock=clock)
    for _ in range(10):  # ten updates within 30 s: no line yet
        clock.now += 2
        bar.update(5)
        bar.set_postfix(loss="1.234", bits="56")
    assert out.getvalue() == ""
    clock.now += 15  # 35 s since the start
    bar.update(5)
    assert out.getvalue() == "  run-a: 55/100 steps (loss=1.234, bits=56) [0:00:35 elapsed]\n"
    clock.now += 1
    bar.update(45)
    bar.close()  # the end is written once, however soon after the last line
    bar.close()
    assert out.getvalue().splitlines()[1:] == ["  run-a: 100/100 steps (loss=1.234, bits=56) [0:00:36 elapsed]"]
    assert "\r" not in out.getvalue()


def test_a_sweep_in_a_log_writes_each_finished_run_and_a_run_s_steps_no_closing_line():
    import io

    out, clock = io.StringIO(), Clock()
    sweep = runtime.LogProgress(total=3, initial=1, desc="sweep", unit="run", each_update=True, stream=out, clock=clock)
    steps = runtime.LogProgress(total=50, desc="  run-b", unit="step", leave=False, stream=out, clock=clock)
    sweep.set_postfix_str("sweep run-b")
    steps.update(50)
    steps.close()  # a run's step bar (leave=False) writes no closing line
    sweep.update(1)
    sweep.close()  # nothing new since the last line: no second copy
    assert out.getvalue() == "sweep: 2/3 runs (sweep run-b) [0:00:00 elapsed]\n"
    disabled = runtime.LogProgress(total=3, each_update=True, disable=True, stream=out, clock=clock)
    disabled.update(3)
    disabled.close()
    assert out.getvalue().count("\n") == 1
