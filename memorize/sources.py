"""Where run-generalization's sequences come from: text, or a Markov chain whose entropy is exact.

Text (a UTF-8 file, a Hugging Face dataset, or the built-in corpus) is tokenized with a
byte-level BPE trained on it, cut into S-token sequences, deduplicated and split into a
training pool and a fixed held-out set (memorize/corpus.py). The Markov source draws
sequences from a sparse random chain (memorize/markov.py) and removes repeats the same
way; its generator is known, so H(x | θ) is exact. Datasets are prefixes of the pool.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from . import corpus as corpus_lib
from .bits import uniform_sequence_entropy_bits
from .constants import SOURCES
from .errors import ConfigError
from .markov import MarkovSource
from .outputs import content_digest


@dataclass(frozen=True)
class SourceSpec:
    """Where the sequences come from."""

    kind: str = "text"  # "text" or "markov"
    text_path: str | None = None  # a UTF-8 file; None (and no hf_dataset) = the built-in corpus
    hf_dataset: str | None = None  # a Hugging Face dataset name, or a folder saved with save_to_disk
    hf_split: str = "train"
    hf_column: str = "text"
    vocab_size: int = 2048  # the BPE vocabulary, or the Markov chain's states
    seq_len: int = 64
    markov_branching: int = 4  # non-zero successors per Markov state
    markov_sequences: int = 4096  # sequences drawn from the chain: training pool + held-out

    @property
    def name(self) -> str:
        if self.kind == "markov":
            return f"markov(V={self.vocab_size}, branching={self.markov_branching})"
        if self.hf_dataset is not None:
            return f"hf:{self.hf_dataset}[{self.hf_split}].{self.hf_column}"
        if self.text_path is not None:
            return f"text:{self.text_path}"
        return corpus_lib.BUILTIN_CORPUS


@dataclass
class SourceData:
    train_pool: torch.Tensor  # (n_train, S) int64; datasets are its prefixes
    heldout: torch.Tensor  # (n_heldout, S) int64; never trained on
    exact: MarkovSource | None  # the true generator, where known
    description: dict
    fingerprint: str  # changes whenever the sequences would

    def most_bits_per_sequence(self) -> float:
        """An upper bound on H(x | θ) per sequence: exact for the chain, S-1 tokens of log2 V for text."""
        seq_len = int(self.train_pool.shape[1])
        if self.exact is not None:
            return self.exact.sequence_entropy_bits(seq_len)
        return uniform_sequence_entropy_bits(self.description["vocab_size"], seq_len)


def check_source(src: SourceSpec, n_heldout: int) -> None:
    """Everything about the source that can be checked before any data is read."""
    if src.kind not in SOURCES:
        raise ConfigError(f"unknown source {src.kind!r}; choose one of {', '.join(SOURCES)}")
    if src.text_path is not None and src.hf_dataset is not None:
        raise ConfigError("give either --text or --hf-dataset, not both")
    if src.seq_len < 2:
        raise ConfigError(f"seq_len must be >= 2 (the first token is context, the rest are coded), got {src.seq_len}")
    if n_heldout < 2:
        raise ConfigError(f"the held-out split needs at least 2 sequences, got --heldout {n_heldout}")
    if src.kind == "markov":
        if src.text_path is not None or src.hf_dataset is not None:
            raise ConfigError("--text and --hf-dataset are text sources; drop them or use --source text")
        if not 2 <= src.markov_branching <= src.vocab_size:
            raise ConfigError(
                f"Markov branching must lie in [2, V={src.vocab_size}], got {src.markov_branching}"
                + ("; with one successor per state the chain is deterministic and its sequences carry no bits"
                   if src.markov_branching == 1 else "")
            )
        if src.markov_sequences <= n_heldout:
            raise ConfigError(
                f"the Markov pool ({src.markov_sequences} sequences) must exceed the held-out split ({n_heldout})"
            )


def read_documents(src: SourceSpec) -> list[str] | None:
    """A text source's documents, read and checked (ConfigError for a missing or empty file, a dataset
    that cannot be loaded); None for the Markov chain. Read before an output folder is made, a bad
    source is refused without leaving one."""
    if src.kind == "markov":
        return None
    if src.hf_dataset is not None:
        return corpus_lib.hf_dataset_documents(src.hf_dataset, split=src.hf_split, column=src.hf_column)
    if src.text_path is not None:
        return corpus_lib.text_file_documents(src.text_path)
    return corpus_lib.builtin_documents()


def load_source(src: SourceSpec, n_heldout: int, seed: int, out_dir: Path,
                documents: list[str] | None = None) -> SourceData:
    """The training pool and the held-out split; a text corpus is prepared once in out_dir and reused.
    documents: the text source's, where read_documents has read them already."""
    if src.kind == "markov":
        chain = MarkovSource(src.vocab_size, branching=src.markov_branching, seed=seed)
        drawn = chain.sample(src.markov_sequences, src.seq_len, seed=seed + 1).numpy()
        # Exact repeats are removed as for text, so no held-out sequence is also a training one.
        sequences, removed = corpus_lib.deduplicate(drawn)
        train_pool, heldout = corpus_lib.split_heldout(sequences, n_heldout, seed)
        description = {
            "source": src.name, **chain.describe(), "seq_len": src.seq_len, "n_sequences": len(drawn),
            "duplicates_removed": removed, "n_train": len(train_pool), "n_heldout": len(heldout),
        }
        fingerprint = content_digest([description, seed])
        return SourceData(torch.from_numpy(train_pool).long(), torch.from_numpy(heldout).long(), chain, description, fingerprint)
    if documents is None:
        documents = read_documents(src)
    corpus = corpus_lib.prepare_corpus(
        documents, src.name, src.vocab_size, src.seq_len, n_heldout, seed, out_dir
    )
    if corpus.vocab_size != src.vocab_size:
        raise ConfigError(
            f"the corpus is too small for a {src.vocab_size}-token vocabulary: BPE found only {corpus.vocab_size} "
            f"tokens; pass --vocab-size {corpus.vocab_size} (or less), or give more text"
        )
    description = corpus.describe()
    fingerprint = content_digest([description, hashlib.sha1(corpus.train_pool.tobytes()).hexdigest()])
    return SourceData(
        torch.from_numpy(corpus.train_pool).long(), torch.from_numpy(corpus.heldout).long(), None, description, fingerprint
    )
