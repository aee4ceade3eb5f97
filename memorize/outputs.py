"""An experiment's output folder: atomic writes, the run lock, and runs.jsonl.

Every file is written to a temporary name and renamed into place, so an interrupted run
never leaves half a file for the resumed one to read.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .errors import ConfigError


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call write(temporary path), then rename the result onto path."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)


def atomic_write_npz(path: Path, **arrays: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object, so numpy does not append ".npz" to the temporary name
            np.savez(f, **arrays)

    atomic_write(path, write)


def prepare_output_dir(out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    try:
        (out_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"cannot write to output folder {str(out_dir)!r} ({e.strerror}); choose another with --out") from e
    return out_dir


def lock_output_dir(out_dir: Path):
    """Hold an exclusive lock on the folder for this process: two runs writing one folder would clobber it."""
    import fcntl

    handle = open(out_dir / ".lock", "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise ConfigError(f"another memk run is writing to {str(out_dir)!r}; wait for it to finish or choose another --out")
    return handle


@contextlib.contextmanager
def output_dir(out_dir: Path) -> Iterator[Path]:
    """The folder, created, checked writable and locked for as long as the block runs."""
    out_dir = prepare_output_dir(out_dir)
    lock = lock_output_dir(out_dir)
    try:
        yield out_dir
    finally:
        lock.close()


def load_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_rows(path: Path, rows: list[dict]) -> None:
    """runs.jsonl, rewritten whole and atomically after each finished run."""
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
