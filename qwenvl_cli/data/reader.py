"""Streaming reader for data files: a JSON list or JSONL, one sample at a time.

Neither format is ever held whole in memory: JSONL is read line by line (a bad line is one bad sample,
not a bad file), a JSON list is decoded through a sliding window of text a few MiB wide. So memory stays
flat however large the file is, and a byte that is not UTF-8 or a syntax error is reported with its
exact line and column.
"""

from __future__ import annotations

import codecs
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

from .boxes import CONVENTIONS, QWEN25_DEFAULT_RESIZE, BoxError, Pictures, to_internal
from .messages import ConversionProblem, from_messages, is_messages_sample

CHUNK_BYTES = 8 << 20
BOM = b"\xef\xbb\xbf"
JSONL_SUFFIXES = (".jsonl", ".ndjson")
_WS = re.compile(r"[ \t\n\r]*")
_decoder = json.JSONDecoder()


@dataclass(slots=True)
class FileProblem:
    """A problem with the file as a whole (or with one JSONL line when `fatal` is False)."""

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
    index: int  # 0-based position of the sample in the file
    line: int  # 1-based line where the sample starts
    value: Any = None
    problem: FileProblem | None = None  # set when this JSONL line is not UTF-8 or not JSON
    # A sample in the `messages` format (data/messages.py) is converted on read: `value` is the internal sample,
    # `original` what the file holds, `fields[t]` the index in `messages` of turn t, `conversion` its problems.
    original: Any = None
    fields: list[int] | None = None
    conversion: list | None = None


class DataFile:
    """A data file whose format has been recognised. `open()` raises DataFileError for a missing,
    empty or unrecognisable file; `records()` streams the samples (and can be called again)."""

    def __init__(self, path: Path, fmt: Literal["json", "jsonl"], size: int):
        self.path = path
        self.format = fmt
        self.size = size
        self.boxes: str | None = None  # --boxes: the box convention of every sample, over their `boxes` keys
        self.pictures: Pictures | None = None  # sizes of pictures, for conventions in pixels

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        boxes: str | None = None,
        image_root: Path | None = None,
        resize: tuple[int, int, int] | None = None,
    ) -> DataFile:
        """`boxes`, `image_root` and `resize` (Qwen2.5-VL's factor, min and max pixels) only matter to files whose
        boxes are declared in another convention than qwen-vl (data/boxes.py)."""
        data = cls._open(Path(path))
        data.boxes = boxes
        root = Path(image_root) if image_root is not None else data.path.resolve().parent
        data.pictures = Pictures(root, resize or QWEN25_DEFAULT_RESIZE)
        return data

    @classmethod
    def _open(cls, path: Path) -> DataFile:
        if not path.exists():
            raise DataFileError(FileProblem("F001", f"{path} does not exist"))
        if not path.is_file():
            kind = "a directory" if path.is_dir() else "not a regular file"
            raise DataFileError(FileProblem("F002", f"{path} is {kind}"))
        size = path.stat().st_size
        jsonl_name = path.suffix.lower() in JSONL_SUFFIXES
        with open(path, "rb") as handle:
            first, offset = _first_byte(handle)
        if first is None:
            raise DataFileError(FileProblem("F006", f"{path} is empty"))
        if first == b"[":
            return cls(path, "json", size)
        if jsonl_name:
            return cls(path, "jsonl", size)
        if first != b"{":
            line, column, _ = _byte_line_col(path, offset)
            shown = repr(first) if first.isascii() else f"byte 0x{first[0]:02x}"
            raise DataFileError(
                FileProblem("F004", f"expected `[` (a JSON list) or `{{` (JSONL) but found {shown}", line, column)
            )
        return cls(path, _object_file_format(path), size)

    def records(self, on_progress: Callable[[int], None] | None = None) -> Iterator[Record]:
        """Yield every sample in order. Raises DataFileError when a JSON list is broken; JSONL lines
        that do not parse are yielded with `problem` set, and reading goes on."""
        with open(self.path, "rb") as handle:
            if self.format == "json":
                records = _json_list_records(handle, self.path, on_progress)
            else:
                records = _jsonl_records(handle, on_progress)
            for record in records:
                if is_messages_sample(record.value):
                    converted = from_messages(record.value, record.index)
                    record.original = record.value
                    record.value = converted.sample
                    record.fields = converted.fields
                    record.conversion = converted.problems
                if isinstance(record.value, dict) and (self.boxes is not None or "boxes" in record.value):
                    self._convert_boxes(record)
                yield record

    def _convert_boxes(self, record: Record) -> None:
        """Boxes of a declared convention → the internal markup (problems go to `record.conversion`)."""
        value = record.value
        if record.original is None:
            record.original = value
        value = record.value = dict(value)
        declared = value.pop("boxes", None)
        convention = self.boxes or declared
        problems = record.conversion = record.conversion or []
        if convention not in CONVENTIONS:
            message = f"{json.dumps(convention)} is not a box convention (one of {', '.join(CONVENTIONS)})"
            problems.append(ConversionProblem("B310", message, "boxes"))
            return
        turns = value.get("conversations")
        if convention == "qwen-vl" or not isinstance(turns, list):
            return
        out, latest = [], None
        for t, turn in enumerate(turns):
            if isinstance(turn, dict) and isinstance(turn.get("value"), str):
                where = f"messages[{record.fields[t]}].content" if record.fields else f"conversations[{t}].value"
                notes: list[BoxError] = []
                try:
                    text, latest = to_internal(turn["value"], convention, self.pictures, latest, notes)
                except BoxError as exc:
                    problems.append(ConversionProblem(exc.code, str(exc), where, exc.fix))
                    text = turn["value"]
                problems.extend(ConversionProblem(note.code, str(note), where, note.fix) for note in notes)
                turn = {**turn, "value": text}
            out.append(turn)
        value["conversations"] = out


