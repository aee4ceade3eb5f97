"""Real text for the generalization experiment: documents, a byte-level BPE tokenizer, fixed-length sequences.

Documents come from Python's own help pages (built in, no download), a UTF-8 text file, or a
Hugging Face dataset. A byte-level BPE tokenizer is trained on them (EOT is id 0 and ends every
document), the token stream is cut into non-overlapping windows, exact duplicate windows are
dropped (a repeated window would count as memorized without being learned once), and a seeded
shuffle holds some windows out for good.

prepare_corpus saves its work in an output folder (tokenizer.json, corpus.npz, corpus.json) and
reloads it when asked the same thing again, so an interrupted run resumes on the identical split.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from .errors import ConfigError
from .outputs import atomic_write, atomic_write_npz

BUILTIN_CORPUS = "python-help"
EOT = "<|endoftext|>"
EOT_ID = 0
# 256 byte symbols (every byte gets a token, so any UTF-8 text round-trips) plus EOT.
MIN_VOCAB_SIZE = 256 + 1
# Bumped when the saved files or the fingerprint change meaning, so old folders are not misread.
FORMAT_VERSION = 1


# --------------------------------------------------------------------------- documents


def builtin_documents() -> list[str]:
    """Python's help pages (pydoc_data.topics, shipped with CPython): one document per topic, sorted by key."""
    try:
        from pydoc_data.topics import topics
    except ImportError as e:
        raise ConfigError(
            f"the built-in corpus '{BUILTIN_CORPUS}' needs Python's pydoc_data package, which this Python "
            f"lacks ({e}); pass --text PATH or --hf-dataset NAME to use other text"
        ) from None
    return [topics[key] for key in sorted(topics)]


def text_file_documents(path) -> list[str]:
    """One UTF-8 text file as a single document."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "no such file"
        raise ConfigError(f"{path}: {what}; give --text an existing UTF-8 text file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(
            f"{path}: cannot read it ({e.strerror or e}); give --text a readable UTF-8 text file"
        ) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{path}: not UTF-8 (byte {data[e.start]:#04x} at byte offset {e.start} is invalid); "
            f"re-encode it, e.g. `iconv -f LATIN1 -t utf-8 {path} > out.txt`, and pass that"
        ) from None
    if not text.strip():
        what = "empty" if not text else "only whitespace"
        raise ConfigError(f"{path}: the file is {what}; give --text a file with text in it")
    return [text]


def hf_dataset_documents(name: str, split: str = "train", column: str = "text",
                         flags: tuple[str, str, str] = ("--hf-dataset", "--hf-split", "--hf-column"),
                         extra: str = "hf") -> list[str]:
    """The non-empty strings of one column of a Hugging Face dataset (a save_to_disk folder or a Hub name).
    Errors name the command's `flags` (dataset, split, column) and its install `extra`."""
    dataset_flag, split_flag, column_flag = flags
    try:
        import datasets
    except ImportError:
        raise ConfigError(
            f"{dataset_flag} needs the Hugging Face `datasets` package; install it with pip install 'memk[{extra}]'"
        ) from None

    label = f"dataset {name!r}"
    if Path(name).is_dir():
        try:
            loaded = datasets.load_from_disk(name)
        except Exception as e:  # noqa: BLE001 - any failure becomes one line naming its cause
            raise ConfigError(
                f"cannot load {label} from disk: {_one_line(e)}; give a folder written by save_to_disk"
            ) from None
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ConfigError(
                    f"{label} has no split {split!r}; its splits are {sorted(loaded)}: pick one with {split_flag}"
                )
            loaded = loaded[split]
    else:
        try:
            loaded = datasets.load_dataset(name, split=split)
        except Exception as e:  # noqa: BLE001
            raise ConfigError(
                f"cannot load {label} (split {split!r}): {_one_line(e)}; check the name and split, "
                f"or give a local folder written by save_to_disk"
            ) from None
    label = f"{label} split {split!r}"

    if column not in loaded.column_names:
        raise ConfigError(
            f"{label} has no column {column!r}; its columns are {loaded.column_names}: pick one with {column_flag}"
        )
    documents = []
    for i, value in enumerate(loaded[column]):
        if value is None:
            continue
        if not isinstance(value, str):
            raise ConfigError(
                f"{label} column {column!r} holds {type(value).__name__} (row {i}), not text; pick a text column"
            )
        if value.strip():
            documents.append(value)
    if not documents:
        raise ConfigError(f"{label} column {column!r} holds no non-empty text; pick another column or dataset")
    return documents


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


# --------------------------------------------------------------------------- tokenizer


