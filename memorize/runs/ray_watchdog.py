"""Ends the Ray instance a memk command started when that command ends, however it ends (kill -9 too).

Ray's head processes share the fate of the driver that started them, but the agents its raylet
starts (DashboardAgent, RuntimeEnvAgent) outlive a driver killed with kill -9, for minutes.
memk marks the instance it starts with an environment variable (MARKER: the processes ray.init
starts, and the workers, inherit it; the raylet starts its agents with an environment of their
own) and starts this script beside it, reading a pipe only memk holds open: the pipe's end is
memk's end. While memk lives, the script notes every marked process and its descendants twice
a second (the agents among them); at memk's end, it sends each still running (the same
process: its start time checked) SIGTERM, and SIGKILL after GRACE_S. Where memk ended
normally Ray has shut itself down and nothing is left.

A script of its own, run by path with nothing but the standard library: it must not import torch
or memk to do its one job. Linux only (it reads /proc).
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time

MARKER = "MEMK_RAY_OWNER"
GRACE_S = 3.0  # between SIGTERM and SIGKILL
NOTE_EVERY_S = 0.5  # how often the instance's processes are noted while memk lives


def processes() -> dict[int, tuple[int, int]]:
    """Every process: pid -> (parent pid, start time in clock ticks since boot), from /proc/PID/stat."""
    found = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()  # after "(command)", which may hold spaces
                found[int(name)] = (int(fields[1]), int(fields[19]))
            except (OSError, IndexError, ValueError):  # gone meanwhile
                continue
    return found


def marked(pid: int, mark: str) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f"{MARKER}={mark}".encode() in f.read().split(b"\0")
    except OSError:  # gone meanwhile, or another user's
        return False


def instance(mark: str, table: dict[int, tuple[int, int]] | None = None) -> dict[int, int]:
    """The marked processes and all their descendants (this one excepted): pid -> start time."""
    table = processes() if table is None else table
    found = {pid: start for pid, (_, start) in table.items() if pid != os.getpid() and marked(pid, mark)}
    frontier = list(found)
    while frontier:
        parents = set(frontier)
        frontier = [pid for pid, (parent, _) in table.items() if parent in parents and pid not in found]
        found.update((pid, table[pid][1]) for pid in frontier)
    return found


def still_running(known: dict[int, int]) -> list[int]:
    """Those of `known` still running as the same process (the start time rules out a reused pid)."""
    table = processes()
    return [pid for pid, start in known.items() if pid in table and table[pid][1] == start]


def end(known: dict[int, int], grace_s: float = GRACE_S) -> None:
    """SIGTERM to each of `known` still running, then SIGKILL to those left after grace_s."""
    for pid in still_running(known):
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and still_running(known):
        time.sleep(0.1)
    for pid in still_running(known):
        _signal(pid, signal.SIGKILL)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except OSError:  # already gone
        pass


def main() -> None:
    mark = sys.argv[1]
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C meant for memk: its end closes the pipe anyway
    known: dict[int, int] = {}
    pipe = sys.stdin.fileno()
    while True:
        readable, _, _ = select.select([pipe], [], [], NOTE_EVERY_S)
        if readable and not os.read(pipe, 4096):  # b"": memk's end of the pipe closed, memk ended
            break
        known.update(instance(mark))
    known.update(instance(mark))
    end(known)


if __name__ == "__main__":
    main()
