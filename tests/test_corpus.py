"""Real-text corpus: tokenizer round trip, windowing, dedup, held-out split, saved corpus, bad input."""

import json
import os
import sys

import numpy as np
import pytest

from memk.memorize import corpus
from memk.memorize.errors import ConfigError
from memk.memorize.corpus import EOT


@pytest.fixture(scope="module")
def builtin():
    return corpus.builtin_documents()


@pytest.fixture(scope="module")
def tokenizer(builtin):
    return corpus.train_tokenizer(builtin, 2048)


def byte_tokenizer():
    # vocab 257 = 256 bytes + EOT: no merges, so every byte of ASCII text is one token.
    return corpus.train_tokenizer(["abcde abcde"], corpus.MIN_VOCAB_SIZE)


# ----------------------------------------------------------------------------- documents


def test_builtin_documents_are_python_help_topics_in_key_order(builtin):
    from pydoc_data.topics import topics

    assert builtin == [topics[k] for k in sorted(topics)]
    assert all(isinstance(d, str) and d.strip() for d in builtin)


def test_builtin_documents_missing_pydoc_data_names_the_alternatives(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydoc_data.topics", None)  # makes the import fail
    with pytest.raises(ConfigError, match=r"pydoc_data.*--text PATH or --hf-dataset NAME"):
        corpus.builtin_documents()


def test_text_file_is_one_document(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("première ligne\n中文 🙂\n", encoding="utf-8")
    assert corpus.text_file_documents(path) == ["première ligne\n中文 🙂\n"]
    assert corpus.text_file_documents(str(path)) == ["première ligne\n中文 🙂\n"]


def test_text_file_missing_or_directory(tmp_path):
    with pytest.raises(ConfigError, match=r"no such file.*give --text an existing UTF-8 text file"):
        corpus.text_file_documents(tmp_path / "absent.txt")
    with pytest.raises(ConfigError, match=r"directory.*give --text an existing UTF-8 text file"):
        corpus.text_file_documents(tmp_path)


@pytest.mark.parametrize("content, word", [(b"", "empty"), (b" \n\t\r\n  ", "whitespace")])
def test_text_file_empty_or_whitespace(tmp_path, content, word):
    path = tmp_path / "t.txt"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=word):
        corpus.text_file_documents(path)


def test_text_file_not_utf8_says_where_and_how_to_reencode(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("abc caf".encode() + "é".encode("latin-1") + b" more")  # 0xe9 at byte 7
    with pytest.raises(ConfigError, match=r"not UTF-8.*byte offset 7.*iconv.*-t utf-8"):
        corpus.text_file_documents(path)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads any file")
def test_text_file_unreadable(tmp_path):
    path = tmp_path / "secret.txt"
    path.write_text("text")
    path.chmod(0)
    try:
        with pytest.raises(ConfigError, match="cannot read"):
            corpus.text_file_documents(path)
    finally:
        path.chmod(0o600)


# ----------------------------------------------------------------------------- Hugging Face datasets


def test_hf_dataset_saved_to_disk_loads_its_text(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = {"text": ["first doc", "", "  ", None, "second é 中"], "n": [1, 2, 3, 4, 5]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "ds"))
    assert corpus.hf_dataset_documents(str(tmp_path / "ds")) == ["first doc", "second é 中"]


def test_hf_dataset_dict_split_and_missing_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"body": ["train text"]}),
            "test": datasets.Dataset.from_dict({"body": ["test text"]}),
        }
    ).save_to_disk(str(tmp_path / "dd"))
    assert corpus.hf_dataset_documents(str(tmp_path / "dd"), split="test", column="body") == ["test text"]
    with pytest.raises(ConfigError, match=r"no split 'validation'.*\['test', 'train'\]"):
        corpus.hf_dataset_documents(str(tmp_path / "dd"), split="validation", column="body")


def test_hf_dataset_missing_column_lists_columns(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"content": ["x"], "label": [0]}).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(ConfigError, match=r"no column 'text'.*\['content', 'label'\]"):
        corpus.hf_dataset_documents(str(tmp_path / "ds"))
    with pytest.raises(ConfigError, match=r"'label' holds int.*not text"):
        corpus.hf_dataset_documents(str(tmp_path / "ds"), column="label")


def test_hf_dataset_without_text(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["", "   "]}).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(ConfigError, match="no non-empty text"):
        corpus.hf_dataset_documents(str(tmp_path / "ds"))


