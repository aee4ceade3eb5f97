"""The texts of one set of `memk audit` (members, non-members, DC-PDD's frequency text), read from a text file
(one sample a line), JSON lines or a Hugging Face dataset; bad input is a ConfigError naming the fix."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError


def read_texts(source: str, column: str | None = None, split: str = "train", what: str = "members") -> list[str]:
    """The texts of one set: a text file (one sample per line, blank lines skipped), a JSON-lines
    file (.jsonl/.json; the --column field, default "text"), or a Hugging Face dataset (a
    save_to_disk folder or a Hub name; the --column column of --split)."""
    flag = f"--{what}"
    path = Path(source).expanduser()
    if path.is_dir():
        return _dataset_texts(str(path), split, column, flag)
    if not path.exists():
        if source.startswith(("/", ".", "~")) or source.count("/") > 1 or source.endswith((".txt", ".jsonl", ".json")):
            raise ConfigError(f"{flag} {source}: no such file; give a text or JSON-lines file, or a dataset")
        return _dataset_texts(source, split, column, flag)
    try:
        raw = path.read_bytes().decode("utf-8")  # no newline translation: a lone "\r" is no line break
    except UnicodeDecodeError as e:
        raise ConfigError(f"{flag} {source}: not UTF-8 ({e.reason} at byte {e.start}); re-encode it as UTF-8") from None
    except OSError as e:
        raise ConfigError(f"{flag} {source}: cannot read it ({e.strerror or e})") from None
    if path.suffix in (".jsonl", ".json"):
        texts = _jsonl_texts(raw, column or "text", flag, source)
    else:
        if column is not None:
            raise ConfigError(f"{flag} {source} is a text file (one sample per line); --column needs .jsonl or a dataset")
        texts = [line for line in _lines(raw) if line.strip()]
    if not texts:
        raise ConfigError(f"{flag} {source} holds no texts; give a file with one sample per line (or JSON lines)")
    return texts


def _lines(raw: str) -> list[str]:
    """A file's lines: split at "\n" alone (a trailing "\r" dropped). str.splitlines also breaks at form
    feeds, U+0085 and U+2028, which a sample (and a JSON string) may hold."""
    return [line[:-1] if line.endswith("\r") else line for line in raw.split("\n")]


def _jsonl_texts(raw: str, column: str, flag: str, source: str) -> list[str]:
    texts = []
    for number, line in enumerate(_lines(raw), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{flag} {source} line {number} is not JSON ({e.msg}); give one JSON object a line") from None
        if not isinstance(row, dict) or column not in row:
            keys = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise ConfigError(f"{flag} {source} line {number} has no column {column!r} (it has {keys}); pick one with --column")
        if not isinstance(row[column], str):
            raise ConfigError(f"{flag} {source} line {number}: column {column!r} is not text; pick a text column")
        if row[column].strip():
            texts.append(row[column])
    return texts


def _dataset_texts(name: str, split: str, column: str | None, flag: str) -> list[str]:
    from ..corpus import hf_dataset_documents

    return hf_dataset_documents(name, split, column or "text", flags=(flag, "--split", "--column"), extra="audit")
