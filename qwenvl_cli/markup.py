"""Parser and formatter for the markup inside a message: pictures, refs, boxes and quads.

`scan_markup` is the single scanner: it never raises, keeps every character of the input, and
reports problems (unclosed, stray or nested tags, control tokens) with their offsets. `parse_markup`
turns its result into the typed spans of `schemas`, and `format_markup` writes them back, so
`format_markup(parse_markup(s)) == s` for any well-formed `s`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .schemas import (
    Box,
    BoxSpan,
    MarkupSpan,
    PictureSpan,
    Quad,
    QuadSpan,
    RefSpan,
    TextSpan,
    box_problem,
    coordinate_problem,
)

TAG_NAMES = ("img", "ref", "box", "quad")
_TAG_RE = re.compile(r"<(/?)(img|ref|box|quad)>")
# Control tokens of the Qwen tokenizer that must never appear as typed text.
CONTROL_TOKEN_RE = re.compile(r"<\|(?:endoftext|im_start|im_end|extra_\d+)\|>|<imgpad>")
# The label the model was trained with, directly before `<img>`.
_LABEL_RE = re.compile(r"Picture (\d+): \Z")
_LOOSE_LABEL_RE = re.compile(r"picture\s*(\d+)\s*[:：]?\s*\Z", re.IGNORECASE)
_POINT = r"\((-?\d+),(-?\d+)\)"
_BOX_RE = re.compile(rf"{_POINT},{_POINT}")
_POINT_RE = re.compile(_POINT)
_POINTS_RE = re.compile(rf"{_POINT}(?:,{_POINT})*")


@dataclass(slots=True)
class Span:
    """A piece of a scanned message. `kind` is text, picture, ref, box or quad; `content` is the
    text between the tags (the path for a picture); `start`/`end` cover the whole piece in the source,
    including a picture's label."""

    kind: str
    start: int
    end: int
    content: str
    number: int | None = None  # picture: N of a `Picture N: ` label (exact or loose)
    label: str = ""  # picture: the exact trained label, "" when absent or loose
    loose_label: str = ""  # picture: a label that is there but not in the trained form


@dataclass(slots=True)
class Problem:
    code: str
    offset: int
    message: str


@dataclass(slots=True)
class Scan:
    spans: list[Span] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


def scan_markup(text: str) -> Scan:
    """Split `text` into text and markup spans, collecting every markup problem. Never raises."""
    result = Scan()
    spans, problems = result.spans, result.problems
    if "<" not in text:
        if text:
            spans.append(Span("text", 0, len(text), text))
        return result

    if "<|" in text or "<imgpad>" in text:
        for match in CONTROL_TOKEN_RE.finditer(text):
            problems.append(Problem("M204", match.start(), f"control token {match.group()} typed in the text"))

    n = len(text)
    pos = 0  # where to search for the next tag
    text_start = 0  # start of the pending text span
    search = _TAG_RE.search
    while True:
        match = search(text, pos)
        if match is None:
            break
        closing, name = match.group(1), match.group(2)
        if closing:
            problems.append(Problem("M202", match.start(), f"</{name}> has no opening <{name}>"))
            pos = match.end()
            continue
        close_tag = f"</{name}>"
        end = text.find(close_tag, match.end())
        inner = search(text, match.end(), end if end >= 0 else n)
        if end < 0:
            problems.append(Problem("M201", match.start(), f"<{name}> is never closed with </{name}>"))
            pos = match.end()
            continue
        if inner is not None:
            if inner.group(1):
                problems.append(Problem("M202", inner.start(), f"</{inner.group(2)}> inside <{name}>…</{name}>"))
            else:
                problems.append(Problem("M203", inner.start(), f"<{inner.group(2)}> opened inside <{name}>"))
            pos = end + len(close_tag)
            continue

        start = match.start()
        span = Span(name, start, end + len(close_tag), text[match.end() : end])
        if name == "img":
            label = _LABEL_RE.search(text, text_start, start)
            if label is not None:
                span.number = int(label.group(1))
                span.label = label.group()
                span.start = start = label.start()
            else:
                loose = _LOOSE_LABEL_RE.search(text, text_start, start)
                if loose is not None:
                    span.number = int(loose.group(1))
                    span.loose_label = loose.group()
        if start > text_start:
            spans.append(Span("text", text_start, start, text[text_start:start]))
        spans.append(span)
        pos = text_start = span.end
    if text_start < n:
        spans.append(Span("text", text_start, n, text[text_start:]))
    return result


@dataclass(slots=True)
class CoordsResult:
    points: list[tuple[int, int]] | None
    code: str | None = None
    message: str = ""


def parse_box_text(raw: str) -> CoordsResult:
    """Parse the inside of `<box>…</box>` and apply the box rule."""
    match = _BOX_RE.fullmatch(raw)
    if match is None:
        return CoordsResult(None, "B301", f"`{raw}` is not (x1,y1),(x2,y2) — {_malformed_hint(raw)}")
    x1, y1, x2, y2 = (int(g) for g in match.groups())
    problem = box_problem(x1, y1, x2, y2)
    if problem is not None:
        kind, message = problem
        code = "B302" if kind == "range" else "B303"
        return CoordsResult([(x1, y1), (x2, y2)], code, f"box ({x1},{y1}),({x2},{y2}): {message}")
    return CoordsResult([(x1, y1), (x2, y2)])