def train_tokenizer(documents: list[str], vocab_size: int = 2048):
    """A byte-level BPE tokenizer (tokenizers.Tokenizer) trained on the documents, EOT at id 0.

    The vocabulary has vocab_size entries, or fewer when the text has no more pairs worth merging.
    Training is deterministic: the same documents give the same vocabulary.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if not isinstance(vocab_size, (int, np.integer)) or isinstance(vocab_size, bool):
        raise ConfigError(f"vocab_size must be an integer, got {vocab_size!r}")
    if vocab_size < MIN_VOCAB_SIZE:
        raise ConfigError(
            f"vocab_size {vocab_size} is too small: a byte-level tokenizer needs at least {MIN_VOCAB_SIZE} "
            f"(256 bytes + EOT); use --vocab-size {MIN_VOCAB_SIZE} or more"
        )
    # No normalizer and no prefix space: the text is kept byte for byte, so decoding gives it back exactly.
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=int(vocab_size),
        special_tokens=[EOT],  # first special token, so id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, even ones the text lacks
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer=trainer)
    _literal_eot_is_text(tokenizer)
    assert tokenizer.token_to_id(EOT) == EOT_ID
    return tokenizer


def load_tokenizer(out_dir: Path):
    """The tokenizer prepare_corpus saved in out_dir."""
    from tokenizers import Tokenizer

    path = Path(out_dir) / "tokenizer.json"
    if not path.is_file():
        raise ConfigError(f"{path}: no such file; run prepare_corpus into {out_dir} first")
    tokenizer = Tokenizer.from_file(str(path))
    _literal_eot_is_text(tokenizer)
    return tokenizer


def _literal_eot_is_text(tokenizer) -> None:
    # The characters "<|endoftext|>" inside a document are encoded as text, not as a fake document end:
    # EOT only ever enters a sequence where token_sequences puts it. (Not saved in tokenizer.json.)
    tokenizer.encode_special_tokens = True


# --------------------------------------------------------------------------- sequences


def token_sequences(documents: list[str], tokenizer, seq_len: int) -> np.ndarray:
    """Documents encoded, each followed by EOT, as one stream cut into windows: int64 (n, seq_len).

    The tail that does not fill a window is dropped.
    """
    _check_positive("seq_len", seq_len)
    return _windows(_token_stream(documents, tokenizer), seq_len)


def _token_stream(documents, tokenizer) -> np.ndarray:
    if tokenizer.token_to_id(EOT) != EOT_ID:
        raise ConfigError(f"the tokenizer must have {EOT} as id {EOT_ID}; make it with train_tokenizer")
    pieces = []
    for encoding in tokenizer.encode_batch(list(documents), add_special_tokens=False):
        pieces.append(np.asarray(encoding.ids, dtype=np.int64))
        pieces.append(np.array([EOT_ID], dtype=np.int64))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)


def _windows(stream: np.ndarray, seq_len: int) -> np.ndarray:
    n = len(stream) // seq_len
    return stream[: n * seq_len].reshape(n, seq_len)


def deduplicate(sequences: np.ndarray) -> tuple[np.ndarray, int]:
    """Exact duplicate rows removed, the first occurrence kept, order kept: (unique rows, rows removed)."""
    sequences = _check_sequences(sequences)
    if len(sequences) == 0:
        return sequences.copy(), 0
    _, first = np.unique(sequences, axis=0, return_index=True)
    unique = sequences[np.sort(first)]
    return unique, len(sequences) - len(unique)


def split_heldout(sequences: np.ndarray, n_heldout: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows shuffled with a seeded generator; (train_pool, heldout), the first n_heldout rows held out."""
    sequences = _check_sequences(sequences)
    if not isinstance(n_heldout, (int, np.integer)) or isinstance(n_heldout, bool) or n_heldout < 1:
        raise ConfigError(f"n_heldout must be a positive integer, got {n_heldout!r}; hold out at least 1 sequence")
    if n_heldout >= len(sequences):
        raise ConfigError(
            f"holding out {n_heldout} of {len(sequences)} sequences leaves none to train on; "
            f"hold out fewer (at most {len(sequences) - 1}) or use a bigger text"
        )
    shuffled = sequences[np.random.default_rng(seed).permutation(len(sequences))]
    return shuffled[n_heldout:], shuffled[:n_heldout]


def _check_positive(name, value) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def _check_sequences(sequences) -> np.ndarray:
    sequences = np.asarray(sequences)
    if sequences.ndim != 2 or not np.issubdtype(sequences.dtype, np.integer):
        raise ConfigError(
            f"sequences must be a 2-D integer array (n, seq_len), got {sequences.ndim}-D {sequences.dtype}; "
            f"make them with token_sequences"
        )
    return sequences


# --------------------------------------------------------------------------- prepared corpus


