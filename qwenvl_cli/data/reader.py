"""Streaming reader for data files: a JSON list or JSONL, one sample at a time.

The whole file is decoded once (that is what makes UTF-8 errors precise), then samples are decoded
one by one and dropped after use, so memory stays near the file's size however many samples it holds.
Each record remembers where its text lies, so valid samples can be written out byte-for-byte.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

_WS = re.compile(r"[ \t\n\r]*")
_decoder = json.JSONDecoder()


@dataclass(slots=True)
class FileProblem:
    """A problem with the file as a whole (or one JSONL line when `fatal` is False)."""

    code: str
    message: str
    line: int | None = None
    column: int | None = None
    fatal: bool = True


class DataFileError(Exception):
    def __init__(self, problem: FileProblem):
        self.problem = problem
        super().__init__(problem.message)


@dataclass(slots=True)
class Record:
    index: int
    line: int
    start: int
    end: int
    value: Any = None
    problem: FileProblem | None = None  # set when this JSONL line does not parse


def _line_col(text: str, pos: int) -> tuple[int, int]:
    line = text.count("\n", 0, pos) + 1
    return line, pos - (text.rfind("\n", 0, pos) + 1) + 1


class DataFile:
    """An opened data file. `open()` raises DataFileError for a missing, binary or non-UTF-8 file."""

    def __init__(self, path: Path, text: str, fmt: Literal["json", "jsonl"], body_start: int):
        self.path = path
        self.text = text
        self.format = fmt
        self._body_start = body_start

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> DataFile:
        path = Path(path)
        if not path.exists():
            raise DataFileError(FileProblem("F001", f"{path} does not exist"))
        if not path.is_file():
            kind = "a directory" if path.is_dir() else "not a regular file"
            raise DataFileError(FileProblem("F002", f"{path} is {kind}"))
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = raw.count(b"\n", 0, exc.start) + 1
            column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
            raise DataFileError(
                FileProblem(
                    "F003", f"byte 0x{raw[exc.start]:02x} at line {line}, column {column} is not UTF-8", line, column
                )
            ) from None
        del raw
        pos = 1 if text.startswith("\ufeff") else 0  # tolerate a byte-order mark
        pos = _WS.match(text, pos).end()
        if pos == len(text):
            raise DataFileError(FileProblem("F006", f"{path} is empty"))
        first = text[pos]
        if first == "[":
            return cls(path, text, "json", pos)
        jsonl_name = path.suffix.lower() in (".jsonl", ".ndjson")
        if first != "{" and not jsonl_name:
            line, column = _line_col(text, pos)
            raise DataFileError(
                FileProblem("F004", f"expected `[` (JSON list) or `{{` (JSONL) but found {first!r}", line, column)
            )
        if not jsonl_name:
            # A .json file starting with `{`: one object (wrong) or JSON Lines under another name.
            try:
                obj, end = _decoder.raw_decode(text, pos)
            except json.JSONDecodeError:
                return cls(path, text, "jsonl", pos)
            if _WS.match(text, end).end() == len(text):
                raise DataFileError(FileProblem("F005", _single_object_message(obj)))
        return cls(path, text, "jsonl", pos)

    def records(self, on_progress: Callable[[int], None] | None = None) -> Iterator[Record]:
        """Yield every sample. Raises DataFileError when a JSON list is broken (JSONL lines that do
        not parse are yielded with `problem` set, and reading goes on)."""
        if self.format == "json":
            yield from self._json_records(on_progress)
        else:
            yield from self._jsonl_records(on_progress)

    def _json_records(self, on_progress: Callable[[int], None] | None) -> Iterator[Record]:
        text, ws, decode = self.text, _WS.match, _decoder.raw_decode
        n = len(text)
        pos = ws(text, self._body_start + 1).end()
        line, line_pos = 1, 0
        index = 0
        if pos < n and text[pos] == "]":
            pos += 1
        else:
            while True:
                try:
                    value, end = decode(text, pos)
                except json.JSONDecodeError as exc:
                    raise DataFileError(FileProblem("F004", exc.msg, exc.lineno, exc.colno)) from None
                line += text.count("\n", line_pos, pos)
                line_pos = pos
                yield Record(index, line, pos, end, value)
                index += 1
                if on_progress is not None and index % 4096 == 0:
                    on_progress(end)
                pos = ws(text, end).end()
                if pos >= n:
                    self._raise_at(pos, "the list is never closed with `]`")
                if text[pos] == "]":
                    pos += 1
                    break
                if text[pos] != ",":
                    self._raise_at(pos, "expected `,` or `]` after a sample")
                pos = ws(text, pos + 1).end()
                if pos < n and text[pos] == "]":
                    self._raise_at(pos, "trailing comma before `]`")
        pos = ws(text, pos).end()
        if pos < n:
            self._raise_at(pos, "extra data after the closing `]`")
        if on_progress is not None:
            on_progress(n)

    def _jsonl_records(self, on_progress: Callable[[int], None] | None) -> Iterator[Record]:
        text, decode, ws = self.text, _decoder.raw_decode, _WS.match
        n = len(text)
        pos = 1 if text.startswith("\ufeff") else 0
        line, index = 1, 0
        while pos < n:
            nl = text.find("\n", pos)
            if nl < 0:
                nl = n
            start = ws(text, pos, nl).end()
            if start < nl:
                end = nl
                while end > start and text[end - 1] in " \t\r":
                    end -= 1
                try:
                    value, stop = decode(text, start)
                    if stop != end:
                        raise json.JSONDecodeError("extra data after the JSON object on this line", text, stop)
                    yield Record(index, line, start, end, value)
                except json.JSONDecodeError as exc:
                    problem = FileProblem("F004", exc.msg, line, exc.pos - pos + 1, fatal=False)
                    yield Record(index, line, start, end, None, problem)
                index += 1
                if on_progress is not None and index % 4096 == 0:
                    on_progress(nl)
            pos = nl + 1
            line += 1
        if on_progress is not None:
            on_progress(n)

    def _raise_at(self, pos: int, message: str) -> None:
        line, column = _line_col(self.text, pos)
        raise DataFileError(FileProblem("F004", message, line, column))

    def sample_text(self, record: Record) -> str:
        return self.text[record.start : record.end]


def _single_object_message(obj: Any) -> str:
    if isinstance(obj, dict):
        if "conversations" in obj:
            return "the file holds a single sample object; wrap it in a list: [ {...} ]"
        for key, value in obj.items():
            if isinstance(value, list) and value and isinstance(value[0], dict):
                return (
                    f"the file holds one JSON object, not a list; its samples seem to be under the key "
                    f"{key!r}: save that list itself as the top level"
                )
    return "the file holds one JSON object, not a list of samples"
