"""Files an experiment writes and reads back: atomically, named by content, damage set aside.

Every file is written to a temporary name and renamed into place, so an interrupted run
never leaves half a file for the resumed one to read; a full disk is one clear error. A
state file that cannot be read back all the same (damaged outside memk) is set aside
with a one-line warning and its work redone (`read_state`). The output folder itself
(its lock, runs.jsonl, checkpoints) is the run store's (memorize/runs/store.py).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np

from .errors import DiskFull, warn

T = TypeVar("T")
DAMAGED = ".damaged"  # suffix of a state file set aside because it could not be read
LOW_SPACE = 16 * 2**20  # bytes: below this, a failed write is taken for a full disk
TMP_PREFIX = "."  # temporaries are hidden files beside their target: .NAME.tmp-PID


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call write(temporary path), then rename the result onto path."""
    path = Path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        if _disk_full(e, path.parent):
            raise DiskFull(
                f"no space left on the device writing {path}; free some space and run the same command again "
                "(finished runs are kept)"
            ) from e
        raise
    finally:
        tmp.unlink(missing_ok=True)


def _disk_full(error: BaseException, folder: Path) -> bool:
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:
        return shutil.disk_usage(folder).free < LOW_SPACE
    except OSError:
        return False


def remove_temporaries(folder: Path) -> int:
    """Delete what atomic writes killed mid-way left behind (under folder, recursively); how many.
    Only safe while no other process writes there: the run store holds the folder's lock."""
    removed = 0
    for tmp in Path(folder).rglob(f"{TMP_PREFIX}*.tmp-*"):
        tmp.unlink(missing_ok=True)
        removed += 1
    return removed


def read_state(path: Path, load: Callable[[Path], T], what: str, then: str) -> T | None:
    """load(path), or None where there is no file. A file that cannot be read (cut short by a
    kill or a full disk, damaged elsewhere) is set aside as PATH.damaged with a one-line
    warning saying `then` (what happens instead), and None is returned."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        return load(path)
    except Exception as e:  # noqa: BLE001 - any damage (truncated zip, bad JSON, missing key) is handled alike
        aside = set_aside(path)
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
        warn(f"{what} {path} is damaged ({reason[:160]}); set aside as {aside.name}, {then}")
        return None


def split_rows(data: bytes, is_row: Callable[[object], bool]) -> tuple[list[tuple[int, bytes, dict]], list[tuple[int, bytes]]]:
    """A JSON-lines file's bytes as (line number, line, row) for each row and (line number, line) for
    each damaged line: cut short, not UTF-8, not JSON, nested too deep, or not a row (is_row false)."""
    read, damaged = [], []
    for number, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            if not is_row(row):
                raise ValueError("not a row")
            read.append((number, line, row))
        except (ValueError, RecursionError):  # RecursionError: nesting too deep for the JSON decoder
            damaged.append((number, line))
    return read, damaged


def read_rows(path: Path, is_row: Callable[[object], bool], then: str,
              incomplete: Callable[[list[dict]], dict[int, str]] | None = None) -> list[dict]:
    """The rows of a JSON-lines file (one object a line, blank lines skipped), [] where there is none.
    A damaged line - cut short by a kill or a full disk, not UTF-8, not JSON, not a row (is_row
    false), or a row `incomplete` names (index among the rows read -> why) - is appended to
    PATH.damaged (so nothing set aside earlier is lost), the file is rewritten without it, and one
    warning names the lines and says `then` (what happens instead)."""
    path = Path(path)
    if not path.exists():
        return []
    read, damaged = split_rows(path.read_bytes(), is_row)
    reasons = incomplete([row for _, _, row in read]) if incomplete is not None else {}
    damaged += [(number, line) for i, (number, line, _) in enumerate(read) if i in reasons]
    rows = [row for i, (_, _, row) in enumerate(read) if i not in reasons]
    if damaged:
        damaged.sort()
        aside = path.with_name(path.name + DAMAGED)
        with open(aside, "ab") as f:  # bytes as they were: a line that is not UTF-8 is kept too
            f.writelines(line + b"\n" for _, line in damaged)
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
        lines = ", ".join(str(n) for n, _ in damaged)
        why = f" ({'; '.join(reasons[i] for i in sorted(reasons))})" if reasons else ""
        warn(f"{path} line {lines} is damaged{why}; set aside in {aside.name}, {then}")
    return rows


def set_aside(path: Path, suffix: str = DAMAGED) -> Path:
    """Move path out of the way as PATH + suffix (kept for a person to look at); the new path."""
    aside = path.with_name(path.name + suffix)
    os.replace(path, aside)
    return aside


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


def content_digest(obj) -> str:
    """8 hex digits of SHA-1 over obj as canonical JSON: names that change whenever what they name does."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:8]


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")
