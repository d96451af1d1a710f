"""The streaming reader gives the same samples, lines and errors whatever its window size."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwenvl_cli.data import reader
from qwenvl_cli.data.reader import DataFile, DataFileError

texts = st.text(alphabet=st.sampled_from(list('ab <>/()\n"\\é图😀,[]{}')), max_size=12)
samples = st.lists(
    st.fixed_dictionaries({"id": texts, "conversations": st.lists(st.fixed_dictionaries({"value": texts}))}),
    max_size=6,
)


def read_all(path):
    return [(r.index, r.line, r.value) for r in DataFile.open(path).records()]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=samples, indent=st.sampled_from([None, 0, 1, 2]), chunk=st.integers(1, 64), ascii_only=st.booleans())
def test_json_list_is_read_the_same_with_any_window(tmp_path, monkeypatch, data, indent, chunk, ascii_only):
    path = tmp_path / "d.json"
    text = json.dumps(data, indent=indent, ensure_ascii=ascii_only)
    path.write_text(text, "utf-8")
    monkeypatch.setattr(reader, "CHUNK_BYTES", chunk)
    records = read_all(path)
    assert [value for _, _, value in records] == data
    # Each sample starts on the line where its `{` stands.
    lines = text.split("\n")
    for _, line, _ in records:
        assert lines[line - 1].lstrip(" [,").startswith("{")


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 4096])
def test_errors_keep_their_line_and_column_across_windows(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(reader, "CHUNK_BYTES", chunk)
    good = json.dumps({"id": "图", "conversations": []}, ensure_ascii=False)
    path = tmp_path / "broken.json"
    path.write_text(f"[\n  {good},\n  {good},\n  {{\"id\": 'x'}}\n]\n", "utf-8")
    with pytest.raises(DataFileError) as caught:
        read_all(path)
    problem = caught.value.problem
    assert (problem.code, problem.line, problem.column) == ("F004", 4, 10)
    minified = tmp_path / "minified.json"
    minified.write_text(f"[{good},{good} {good}]", "utf-8")
    with pytest.raises(DataFileError) as caught:
        read_all(minified)
    assert (caught.value.problem.line, caught.value.problem.column) == (1, 2 + 2 * len(good) + 2)
    assert "expected `,` or `]`" in caught.value.problem.message


@pytest.mark.parametrize("chunk", [1, 3, 4096])
def test_non_utf8_byte_in_a_json_list_is_located(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(reader, "CHUNK_BYTES", chunk)
    path = tmp_path / "latin1.json"
    path.write_bytes('[\n {"id": "é"},\n {"id": "'.encode() + "café".encode("latin-1") + b'"}\n]')
    with pytest.raises(DataFileError) as caught:
        read_all(path)
    problem = caught.value.problem
    assert (problem.code, problem.line, problem.column) == ("F003", 3, 13)
    assert "0xe9" in problem.message


def test_trailing_content_and_unclosed_list(tmp_path):
    for text, message in [("[{}] x", "extra data"), ("[{}", "never closed"), ("[{},]", "trailing comma")]:
        path = tmp_path / "t.json"
        path.write_text(text, "utf-8")
        with pytest.raises(DataFileError, match=message):
            read_all(path)


def test_jsonl_bad_utf8_line_is_one_bad_sample(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"id": "a"}\n  {"id": "caf\xe9"}\n{"id": "b"}\n')
    records = list(DataFile.open(path).records())
    assert [r.value for r in records] == [{"id": "a"}, None, {"id": "b"}]
    problem = records[1].problem
    assert (problem.code, problem.line, problem.column, problem.fatal) == ("F003", 2, 14, False)


def test_records_can_be_read_twice(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"id": str(i)} for i in range(5)]), "utf-8")
    data = DataFile.open(path)
    assert [r.value for r in data.records()] == [r.value for r in data.records()]