@dataclass
class TokenizedCorpus:
    source: str  # e.g. "python-help", "text:/path/file.txt", "hf:NAME[split].column"
    n_documents: int
    n_characters: int
    n_tokens: int  # tokens in the stream, EOTs included
    n_sequences: int  # windows before dedup
    duplicates_removed: int
    vocab_size: int  # the trained vocabulary's size (less than asked when the text is small)
    seq_len: int
    train_pool: np.ndarray  # (n_train, S) int64, shuffled; experiments train on prefixes of it
    heldout: np.ndarray  # (n_heldout, S) int64, never trained on

    def describe(self) -> dict:
        """The scalars (no arrays) as plain JSON-able values, plus the two split sizes."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("train_pool", "heldout")}
        out = {k: v if isinstance(v, str) else int(v) for k, v in out.items()}
        out["n_train"] = int(len(self.train_pool))
        out["n_heldout"] = int(len(self.heldout))
        return out


def prepare_corpus(
    documents, source: str, vocab_size: int, seq_len: int, n_heldout: int, seed: int, out_dir: Path
) -> TokenizedCorpus:
    """Tokenizer trained, text tokenized, windows deduplicated and split; saved in out_dir or reloaded from it."""
    documents = list(documents)
    if not documents or not all(isinstance(d, str) for d in documents):
        raise ConfigError("documents must be a non-empty list of strings")
    for name, value in (("vocab_size", vocab_size), ("seq_len", seq_len), ("n_heldout", n_heldout)):
        _check_positive(name, value)
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"{out_dir} is a file, not a folder; use another --out")
    fingerprint = _fingerprint(documents, source, vocab_size, seq_len, n_heldout, seed)

    saved = _load_saved(out_dir, fingerprint)
    if saved is not None:
        return saved

    tokenizer = train_tokenizer(documents, vocab_size)
    stream = _token_stream(documents, tokenizer)
    sequences = _windows(stream, seq_len)
    unique, removed = deduplicate(sequences)
    if len(unique) < n_heldout + 1:
        raise ConfigError(
            f"{source} yields {len(unique)} distinct sequences of {seq_len} tokens "
            f"({len(sequences)} before removing duplicates), fewer than the {n_heldout} held out + 1 to train on; "
            f"a bigger text is needed (or a shorter --seq-len, or fewer held out)"
        )
    train_pool, heldout = split_heldout(unique, n_heldout, seed)
    corpus = TokenizedCorpus(
        source=source,
        n_documents=len(documents),
        n_characters=sum(len(d) for d in documents),
        n_tokens=len(stream),
        n_sequences=len(sequences),
        duplicates_removed=removed,
        vocab_size=tokenizer.get_vocab_size(),
        seq_len=int(seq_len),
        train_pool=np.ascontiguousarray(train_pool, dtype=np.int64),
        heldout=np.ascontiguousarray(heldout, dtype=np.int64),
    )

    # corpus.json goes last: its presence says the other two files are complete.
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "tokenizer.json", lambda tmp: tokenizer.save(str(tmp)))
    atomic_write_npz(out_dir / "corpus.npz", train_pool=corpus.train_pool, heldout=corpus.heldout)
    record = dict(corpus.describe(), fingerprint=fingerprint, format_version=FORMAT_VERSION,
                  n_heldout_asked=int(n_heldout), seed=int(seed))
    atomic_write(out_dir / "corpus.json", lambda tmp: tmp.write_text(json.dumps(record, indent=2) + "\n"))
    return corpus


def _fingerprint(documents, source, vocab_size, seq_len, n_heldout, seed) -> str:
    h = hashlib.sha1()
    args = {"format_version": FORMAT_VERSION, "source": source, "vocab_size": int(vocab_size),
            "seq_len": int(seq_len), "n_heldout": int(n_heldout), "seed": int(seed)}
    h.update(json.dumps(args, sort_keys=True).encode())
    for doc in documents:
        data = doc.encode("utf-8", errors="surrogatepass")
        h.update(len(data).to_bytes(8, "little"))  # length-prefixed: ["ab", "c"] differs from ["a", "bc"]
        h.update(data)
    return h.hexdigest()


def _load_saved(out_dir: Path, fingerprint: str) -> TokenizedCorpus | None:
    meta_path = out_dir / "corpus.json"
    if not meta_path.is_file():
        return None  # nothing saved, or an interrupted save: start over
    try:
        meta = json.loads(meta_path.read_text())
        saved_fingerprint = meta["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{meta_path} is unreadable ({_one_line(e)}); delete it or use another --out") from None
    if saved_fingerprint != fingerprint:
        raise ConfigError(
            f"output folder {out_dir} holds a different corpus (other text or settings: {meta.get('source')!r}, "
            f"vocab_size {meta.get('vocab_size')}, seq_len {meta.get('seq_len')}); use another --out"
        )
    try:
        with np.load(out_dir / "corpus.npz", allow_pickle=False) as npz:
            train_pool, heldout = npz["train_pool"], npz["heldout"]
        load_tokenizer(out_dir)
        values = {f.name: meta[f.name] for f in fields(TokenizedCorpus) if f.name not in ("train_pool", "heldout")}
    except Exception as e:  # noqa: BLE001 - any damage (missing file, bad zip, bad json) becomes one message
        raise ConfigError(
            f"{out_dir} holds a damaged corpus ({_one_line(e)}); delete its corpus.* files or use another --out"
        ) from None
    if train_pool.shape != (meta["n_train"], meta["seq_len"]) or heldout.shape != (meta["n_heldout"], meta["seq_len"]):
        raise ConfigError(
            f"{out_dir}/corpus.npz does not match corpus.json; delete its corpus.* files or use another --out"
        )
    return TokenizedCorpus(
        **values, train_pool=train_pool.astype(np.int64, copy=False), heldout=heldout.astype(np.int64, copy=False)
    )