def test_hf_dataset_folder_that_is_not_a_dataset(tmp_path):
    pytest.importorskip("datasets")
    (tmp_path / "junk").mkdir()
    with pytest.raises(ConfigError, match="cannot load dataset"):
        corpus.hf_dataset_documents(str(tmp_path / "junk"))


def test_hf_dataset_without_the_package(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ConfigError, match=r"pip install 'memk\[hf\]'"):
        corpus.hf_dataset_documents(str(tmp_path))


# ----------------------------------------------------------------------------- tokenizer


ROUND_TRIP_TEXTS = [
    "plain ASCII, with punctuation!?",
    "café crème brûlée — naïve",
    "中文字符和标点。",
    "emoji 🙂👍🏽🇫🇷 and ZWJ 👩‍👩‍👧",
    "  leading spaces, tabs\t\tand\r\nCRLF\n\n",
    "a literal <|endoftext|> inside text",
    "\x00\x01 control bytes \x7f",
]


def random_unicode_text(seed, n=400):
    # Code points from every plane that UTF-8 can encode (surrogates excluded).
    rng = np.random.default_rng(seed)
    points = rng.integers(0, 0x110000, size=n)
    return "".join(chr(p) for p in points if not 0xD800 <= p <= 0xDFFF)


def test_round_trip_non_ascii_and_builtin_text(tokenizer, builtin):
    for text in ROUND_TRIP_TEXTS + [random_unicode_text(s) for s in range(3)]:
        assert tokenizer.decode(tokenizer.encode(text).ids) == text
    for doc in builtin:
        assert tokenizer.decode(tokenizer.encode(doc).ids) == doc


def test_eot_is_id_zero_and_vocab_is_as_asked(tokenizer):
    assert tokenizer.token_to_id(EOT) == 0
    assert tokenizer.id_to_token(0) == EOT
    assert tokenizer.get_vocab_size() == 2048


def test_literal_eot_in_text_is_not_a_document_end(tokenizer, tmp_path):
    text = "before <|endoftext|> after"
    assert 0 not in tokenizer.encode(text).ids
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    assert corpus.load_tokenizer(tmp_path).encode(text).ids == tokenizer.encode(text).ids


def test_training_is_deterministic(tokenizer, builtin):
    assert corpus.train_tokenizer(builtin, 2048).to_str() == tokenizer.to_str()


def test_vocab_too_small_names_the_minimum():
    with pytest.raises(ConfigError, match=r"at least 257"):
        corpus.train_tokenizer(["some text"], 256)


# ----------------------------------------------------------------------------- sequences


def test_token_sequences_windows_by_hand():
    tok = byte_tokenizer()
    a, b, c, d, e = (tok.token_to_id(ch) for ch in "abcde")
    assert tok.encode("abcde").ids == [a, b, c, d, e]  # one token per byte: the hand computation below holds
    # stream: a b EOT c d e EOT  -> windows of 2: [a b] [EOT c] [d e], the lone EOT tail dropped
    got = corpus.token_sequences(["ab", "cde"], tok, 2)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, [[a, b], [0, c], [d, e]])
    # windows of 3: [a b EOT] [c d e], tail [EOT] dropped; of 7 the whole stream; of 8 nothing
    np.testing.assert_array_equal(corpus.token_sequences(["ab", "cde"], tok, 3), [[a, b, 0], [c, d, e]])
    np.testing.assert_array_equal(corpus.token_sequences(["ab", "cde"], tok, 7), [[a, b, 0, c, d, e, 0]])
    assert corpus.token_sequences(["ab", "cde"], tok, 8).shape == (0, 8)


def test_token_sequences_bad_seq_len():
    with pytest.raises(ConfigError, match="seq_len"):
        corpus.token_sequences(["ab"], byte_tokenizer(), 0)


def python_dedup(rows):
    seen, kept = set(), []
    for row in rows:
        key = tuple(int(x) for x in row)
        if key not in seen:
            seen.add(key)
            kept.append(key)
    return kept


def test_deduplicate_against_a_set_keeps_first_occurrences_in_order():
    rng = np.random.default_rng(0)
    rows = rng.integers(0, 3, size=(200, 4))  # 81 possible rows: many duplicates
    unique, removed = corpus.deduplicate(rows)
    expected = python_dedup(rows)
    assert [tuple(r) for r in unique.tolist()] == expected
    assert removed == len(rows) - len(expected)
    hand = np.array([[5, 6], [1, 2], [5, 6], [3, 4], [1, 2]])
    unique, removed = corpus.deduplicate(hand)
    np.testing.assert_array_equal(unique, [[5, 6], [1, 2], [3, 4]])
    assert removed == 2


