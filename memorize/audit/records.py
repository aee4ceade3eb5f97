"""What an audit records for a pipeline (issue 24 §5): samples.csv, and audit.json's provenance
(memk's version and commit, each model's identity, the data's digests) and timings.

samples.csv: one row per sample, in samples.jsonl's order, every scalar field of its row as a
column (a nested field as FIELD.NAME, the attacks' scores as attack.NAME; an absent value, e.g.
the ReCaLL score of a non-member of its prefix, an empty cell), the resume key left out and the
text last. RFC 4180 quoting (Python's csv, QUOTE_MINIMAL): a text with commas, quotes or line
breaks is one quoted cell. Nothing is escaped for spreadsheets: a text starting with = + - @ is
written as it is, so open the file as data, not as formulas.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path

from ..outputs import atomic_write_text

SAMPLES_CSV = "samples.csv"
LEFT_OUT = ("key", "text")


def write_samples_csv(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, samples_csv(rows))


def samples_csv(rows: list[dict]) -> str:
    flat = [_flatten(r) for r in rows]
    columns: list[str] = []
    seen = set()
    for r in flat:
        for name in r:
            if name not in seen:
                seen.add(name)
                columns.append(name)
    # A field that is a dict in some rows and null in others (an extraction cell of a text too short): its
    # sub-columns only, empty in the null rows.
    columns = [c for c in columns if not any(other.startswith(c + ".") for other in columns)]
    columns.append("text")
    out = io.StringIO()
    writer = csv.writer(out, quoting=csv.QUOTE_MINIMAL, lineterminator="\r\n")
    writer.writerow(columns)
    for row, r in zip(rows, flat):
        writer.writerow([_cell(r.get(c)) for c in columns[:-1]] + [row.get("text", "")])
    return out.getvalue()


def _flatten(row: dict, prefix: str = "") -> dict:
    out = {}
    for name, value in row.items():
        if not prefix and name in LEFT_OUT:
            continue
        column = f"{prefix}{'attack' if not prefix and name == 'attacks' else name}"
        if isinstance(value, dict):
            out.update(_flatten(value, column + "."))
        else:
            out[column] = value
    return out


def _cell(value):
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)  # every digit: the number round-trips
    if isinstance(value, (list, tuple)):
        return json.dumps(value)
    return value


# --------------------------------------------------------------------------- provenance


def memk_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("memk")
    except PackageNotFoundError:
        return None


def memk_commit() -> dict | None:
    """The commit of the git checkout memk runs from (an editable install), and whether its tracked files
    differ from it; None where memk is not run from its own checkout (a wheel, or no git)."""
    root = Path(__file__).resolve().parents[2]  # the repository root of a checkout: memorize/audit/ is in it

    def git(*args):
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)

    try:
        top = git("rev-parse", "--show-toplevel")
        if top.returncode != 0 or Path(top.stdout.strip()).resolve() != root:
            return None  # not a checkout, or memk installed inside someone else's repository
        head = git("rev-parse", "HEAD")
        status = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return {"commit": head.stdout.strip(), "modified": bool(status.stdout.strip()) if status.returncode == 0 else None}


def file_digest(path: str | None) -> str | None:
    """BLAKE2b (16 bytes) of a file's bytes; None for what is not a file (a dataset name or folder)."""
    if path is None:
        return None
    p = Path(path).expanduser()
    if not p.is_file():
        return None
    digest = hashlib.blake2b(digest_size=16)
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def texts_digest(texts: list[str]) -> str:
    """BLAKE2b (16 bytes) of the texts in order, each as its UTF-8 bytes and its length: what was audited,
    whatever file or dataset it came from."""
    digest = hashlib.blake2b(digest_size=16)
    for t in texts:
        data = t.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def data_record(role: str, texts: list[str] | None, source: str | None) -> dict:
    record = {"role": role, "source": source, "file_blake2b": file_digest(source)}
    if texts is not None:
        record.update(texts=len(texts), texts_blake2b=texts_digest(texts))
    return record


def provenance(models: dict, data: list[dict]) -> dict:
    """audit.json's "provenance": memk's version and commit, the libraries, each model's identity (its
    resume fingerprint: a Hub model's commit, a folder's file digests, a held model's weight sums), the data."""
    import numpy
    import torch

    libraries = {"python": sys.version.split()[0], "torch": torch.__version__, "numpy": numpy.__version__}
    transformers = sys.modules.get("transformers")
    if transformers is not None:
        libraries["transformers"] = transformers.__version__
    peft = sys.modules.get("peft")
    if peft is not None:
        libraries["peft"] = getattr(peft, "__version__", None)
    return {"memk_version": memk_version(), "memk_git": memk_commit(), "libraries": libraries,
            "models": models, "data": data}