def parse_quad_text(raw: str) -> CoordsResult:
    """Parse the inside of `<quad>…</quad>`: four points, each coordinate in [0, 1000)."""
    if _POINTS_RE.fullmatch(raw) is None:
        return CoordsResult(None, "B301", f"`{raw}` is not a list of (x,y) points — {_malformed_hint(raw)}")
    points = [(int(x), int(y)) for x, y in _POINT_RE.findall(raw)]
    if len(points) != 4:
        return CoordsResult(points, "B304", f"quad has {len(points)} points, expected 4")
    for x, y in points:
        problem = coordinate_problem(x) or coordinate_problem(y)
        if problem:
            return CoordsResult(points, "B302", f"quad point ({x},{y}): {problem}")
    return CoordsResult(points)


def _malformed_hint(raw: str) -> str:
    if re.search(r"\d\.\d|(?<!\d)\.\d", raw):
        return "coordinates are integers in [0,1000); multiply fractions by 1000"
    if re.search(r"\s", raw):
        return "remove the spaces"
    if "[" in raw or "]" in raw:
        return "use parentheses, not brackets"
    return "write integers as (x1,y1),(x2,y2)"


class MarkupError(ValueError):
    """Raised by `parse_markup` for text whose markup is not well-formed."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        first = problems[0]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        super().__init__(f"{first.code} at offset {first.offset}: {first.message}{more}")


def parse_markup(text: str) -> list[MarkupSpan]:
    """Parse a message into typed spans. Raises MarkupError when tags are malformed; boxes that
    parse but break the coordinate rule keep `box=None` (their raw text is preserved)."""
    scan = scan_markup(text)
    if scan.problems:
        raise MarkupError(scan.problems)
    out: list[MarkupSpan] = []
    for span in scan.spans:
        if span.kind == "text":
            out.append(TextSpan(text=span.content))
        elif span.kind == "img":
            out.append(PictureSpan(path=span.content, number=span.number if span.label else None, label=span.label))
        elif span.kind == "ref":
            out.append(RefSpan(text=span.content))
        elif span.kind == "box":
            coords = parse_box_text(span.content)
            box = None
            if coords.code is None and coords.points:
                (x1, y1), (x2, y2) = coords.points
                box = Box(x1=x1, y1=y1, x2=x2, y2=y2)
            out.append(BoxSpan(raw=span.content, box=box))
        else:
            coords = parse_quad_text(span.content)
            quad = Quad(points=tuple(coords.points)) if coords.code is None and coords.points else None
            out.append(QuadSpan(raw=span.content, quad=quad))
    return out


def format_markup(spans: list[MarkupSpan]) -> str:
    """Write spans back as message text (the inverse of `parse_markup`)."""
    parts: list[str] = []
    for span in spans:
        if isinstance(span, TextSpan):
            parts.append(span.text)
        elif isinstance(span, PictureSpan):
            label = span.label or (f"Picture {span.number}: " if span.number is not None else "")
            parts.append(f"{label}<img>{span.path}</img>")
        elif isinstance(span, RefSpan):
            parts.append(f"<ref>{span.text}</ref>")
        elif isinstance(span, BoxSpan):
            parts.append(f"<box>{span.raw if span.raw or span.box is None else span.box.to_text()}</box>")
        else:
            parts.append(f"<quad>{span.raw if span.raw or span.quad is None else span.quad.to_text()}</quad>")
    return "".join(parts)


def picture_markup(number: int, path: str) -> str:
    """`Picture N: <img>PATH</img>\\n`, the form the model was trained with."""
    return f"Picture {number}: <img>{path}</img>\n"


def grounding_markup(box: Box, ref: str | None = None) -> str:
    """`<ref>REF</ref><box>(x1,y1),(x2,y2)</box>` (the ref part only when given)."""
    head = f"<ref>{ref}</ref>" if ref is not None else ""
    return f"{head}<box>{box.to_text()}</box>"


def snippet(text: str, offset: int, width: int = 60) -> str:
    """A one-line excerpt of `text` around `offset`, with ellipses where it was cut."""
    start = max(0, offset - width // 3)
    end = min(len(text), start + width)
    start = max(0, min(start, end - width))
    piece = text[start:end].replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    return ("…" if start > 0 else "") + piece + ("…" if end < len(text) else "")


def pictures_in_history(history) -> int:
    """Pictures in the queries of a chat history of (query, answer) pairs."""
    return sum(query.count("<img>") for query, _ in history)


def query_with_pictures(history, text: str, images=()) -> str:
    """`text` after a `Picture N: <img>PATH</img>\\n` line per picture, numbered on from those in `history` (as the
    training data writes a conversation's pictures)."""
    first = pictures_in_history(history) + 1
    return "".join(f"Picture {first + i}: <img>{path}</img>\n" for i, path in enumerate(images)) + text
