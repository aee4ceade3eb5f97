"""The run store: an experiment's output folder, owned by one process at a time.

It holds the lock while a command writes it (two runs writing one folder would clobber it;
the lock's file is removed as the command ends), the experiment's kind
(a run-generalization never writes into a run-capacity folder), runs.jsonl (one row per
finished run, rewritten atomically as each finishes, so a kill loses no finished run),
the checkpoints of runs in progress (removed as each run finishes), failures.json (runs an
executor gave up on, with their errors, until they succeed), packing.json (how executors
planned each run to train, which a rerun keeps), and the provenance every row carries.
Resuming is asking it which runs are still to do: failed runs are among them, so a rerun
retries them. A damaged row is set aside with a warning and its run redone;
temporaries a kill left are removed. A start refused before any work was saved leaves
no folder behind.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Iterable, Protocol, runtime_checkable

import torch

from ..errors import ConfigError
from ..outputs import atomic_write_json, atomic_write_text, read_rows, read_state, remove_temporaries
from ..runtime import Backends

ROWS = "runs.jsonl"
CHECKPOINTS = "checkpoints"
EXPERIMENT = "experiment.json"
FAILURES = "failures.json"
# How each planned run trains (which job, how many slots, threads): executors record it before training,
# so a rerun resumes a run in the same packing and arithmetic (memorize/runs/packing.py).
PACKING = "packing.json"


class PlannedRun(Protocol):
    run_id: str
    legacy_run_id: str
    backends: Backends


@runtime_checkable
class JobStore(Protocol):
    """What training a job needs of a store, wherever the job trains: `RunStore` in this process,
    ray_executor.TaskStore in a Ray task (which hands its rows back to the driver's RunStore)."""

    def checkpoint_path(self, name: str) -> Path:
        """Where run `name` (its run_id) checkpoints; a job resumes from the file found there."""

    def record(self, row: dict) -> None:
        """Keep a finished run's row (and drop its checkpoint)."""


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


LOCK = ".lock"
LOCK_TRIES = 100  # times lock_folder takes a lock file its holder removed at once, before giving up


class FolderLock:
    """An output folder's lock (lock_folder): the file .lock, flocked, held until close() or the end of
    `with`. Released, the file is removed (no run leaves it behind): unlinked while still locked, so a
    process that opened the old file meanwhile finds it gone once it gets the lock, and takes the new one."""

    def __init__(self, folder: Path):
        import fcntl

        self.folder = Path(folder)
        self.path = self.folder / LOCK
        self._fd: int | None = None
        for _ in range(LOCK_TRIES):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise ConfigError(
                    f"cannot lock output folder {str(self.folder)!r} ({e.strerror}); choose another with --out"
                ) from e
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self._held_elsewhere() from None
            except BaseException:
                os.close(fd)
                raise
            if self._still_at_path(fd):
                self._fd = fd
                return
            os.close(fd)  # its holder removed it as it let go: that lock guards nothing; take the new file's
        raise self._held_elsewhere()

    def _still_at_path(self, fd: int) -> bool:
        try:
            return os.path.samestat(os.fstat(fd), os.stat(self.path))
        except FileNotFoundError:
            return False

    def _held_elsewhere(self) -> ConfigError:
        return ConfigError(
            f"another memk run is writing to {str(self.folder)!r}; wait for it to finish or choose another --out"
        )

    def close(self) -> None:
        """Release the lock and remove its file (a no-op once released)."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # still locked: see the class's docstring
        except OSError:
            pass  # a read-only folder keeps its lock file; the lock is released all the same
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def lock_folder(folder: Path) -> FolderLock:
    """Hold an output folder's lock until the returned lock is closed (`with lock_folder(out):`): two memk
    processes writing one folder would clobber or set aside each other's files. ConfigError where
    another process holds it; the system releases it when the process ends, however it ends, and the
    next process takes it. Released by close(), the lock's file is removed."""
    return FolderLock(folder)


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
    """Use as `with RunStore(folder, "capacity") as store:`; the folder is created, checked and locked,
    and unlocked (its lock file removed) at the end, however it ends.

    A start that fails before the folder holds any work (a refused start: a corpus too small, a
    backend that cannot run here) leaves nothing behind: a folder this store created is removed with
    the parent folders it created. Work is a recorded row or failure, a checkpoint, or whatever the
    experiment says is worth keeping by calling keep() (e.g. a trained reference model)."""

    def __init__(self, folder: Path, experiment: str):
        self.folder = Path(folder)
        self.experiment = experiment
        self.rows: list[dict] = []
        self._index: dict[str, dict] = {}
        self._index_size = -1  # len(self.rows) when _index was built
        self.failures: dict[str, dict] = {}  # run_id -> what record_failure was told
        self._lock: FolderLock | None = None
        self._writing = threading.Lock()  # jobs training side by side (memorize/runs/workers.py) record rows
        self._created: Path | None = None  # the topmost folder _prepare created, where it created the folder
        self._kept = False

    def __enter__(self) -> RunStore:
        self._prepare()
        try:
            self._lock = lock_folder(self.folder)
        except BaseException:
            self._remove_created()
            raise
        try:
            self._check_kind()
            remove_temporaries(self.folder)  # ours alone to remove: we hold the lock
            self.rows = self._load_rows()
            self._drop_finished_checkpoints()
            failures = self.read_json(FAILURES, then="and the failures it listed are forgotten")
            self.failures = failures if isinstance(failures, dict) else {}
        except BaseException as e:
            self.__exit__(type(e), e, e.__traceback__)
            raise
        return self

    def __exit__(self, exc_type=None, exc=None, tb=None) -> None:
        if self._lock is None:
            return
        discard = exc_type is not None and self._created is not None and not self._holds_work()
        try:
            if discard:  # our own files (not .lock, released below): the folder is removed once unlocked
                for entry in self.folder.iterdir():
                    if entry.name == LOCK:
                        continue
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry)
                    else:
                        entry.unlink()
            else:
                try:
                    (self.folder / CHECKPOINTS).rmdir()  # only when empty: no run left in progress
                except OSError:
                    pass
        except OSError:
            discard = False  # what could not be removed stays, and so does the folder
        finally:
            self._lock.close()
            self._lock = None
        if discard:
            self._remove_created()

    def keep(self) -> None:
        """The folder holds work from here on (e.g. a trained reference): a failure no longer removes it."""
        self._kept = True

    def _holds_work(self) -> bool:
        if self._kept or self.rows or self.failures:
            return True
        checkpoints = self.folder / CHECKPOINTS
        return checkpoints.is_dir() and any(checkpoints.iterdir())

    def _remove_created(self) -> None:
        """Remove the folders _prepare created, where they are empty (nothing of another process's)."""
        if self._created is None:
            return
        folder = self.folder
        for candidate in (folder / CHECKPOINTS, folder, *folder.parents):
            try:
                candidate.rmdir()
            except FileNotFoundError:
                pass
            except OSError:
                break
            if candidate == self._created:
                break
        self._created = None

    def _prepare(self) -> None:
        top = next((p for p in (self.folder, *self.folder.parents) if p.exists()), None)
        try:
            try:
                self.folder.mkdir(parents=True)
                # The topmost folder made: the one below the nearest that existed.
                self._created = next(p for p in (self.folder, *self.folder.parents) if p.parent == top)
            except FileExistsError:
                if not self.folder.is_dir():
                    raise
            (self.folder / CHECKPOINTS).mkdir(exist_ok=True)
            probe = self.folder / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            self._remove_created()
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

    def _drop_finished_checkpoints(self) -> None:
        """Remove the checkpoint of every run with a row: one killed between record's two writes
        (its row, then its checkpoint's removal) leaves it, and nothing would ever read it again."""
        for row in self.rows:
            if isinstance(row.get("run_id"), str):
                self.checkpoint_path(row["run_id"]).unlink(missing_ok=True)

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