def _first_byte(handle: BinaryIO) -> tuple[bytes | None, int]:
    """The first byte that is not white space (after a byte-order mark), and its offset."""
    offset = 0
    head = handle.read(len(BOM))
    if head == BOM:
        offset = len(BOM)
        head = b""
    while True:
        block = head + handle.read(65536)
        head = b""
        if not block:
            return None, offset
        stripped = block.lstrip(b" \t\r\n")
        if stripped:
            return stripped[:1], offset + len(block) - len(stripped)
        offset += len(block)


def _object_file_format(path: Path) -> Literal["json", "jsonl"]:
    """A `.json` file that starts with `{`: JSON Lines under another name, or one object (an error)."""
    with open(path, "rb") as handle:
        first_line = handle.readline().strip().removeprefix(BOM)
        rest_is_empty = not handle.read(65536).strip()
    try:
        single = json.loads(first_line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        single = None
    if isinstance(single, dict):
        if rest_is_empty:
            raise DataFileError(FileProblem("F005", _single_object_message(single)))
        return "jsonl"
    # The first line is not a whole object: a pretty-printed object, or broken JSON Lines.
    try:
        whole = json.loads(path.read_bytes().removeprefix(BOM))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "jsonl"  # report it line by line
    raise DataFileError(FileProblem("F005", _single_object_message(whole)))


def _jsonl_records(handle: BinaryIO, on_progress: Callable[[int], None] | None) -> Iterator[Record]:
    loads = json.loads
    index = 0
    done = 0
    for number, raw in enumerate(handle, 1):
        done += len(raw)
        if number == 1 and raw.startswith(BOM):
            raw = raw[len(BOM) :]
        stripped = raw.strip()
        if not stripped:
            continue
        indent = len(raw) - len(raw.lstrip())
        try:
            text = stripped.decode("utf-8")
        except UnicodeDecodeError as exc:
            column = indent + exc.start + 1
            message = f"byte 0x{stripped[exc.start]:02x} at column {column} is not UTF-8"
            yield Record(index, number, None, FileProblem("F003", message, number, column, fatal=False))
        else:
            try:
                yield Record(index, number, loads(text))
            except json.JSONDecodeError as exc:
                message = "extra data after the JSON object on this line" if exc.msg == "Extra data" else exc.msg
                column = indent + exc.pos + 1
                yield Record(index, number, None, FileProblem("F004", message, number, column, fatal=False))
        index += 1
        if on_progress is not None and index % 4096 == 0:
            on_progress(done)
    if on_progress is not None:
        on_progress(done)


class _Window:
    """A sliding window of decoded text over a binary file, with line/column bookkeeping."""

    def __init__(self, handle: BinaryIO, path: Path):
        self.handle = handle
        self.path = path
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.text = ""
        self.eof = False
        self.bytes_read = 0
        self.line = 1  # line number at position `line_pos` of `text`
        self.line_pos = 0
        self.column_base = 0  # characters of text[0]'s line that were already dropped
        self.first = True

    def more(self, keep_from: int) -> int:
        """Drop text before `keep_from`, append the next chunk; returns the shift applied to positions."""
        text = self.text
        if keep_from:
            self.line += text.count("\n", self.line_pos, keep_from)
            last_newline = text.rfind("\n", 0, keep_from)
            self.column_base = keep_from - last_newline - 1 if last_newline >= 0 else self.column_base + keep_from
            self.line_pos = 0
        chunk = self.handle.read(CHUNK_BYTES)
        pending = len(self.decoder.getstate()[0])
        start = self.bytes_read
        self.bytes_read += len(chunk)
        if self.first:
            chunk = chunk.removeprefix(BOM)
            start += self.bytes_read - start - len(chunk)
            self.first = False
        try:
            decoded = self.decoder.decode(chunk, final=not chunk)
        except UnicodeDecodeError as exc:
            line, column, bad = _byte_line_col(self.path, start - pending + exc.start)
            raise DataFileError(
                FileProblem("F003", f"byte 0x{bad:02x} at line {line}, column {column} is not UTF-8", line, column)
            ) from None
        if not chunk:
            self.eof = True
        self.text = text[keep_from:] + decoded
        return keep_from

    def where(self, pos: int) -> tuple[int, int]:
        text = self.text
        line = self.line + text.count("\n", self.line_pos, pos)
        last_newline = text.rfind("\n", 0, pos)
        column = pos - last_newline if last_newline >= 0 else self.column_base + pos + 1
        return line, column

    def fail(self, pos: int, message: str) -> DataFileError:
        line, column = self.where(pos)
        return DataFileError(FileProblem("F004", message, line, column))


def _json_list_records(handle: BinaryIO, path: Path, on_progress: Callable[[int], None] | None) -> Iterator[Record]:
    window = _Window(handle, path)
    decode, ws = _decoder.raw_decode, _WS.match
    JSONDecodeError = json.JSONDecodeError
    window.more(0)
    text = window.text
    pos = ws(text, 0).end()
    # DataFile.open has seen the `[`.
    pos += 1
    index = 0
    expect_value = True  # after `[` or `,`
    while True:
        pos = ws(text, pos).end()
        while pos >= len(text) and not window.eof:
            pos -= window.more(pos)
            text = window.text
            pos = ws(text, pos).end()
        if pos >= len(text):
            raise window.fail(pos, "the list is never closed with `]`")
        char = text[pos]
        if expect_value:
            if char == "]":
                if index:
                    raise window.fail(pos, "trailing comma before `]`")
                pos += 1
                break
            try:
                value, end = decode(text, pos)
            except JSONDecodeError as exc:
                if window.eof or (exc.pos < len(text) - 16 and not exc.msg.startswith("Unterminated string")):
                    raise window.fail(exc.pos, exc.msg) from None
                pos -= window.more(pos)
                text = window.text
                continue
            if end >= len(text) - 1 and not window.eof:
                pos -= window.more(pos)  # the value may continue in the next chunk: decode it again
                text = window.text
                continue
            line, window.line_pos = window.line + text.count("\n", window.line_pos, pos), pos
            window.line = line
            yield Record(index, line, value)
            index += 1
            if on_progress is not None and index % 4096 == 0:
                on_progress(window.bytes_read)
            pos = end
            expect_value = False
        elif char == ",":
            pos += 1
            expect_value = True
        elif char == "]":
            pos += 1
            break
        else:
            raise window.fail(pos, "expected `,` or `]` after a sample")
    # Nothing but white space may follow the list.
    while True:
        pos = ws(text, pos).end()
        if pos < len(text):
            raise window.fail(pos, "extra data after the closing `]`")
        if window.eof:
            break
        pos -= window.more(pos)
        text = window.text
    if on_progress is not None:
        on_progress(window.bytes_read)


def _byte_line_col(path: Path, offset: int) -> tuple[int, int, int]:
    """1-based line and byte column of byte `offset` in the file, and that byte (read again: error paths only)."""
    with open(path, "rb") as handle:
        before = handle.read(max(0, offset))
        at = handle.read(1)
    return before.count(b"\n") + 1, offset - (before.rfind(b"\n") + 1) + 1, at[0] if at else 0


def _single_object_message(obj: Any) -> str:
    if isinstance(obj, dict):
        if "conversations" in obj or "messages" in obj:
            return "the file holds a single sample object; wrap it in a list: [ {...} ]"
        for key, value in obj.items():
            if isinstance(value, list) and value and isinstance(value[0], dict):
                return (
                    f"the file holds one JSON object, not a list; its samples seem to be under the key "
                    f"{key!r}: save that list itself as the top level"
                )
    return "the file holds one JSON object, not a list of samples"
