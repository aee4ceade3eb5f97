"""The run store: an experiment's output folder, owned by one process at a time.

It holds the lock (two runs writing one folder would clobber it), the experiment's kind
(a run-generalization never writes into a run-capacity folder), runs.jsonl (one row per
finished run, rewritten atomically as each finishes, so a kill loses no finished run),
the checkpoints of runs in progress (removed as each run finishes), failures.json (runs an
executor gave up on, with their errors, until they succeed), packing.json (how executors
planned each run to train, which a rerun keeps), and the provenance every row carries. Resuming is asking it which runs are still to do: failed runs are among them, so
a rerun retries them. A damaged row is set aside with a warning and its run redone;
temporaries a kill left are removed. A start refused before any work was saved leaves
no folder behind.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Iterable, Protocol

import torch

from .errors import ConfigError
from .outputs import atomic_write_json, atomic_write_text, read_rows, read_state, remove_temporaries
from .runtime import Backends

ROWS = "runs.jsonl"
CHECKPOINTS = "checkpoints"
EXPERIMENT = "experiment.json"
FAILURES = "failures.json"
# How each planned run trains (which job, how many slots, threads): executors record it before training,
# so a rerun resumes a run in the same packing and arithmetic (memorize/ensemble_executor.py).
PACKING = "packing.json"


class PlannedRun(Protocol):
    run_id: str
    legacy_run_id: str
    backends: Backends


def provenance(backends: Backends, device: torch.device, trained_as: str = "alone") -> dict:
    """Where and with what a run was trained: the last keys of its row. trained_as: "alone", or
    "ensemble of K" (K slots: float32 rounding differs a little between the two)."""
    return {
        "device": str(device),
        "trained_as": trained_as,
        "attention_backend": backends.attention,
        "logprob_backend": backends.logprob,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads() if device.type == "cpu" else None,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def lock_folder(folder: Path):
    """Hold an output folder's lock until the returned file is closed (`with lock_folder(out):`): two memk
    processes writing one folder would clobber or set aside each other's files. ConfigError where
    another process holds it; the system releases it when the process ends, however it ends."""
    import fcntl

    handle = open(Path(folder) / ".lock", "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise ConfigError(
            f"another memk run is writing to {str(folder)!r}; wait for it to finish or choose another --out"
        )
    return handle


def is_run_row(row) -> bool:
    """A line of runs.jsonl that can be a run's row: an object with a string run_id."""
    return isinstance(row, dict) and isinstance(row.get("run_id"), str)


def _lacking_fields(rows: list[dict]) -> dict[int, str]:
    """Rows that lack a field every other row has (an edit, another writer), by index: they would end
    a summary in KeyError. The store knows no experiment's fields, so the rows tell; a field several
    rows lack (rows of an earlier memk, from before it was added) is not missing, a lone such row is."""
    has: dict[str, int] = {}
    for row in rows:
        for key in row:
            has[key] = has.get(key, 0) + 1
    out = {}
    for i, row in enumerate(rows):
        missing = [key for key, count in has.items() if count == len(rows) - 1 and key not in row]
        if missing:
            out[i] = f"it lacks {', '.join(map(repr, missing))}, which the other rows have"
    return out


def _kind_of(experiment: dict) -> str | None:
    """The experiment an experiment.json describes; files from before the kind was written are told by their keys."""
    if "experiment" in experiment:
        return experiment["experiment"]
    if "source" in experiment:
        return "generalization"
    if "precisions" in experiment:
        return "capacity"
    return None


