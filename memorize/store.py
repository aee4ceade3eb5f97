"""The run store: an experiment's output folder, owned by one process at a time.

It holds the lock (two runs writing one folder would clobber it), runs.jsonl (one row
per finished run, rewritten atomically as each finishes, so a kill loses no finished
run), the checkpoints of runs in progress (removed as each run finishes), and the
provenance every row carries. Resuming is asking it which runs are still to do.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterable, Protocol

import torch

from .errors import ConfigError
from .outputs import atomic_write_json, atomic_write_text
from .runtime import Backends

ROWS = "runs.jsonl"
CHECKPOINTS = "checkpoints"


class Identified(Protocol):
    run_id: str


def provenance(backends: Backends, device: torch.device) -> dict:
    """Where and with what a run was trained: the last keys of its row."""
    return {
        "device": str(device),
        "attention_backend": backends.attention,
        "logprob_backend": backends.logprob,
        "torch": torch.__version__,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


class RunStore:
    """Use as `with RunStore(folder) as store:`; the folder is created, checked and locked."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.rows: list[dict] = []
        self._lock = None

    def __enter__(self) -> RunStore:
        self._prepare()
        self._lock = self._acquire_lock()
        self.rows = self._load_rows()
        return self

    def __exit__(self, *exc) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _prepare(self) -> None:
        try:
            (self.folder / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
            probe = self.folder / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise ConfigError(
                f"cannot write to output folder {str(self.folder)!r} ({e.strerror}); choose another with --out"
            ) from e

    def _acquire_lock(self):
        import fcntl

        handle = open(self.folder / ".lock", "w")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise ConfigError(
                f"another memk run is writing to {str(self.folder)!r}; wait for it to finish or choose another --out"
            )
        return handle

    def _load_rows(self) -> list[dict]:
        path = self.folder / ROWS
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def path(self, name: str) -> Path:
        return self.folder / name

    def write_json(self, name: str, obj) -> None:
        atomic_write_json(self.folder / name, obj)

    def read_json(self, name: str):
        """The JSON file `name` of the folder, or None where there is none."""
        path = self.folder / name
        return json.loads(path.read_text()) if path.exists() else None

    def checkpoint_path(self, name: str) -> Path:
        return self.folder / CHECKPOINTS / f"{name}.pt"

    def finished_ids(self) -> set[str]:
        return {r["run_id"] for r in self.rows}

    def todo(self, runs: Iterable[Identified]) -> list[Identified]:
        """The runs not finished yet, in plan order."""
        done = self.finished_ids()
        return [r for r in runs if r.run_id not in done]

    def rows_of(self, runs: Iterable[Identified]) -> list[dict]:
        """The finished rows of these runs, in the order they finished (rows of other plans are kept, not used)."""
        wanted = {r.run_id for r in runs}
        return [r for r in self.rows if r["run_id"] in wanted]

    def record(self, row: dict) -> None:
        """Add a finished run's row (runs.jsonl rewritten whole and atomically), then drop its checkpoint."""
        self.rows.append(row)
        atomic_write_text(self.folder / ROWS, "".join(json.dumps(r) + "\n" for r in self.rows))
        self.checkpoint_path(row["run_id"]).unlink(missing_ok=True)
