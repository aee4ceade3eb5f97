"""memorize/runs/ray_watchdog.py: a Ray instance memk started ends with memk, even killed with kill -9."""

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

OUTSIDE = tempfile.gettempdir()  # `python -m` puts the working directory on sys.path: not the checkout


def descendants(root: int) -> dict[int, tuple[int, str]]:
    """The processes below `root` in the process tree: pid -> (start time, name), read from /proc."""
    table = {}
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{name}/stat").read_bytes()
            command = stat[stat.index(b"(") + 1:stat.rindex(b")")].decode(errors="replace")
            fields = stat[stat.rindex(b")") + 1:].split()
            cmdline = Path(f"/proc/{name}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            table[int(name)] = (int(fields[1]), int(fields[19]), cmdline or command)
        except (OSError, ValueError, IndexError):
            continue
    found, frontier = {}, [root]
    while frontier:
        parents = set(frontier)
        frontier = [pid for pid, (parent, _, _) in table.items() if parent in parents and pid not in found]
        found.update((pid, table[pid][1:]) for pid in frontier)
    return found


def still_running(processes: dict[int, tuple[int, str]]) -> list[str]:
    left = []
    for pid, (start, name) in processes.items():
        try:
            if int(Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[19]) == start:
                left.append(name)
        except (OSError, ValueError, IndexError):
            continue
    return left


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the watchdog reads /proc")
def test_a_ray_instance_memk_started_ends_when_memk_is_killed_with_kill_9():
    # Ray's head processes die with their driver; its raylet's agents (DashboardAgent, RuntimeEnvAgent)
    # outlived a kill -9 by minutes before the watchdog.
    pytest.importorskip("ray")
    script = ("import ray, time; from memk.memorize.runs.ray_executor import connect; connect(ray, 'local'); "
              "print('ready', flush=True); time.sleep(300)")
    driver = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              cwd=OUTSIDE, text=True)
    try:
        assert driver.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the raylet starts its agents a moment after ray.init returns
            started = descendants(driver.pid)
            if any("Agent" in name for _, name in started.values()):
                break
            time.sleep(0.5)
        time.sleep(1.0)  # the watchdog notes the instance's processes twice a second
        assert any("raylet" in name for _, name in started.values()), started
    finally:
        driver.kill()
        driver.wait()
    deadline = time.monotonic() + 20
    while still_running(started) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert still_running(started) == []