class RunStore:
    """Use as `with RunStore(folder, "capacity") as store:`; the folder is created, checked and locked."""

    def __init__(self, folder: Path, experiment: str):
        self.folder = Path(folder)
        self.experiment = experiment
        self.rows: list[dict] = []
        self._index: dict[str, dict] = {}
        self._index_size = -1  # len(self.rows) when _index was built
        self.failures: dict[str, dict] = {}  # run_id -> what record_failure was told
        self._lock = None
        self._writing = threading.Lock()  # jobs training side by side (memorize/workers.py) record rows

    def __enter__(self) -> RunStore:
        self._prepare()
        self._lock = lock_folder(self.folder)
        try:
            self._check_kind()
            remove_temporaries(self.folder)  # ours alone to remove: we hold the lock
            self.rows = self._load_rows()
            failures = self.read_json(FAILURES, then="and the failures it listed are forgotten")
            self.failures = failures if isinstance(failures, dict) else {}
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self._lock is not None:
            try:
                (self.folder / CHECKPOINTS).rmdir()  # only when empty: no run left in progress
            except OSError:
                pass
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

    def _check_kind(self) -> None:
        found = read_state(self.folder / EXPERIMENT, lambda p: json.loads(p.read_text()), "experiment file",
                           "and it is written anew")
        kind = _kind_of(found) if isinstance(found, dict) else None
        if kind is not None and kind != self.experiment:
            raise ConfigError(
                f"{str(self.folder)!r} holds a run-{kind} experiment; give run-{self.experiment} another --out"
            )

    def _load_rows(self) -> list[dict]:
        return read_rows(self.folder / ROWS, is_run_row, "and its run is done again", incomplete=_lacking_fields)

    def _write_rows(self, rows: list[dict]) -> None:
        atomic_write_text(self.folder / ROWS, "".join(json.dumps(r) + "\n" for r in rows))

    def path(self, name: str) -> Path:
        return self.folder / name

    def write_experiment(self, description: dict) -> None:
        atomic_write_json(self.folder / EXPERIMENT, {"experiment": self.experiment, **description})

    def write_json(self, name: str, obj) -> None:
        atomic_write_json(self.folder / name, obj)

    def read_json(self, name: str, then: str = "and it is made again"):
        """The JSON file `name` of the folder; None where there is none or it is damaged (set aside)."""
        return read_state(self.folder / name, lambda p: json.loads(p.read_text()), "state file", then)

    def packing(self) -> dict[str, dict]:
        """What executors recorded of how each run trains, by run id (record_packing); {} where nothing is."""
        found = self.read_json(PACKING, then="and its runs are packed anew")
        return {k: v for k, v in found.items() if isinstance(v, dict)} if isinstance(found, dict) else {}

    def record_packing(self, entries: dict[str, dict]) -> None:
        """Add (or replace) how these runs train, by run id, before they train."""
        if entries:
            with self._writing:
                self.write_json(PACKING, {**self.packing(), **entries})

    def checkpoint_path(self, name: str) -> Path:
        return self.folder / CHECKPOINTS / f"{name}.pt"

    def row_of(self, run: PlannedRun) -> dict | None:
        """The finished row of this run: by its id, or by the id memk gave it before the
        backends were part of ids, where the row records the same backends."""
        by_id = self._by_id()
        row = by_id.get(run.run_id)
        if row is None:
            legacy = by_id.get(run.legacy_run_id)
            if legacy is not None and (legacy.get("attention_backend"), legacy.get("logprob_backend")) == tuple(
                run.backends
            ):
                row = legacy
        return row

    def _by_id(self) -> dict[str, dict]:
        # Rebuilt only when rows were added since: a sweep looks up every planned run.
        if self._index_size != len(self.rows):
            self._index = {r["run_id"]: r for r in self.rows}
            self._index_size = len(self.rows)
        return self._index

    def todo(self, runs: Iterable[PlannedRun]) -> list[PlannedRun]:
        """The runs not finished yet, in plan order."""
        return [r for r in runs if self.row_of(r) is None]

    def rows_of(self, runs: Iterable[PlannedRun]) -> list[dict]:
        """The finished rows of these runs, in plan order (rows of other plans are kept, not used):
        a summary must not depend on which executor finished which run first."""
        return [row for row in map(self.row_of, runs) if row is not None]

    def record(self, row: dict) -> None:
        """Add a finished run's row (runs.jsonl rewritten whole and atomically), then drop its checkpoint
        and any failure of an earlier try."""
        with self._writing:
            self.rows.append(row)
            self._write_rows(self.rows)
            self.checkpoint_path(row["run_id"]).unlink(missing_ok=True)
            if self.failures.pop(row["run_id"], None) is not None:
                self.write_json(FAILURES, self.failures)

    def record_failure(self, run: PlannedRun, error: str, attempts: int) -> None:
        """Note a run an executor gave up on (its checkpoint is kept: a rerun retries it from there)."""
        with self._writing:
            self.failures[run.run_id] = {
                "run_id": run.run_id, "error": error, "attempts": attempts,
                "failed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            self.write_json(FAILURES, self.failures)

    def failures_of(self, runs: Iterable[PlannedRun]) -> list[dict]:
        """The recorded failures of these runs that have no row since, in plan order: what summaries list."""
        return [self.failures[r.run_id] for r in runs if r.run_id in self.failures and self.row_of(r) is None]
