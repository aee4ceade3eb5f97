"""memorize/sources.py: run-generalization's sequences from text or a Markov chain, checked before
anything is read, split into a training pool and a held-out set that share no sequence."""

import math
import re
from dataclasses import replace

import pytest
import torch

from memk.memorize.errors import ConfigError
from memk.memorize.markov import MarkovSource
from memk.memorize.sources import SourceSpec, check_source, load_source, read_documents

CHAIN = SourceSpec(kind="markov", vocab_size=12, seq_len=6, markov_branching=3, markov_sequences=600)


def test_a_source_is_named_by_where_its_sequences_come_from():
    assert SourceSpec().name == "python-help"  # the built-in corpus
    assert SourceSpec(text_path="a.txt").name == "text:a.txt"
    assert SourceSpec(hf_dataset="wiki", hf_split="validation", hf_column="body").name == "hf:wiki[validation].body"
    assert CHAIN.name == "markov(V=12, branching=3)"


@pytest.mark.parametrize("spec, heldout, message", [
    (SourceSpec(kind="speech"), 10, "unknown source 'speech'; choose one of text, markov"),
    (SourceSpec(text_path="a.txt", hf_dataset="wiki"), 10, "give either --text or --hf-dataset, not both"),
    (SourceSpec(seq_len=1), 10, "seq_len must be >= 2 (the first token is context, the rest are coded), got 1"),
    (SourceSpec(), 1, "the held-out split needs at least 2 sequences, got --heldout 1"),
    (replace(CHAIN, text_path="a.txt"), 10, "--text and --hf-dataset are text sources; drop them or use --source text"),
    (replace(CHAIN, markov_branching=1), 10, "Markov branching must lie in [2, V=12], got 1; with one successor per "
                                             "state the chain is deterministic and its sequences carry no bits"),
    (replace(CHAIN, markov_branching=13), 10, "Markov branching must lie in [2, V=12], got 13"),
    (replace(CHAIN, markov_sequences=10), 10, "the Markov pool (10 sequences) must exceed the held-out split (10)"),
])
def test_what_can_be_checked_before_reading_is_a_config_error_with_the_fix(spec, heldout, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_source(spec, heldout)


def test_good_sources_pass_the_checks():
    check_source(SourceSpec(), 64)
    check_source(CHAIN, 64)


def test_the_markov_chain_is_drawn_deduplicated_and_split_the_same_for_one_seed(tmp_path):
    data = load_source(CHAIN, 50, 7, tmp_path)
    again = load_source(CHAIN, 50, 7, tmp_path)
    assert torch.equal(data.train_pool, again.train_pool) and torch.equal(data.heldout, again.heldout)
    assert data.fingerprint == again.fingerprint
    assert data.fingerprint != load_source(CHAIN, 50, 8, tmp_path).fingerprint  # another seed, other sequences
    assert list(tmp_path.iterdir()) == []  # nothing written for the chain

    d = data.description
    assert d["n_heldout"] == len(data.heldout) == 50 and d["n_train"] == len(data.train_pool)
    assert d["n_train"] + d["n_heldout"] + d["duplicates_removed"] == CHAIN.markov_sequences == d["n_sequences"]
    pool = {tuple(s) for s in data.train_pool.tolist()}
    assert len(pool) == len(data.train_pool)  # no repeats ...
    assert not pool & {tuple(s) for s in data.heldout.tolist()}  # ... and no held-out sequence trained on
    assert data.train_pool.dtype == torch.int64 and data.train_pool.shape[1] == CHAIN.seq_len
    assert int(data.train_pool.max()) < CHAIN.vocab_size


def test_the_markov_source_s_bits_are_its_generator_s_exact_entropy(tmp_path):
    data = load_source(CHAIN, 50, 7, tmp_path)
    chain = MarkovSource(12, branching=3, seed=7)  # the chain the seed draws
    assert isinstance(data.exact, MarkovSource)
    assert data.exact.entropy_rate_bits() == pytest.approx(chain.entropy_rate_bits(), rel=1e-12)
    assert data.most_bits_per_sequence() == pytest.approx((CHAIN.seq_len - 1) * chain.entropy_rate_bits(), rel=1e-12)
    assert data.most_bits_per_sequence() < (CHAIN.seq_len - 1) * math.log2(12)  # branching 3 of 12: below uniform


def test_a_text_source_is_read_before_anything_is_made_and_missing_files_are_refused(tmp_path):
    assert read_documents(CHAIN) is None
    text = tmp_path / "corpus.txt"
    text.write_text("the quick brown fox\n\njumps over the lazy dog\n")
    documents = read_documents(SourceSpec(text_path=str(text)))
    assert documents and "".join(documents).replace("\n", "").startswith("the quick brown fox")
    with pytest.raises(ConfigError, match="no such file"):
        read_documents(SourceSpec(text_path=str(tmp_path / "missing.txt")))


TEXT = SourceSpec(vocab_size=300, seq_len=16)  # the built-in corpus, as run-generalization's smoke preset reads it


def test_text_is_tokenized_into_a_pool_and_held_out_split_prepared_once(tmp_path):
    documents = read_documents(TEXT)
    data = load_source(TEXT, 64, 0, tmp_path, documents)
    assert data.exact is None and data.description["vocab_size"] == 300
    assert data.heldout.shape == (64, 16) and data.train_pool.shape[1] == 16
    assert not {tuple(s) for s in data.train_pool.tolist()} & {tuple(s) for s in data.heldout.tolist()}
    # text's H(x | θ) is not known: the most a sequence can carry is the uniform code over its coded tokens
    assert data.most_bits_per_sequence() == pytest.approx(15 * math.log2(300), rel=1e-12)
    saved = {p.name for p in tmp_path.iterdir()}
    assert {"tokenizer.json", "corpus.npz"} <= saved
    again = load_source(TEXT, 64, 0, tmp_path)  # reloaded from the folder: the same sequences
    assert torch.equal(again.train_pool, data.train_pool) and again.fingerprint == data.fingerprint


def test_a_vocabulary_the_text_cannot_fill_is_refused_with_the_size_it_can(tmp_path):
    text = tmp_path / "tiny.txt"
    text.write_text(" ".join(f"w{i}" for i in range(2000)))  # a few thousand distinct words, fewer tokens than asked
    with pytest.raises(ConfigError, match=r"the corpus is too small for a 5000-token vocabulary: BPE found only \d+ "
                                          r"tokens; pass --vocab-size \d+ \(or less\), or give more text"):
        load_source(SourceSpec(text_path=str(text), vocab_size=5000, seq_len=4), 2, 0, tmp_path / "out")
