"""Reading an audit's texts (memorize/audit/texts.py): text files split at newlines only, JSON lines, saved
datasets, and bad input as one ConfigError naming the fix."""

import pytest

from memk.memorize.audit.texts import read_texts
from memk.memorize.errors import ConfigError


def test_inputs_from_jsonl_and_a_saved_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    (tmp_path / "a.jsonl").write_text('{"body": "first", "n": 1}\n\n{"body": "second"}\n')
    assert read_texts(str(tmp_path / "a.jsonl"), column="body") == ["first", "second"]
    datasets.Dataset.from_dict({"text": ["x y", "", "z"]}).save_to_disk(str(tmp_path / "ds"))
    assert read_texts(str(tmp_path / "ds")) == ["x y", "z"]
    with pytest.raises(ConfigError, match="no column 'body'"):
        read_texts(str(tmp_path / "ds"), column="body")


def test_text_files_are_split_at_newlines_only_and_json_strings_may_hold_line_separators(tmp_path):
    (tmp_path / "a.txt").write_bytes("one\x0cpage\u2028two\x85three\r\nsecond\rline\n\n  \r\nlast".encode())
    assert read_texts(str(tmp_path / "a.txt")) == ["one\x0cpage\u2028two\x85three", "second\rline", "last"]
    (tmp_path / "b.jsonl").write_bytes('{"text": "a\u2028b"}\r\n{"text": "c\x85d\u2029e"}\n'.encode())  # valid JSON
    assert read_texts(str(tmp_path / "b.jsonl")) == ["a\u2028b", "c\x85d\u2029e"]


@pytest.mark.parametrize("name, content, column, says", [
    ("a.txt", b"caf\xe9\n", None, r"--members .*a\.txt: not UTF-8 \(invalid continuation byte at byte 3\)"),
    ("a.txt", b"one\n", "body", "is a text file .*--column needs .jsonl or a dataset"),
    ("a.txt", b"\n  \r\n\n", None, "holds no texts"),
    ("a.jsonl", b'{"text": "a"}\nnot json\n', None, "line 2 is not JSON"),
    ("a.jsonl", b'{"text": 3}\n', None, "line 1: column 'text' is not text"),
    ("a.jsonl", b"[1]\n", None, r"line 1 has no column 'text' \(it has list\)"),
    ("a.jsonl", b'{"text": " "}\n', None, "holds no texts"),
])
def test_bad_input_is_one_config_error_naming_the_file_and_the_fix(tmp_path, name, content, column, says):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ConfigError, match=says):
        read_texts(str(tmp_path / name), column)


def test_a_missing_file_is_named_with_its_flag(tmp_path):
    with pytest.raises(ConfigError, match=r"^--non-members .*none\.txt: no such file"):
        read_texts(str(tmp_path / "none.txt"), what="non-members")
