"""The audit's output folder and its samples.jsonl, the rows an audit resumes from: the folder checked before any
model loads, each row appended whole as it is coded, under a key; an earlier run's rows under the same key kept.

Resume: each row of samples.jsonl is written (appended whole, fsynced) as soon as its sample is
coded, under a key over the models' identities (their spec and the content of their files; an
adapter's and its base's) and every setting that changes a number; a re-run with the same key
keeps the rows of texts it still has and codes the rest (none: it only writes the summary again).
Rows under another key are never mixed in: that file is set aside under a name of its own. A
damaged row is set aside and its sample coded again. The output folder is locked while an audit
writes it, as a sweep's is (memorize/runs/store.py's lock_folder, which audit.py holds).

A refused start (a model that does not load, an interrupt before any row) removes the output
folders it created while they are still empty.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from pathlib import Path

from .scoring_model import ScoringModel
from ..errors import ConfigError, warn
from ..outputs import atomic_write_text, content_digest, read_rows, set_aside

FORMAT_VERSION = 2  # 2: rows carry "extraction" (and, with several references, "references")
SETS = ("member", "non-member")
SAMPLES = "samples.jsonl"
NUMBER = (int, float)
# The fields of a row of samples.jsonl and their JSON types: a row of this audit lacking one is damaged.
ROW_FIELDS = {"set": str, "index": int, "sha1": str, "chars": int, "bytes": int, "zlib_bits": NUMBER,
              "model_tokens": int, "model_bits": NUMBER, "reference_tokens": (int, type(None)),
              "reference_bits": (*NUMBER, type(None)), "mem_u_bits": (*NUMBER, type(None)), "attacks": dict,
              "extraction": (dict, type(None)), "text": str}


def prepare_output(out: Path) -> Path:
    """Create the output folder and check it takes files, before any model loads."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".memk-write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"output folder {out} is not writable ({e.strerror or e}); choose another --out") from None
    return out


def new_folders(out: Path | None) -> list[Path]:
    """The folders creating `out` will make (out and any missing parents), innermost first."""
    new = []
    folder = None if out is None else Path(out).expanduser().absolute()
    while folder is not None and not folder.exists() and folder != folder.parent:
        new.append(folder)
        folder = folder.parent
    return new


def remove_if_empty(folders: list[Path]) -> None:
    """A refused start leaves no folder it made: each of them still empty is removed, innermost first."""
    for folder in folders:
        try:
            folder.rmdir()  # only if empty: rows written, or another process's files, keep it
        except OSError:
            return


def audit_key(model: ScoringModel, references: list[ScoringModel], settings: dict) -> str:
    """What every number of a row depends on: the models' identities and the settings."""
    refs = [r.fingerprint for r in references]
    return content_digest([FORMAT_VERSION, model.fingerprint, refs[0] if len(refs) == 1 else refs or None, settings])


def text_sha1(text: str) -> str:
    """A row's "sha1": the SHA-1 of the text's UTF-8 bytes (a row is kept only for the same text)."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def _is_row(row, key: str) -> bool:
    """A row of samples.jsonl: of another audit (any key but ours: its file is set aside whole), or of
    this one with every field, of its type."""
    if not isinstance(row, dict) or not isinstance(row.get("key"), str):
        return False
    if row["key"] != key:
        return True
    return (all(isinstance(row.get(name), kind) for name, kind in ROW_FIELDS.items()) and row["set"] in SETS
            and all(isinstance(score, NUMBER) for score in row["attacks"].values()))


def load_rows(path: Path, key: str, wanted: dict[tuple[str, int], str]) -> list[dict]:
    """The rows of an earlier run of this audit still valid. A damaged row (the cut-off last line of a
    killed run, an edit) is set aside and its sample coded again; another audit's file is set aside."""
    if not path.exists():
        return []
    rows = read_rows(path, lambda row: _is_row(row, key), "and its sample is coded again")
    if any(row["key"] != key for row in rows):
        aside = _set_aside_other(path)
        warn(f"{path} holds an audit of other models or settings; set aside as {aside.name}, starting over")
        return []
    unique = {(r["set"], r["index"]): r for r in rows if wanted.get((r["set"], r["index"])) == r["sha1"]}
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in unique.values()))  # only the rows still wanted
    return list(unique.values())


def _set_aside_other(path: Path) -> Path:
    """samples.jsonl moved to samples.jsonl.other-DATE, or -DATE-2, -3, ... where audits set aside within
    one second would take the same name: none overwrites another (no race: we hold the folder's lock)."""
    stamp = f".other-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    suffix, n = stamp, 1
    while path.with_name(path.name + suffix).exists():
        n += 1
        suffix = f"{stamp}-{n}"
    return set_aside(path, suffix)


def append_rows(path: Path, rows: list[dict]) -> None:
    """The rows appended to samples.jsonl as whole lines in one write, fsynced: a kill leaves at most one cut line."""
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))  # whole lines in one write
        f.flush()
        os.fsync(f.fileno())