def test_heldout_never_overlaps_the_train_pool_and_is_fixed_by_the_seed():
    rng = np.random.default_rng(1)
    unique, _ = corpus.deduplicate(rng.integers(0, 4, size=(300, 5)))
    train, held = corpus.split_heldout(unique, 37, seed=7)
    assert len(held) == 37 and len(train) + len(held) == len(unique)
    train_rows, held_rows = set(map(tuple, train.tolist())), set(map(tuple, held.tolist()))
    assert not train_rows & held_rows
    assert train_rows | held_rows == set(map(tuple, unique.tolist()))
    again_train, again_held = corpus.split_heldout(unique, 37, seed=7)
    np.testing.assert_array_equal(again_train, train)
    np.testing.assert_array_equal(again_held, held)
    assert not np.array_equal(corpus.split_heldout(unique, 37, seed=8)[1], held)


@pytest.mark.parametrize("n_heldout", [0, -1, 10, 11])
def test_heldout_must_leave_a_training_sequence(n_heldout):
    with pytest.raises(ConfigError, match="n_heldout|none to train on"):
        corpus.split_heldout(np.arange(20).reshape(10, 2), n_heldout, seed=0)


# ----------------------------------------------------------------------------- prepare_corpus


def test_prepare_corpus_on_builtin_text(builtin, tmp_path):
    prepared = corpus.prepare_corpus(builtin, corpus.BUILTIN_CORPUS, 2048, 64, 100, 0, tmp_path)
    info = prepared.describe()
    json.dumps(info)  # JSON-able
    assert info["n_documents"] == len(builtin)
    assert info["n_characters"] == sum(len(d) for d in builtin)
    assert info["vocab_size"] == 2048 and info["seq_len"] == 64
    assert info["n_sequences"] == info["n_tokens"] // 64
    assert len(prepared.heldout) == 100
    assert len(prepared.train_pool) + 100 == info["n_sequences"] - info["duplicates_removed"]
    assert prepared.train_pool.dtype == np.int64 and prepared.train_pool.shape[1] == 64
    assert prepared.train_pool.max() < 2048 and prepared.train_pool.min() >= 0
    # the saved tokenizer decodes the sequences back to the text they came from
    tok = corpus.load_tokenizer(tmp_path)
    assert tok.decode(prepared.heldout[0].tolist(), skip_special_tokens=False) in EOT.join(builtin) + EOT


def test_prepare_corpus_saves_reloads_and_refuses_another(tmp_path):
    docs = [f"document {i}: " + " ".join(f"word{(i * 7 + j) % 50}" for j in range(60)) for i in range(30)]
    args = dict(source="test", vocab_size=300, seq_len=16, n_heldout=5, seed=3, out_dir=tmp_path)
    first = corpus.prepare_corpus(docs, **args)
    assert {p.name for p in tmp_path.iterdir()} == {"tokenizer.json", "corpus.npz", "corpus.json"}
    saved_tokenizer = (tmp_path / "tokenizer.json").read_bytes()
    second = corpus.prepare_corpus(docs, **args)
    assert second.describe() == first.describe()
    np.testing.assert_array_equal(second.train_pool, first.train_pool)
    np.testing.assert_array_equal(second.heldout, first.heldout)
    assert (tmp_path / "tokenizer.json").read_bytes() == saved_tokenizer
    # an interrupted save (corpus.json never written) starts over and gives the same split
    (tmp_path / "corpus.json").unlink()
    third = corpus.prepare_corpus(docs, **args)
    np.testing.assert_array_equal(third.heldout, first.heldout)
    for other in (dict(args, seed=4), dict(args, seq_len=8)):
        with pytest.raises(ConfigError, match="holds a different corpus.*another --out"):
            corpus.prepare_corpus(docs, **other)
    with pytest.raises(ConfigError, match="holds a different corpus.*another --out"):
        corpus.prepare_corpus(docs[:-1], **args)


def test_prepare_corpus_too_little_text(tmp_path):
    # "abcdabcdefgh" + EOT: 13 byte tokens, 3 windows of 4, one a duplicate: 2 left, 3 needed (2 held out + 1)
    with pytest.raises(ConfigError, match=r"yields 2 distinct sequences.*\(3 before.*bigger text"):
        corpus.prepare_corpus(["abcdabcdefgh"], "tiny", 257, 4, 2, 0, tmp_path)
    assert not (tmp_path / "corpus.json").exists()
