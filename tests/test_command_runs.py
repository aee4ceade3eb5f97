"""bench/command_runs.py: what the wall-clock scripts share; here, the busy loops that stand for
another user's work on a shared machine (python -m memk.bench.preset_wall --busy N)."""

import os
import time

from memk.bench.command_runs import busy_loops


def cpu_seconds(pid: int) -> float:
    """The CPU time a process has used (utime + stime of /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_busy_loops_spin_on_the_cpu_while_the_block_runs_and_are_gone_after():
    with busy_loops(2) as loops:
        assert len(loops) == 2 and all(loop.poll() is None for loop in loops)
        # Spinning, each goes on using CPU time (a loop that slept would stop at its start-up's
        # share); waited for, not timed: on a loaded machine they get the CPU late.
        deadline = time.monotonic() + 60
        while min(cpu_seconds(loop.pid) for loop in loops) < 0.5 and time.monotonic() < deadline:
            time.sleep(0.1)
        used = [cpu_seconds(loop.pid) for loop in loops]
        assert all(loop.poll() is None for loop in loops)
    assert all(seconds >= 0.5 for seconds in used), used
    assert all(loop.returncode is not None for loop in loops)


def test_no_busy_loops_for_zero():
    with busy_loops(0) as loops:
        assert loops == []
