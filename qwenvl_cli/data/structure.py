"""Structural and markup checks of one sample at a time (no I/O).

`SampleChecker.check` is the hot loop of `validate-data`: it is written to touch each value once and
to skip the markup scanner for text without `<`.
"""

from __future__ import annotations

import json
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..markup import Span, parse_box_text, parse_quad_text, scan_markup, snippet

KNOWN_SAMPLE_KEYS = frozenset({"id", "conversations"})
ROLE_HINTS = {
    "human": "user",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "ai": "assistant",
    "chatgpt": "assistant",
    "answer": "assistant",
    "question": "user",
}

# (code, message, turn, snippet, fix-override)
Emit = Callable[[str, str, "int | None", "str | None", "str | None"], None]


@dataclass(slots=True)
class ImageRef:
    """One `<img>` of a sample, to be checked on disk or on the network."""

    path: str
    sample_index: int
    turn: int
    line: int
    sample_id: str | None


@dataclass(slots=True)
class CheckedSample:
    """What the later stages need from a structurally checked sample."""

    turns: list[tuple[str, str]] | None  # (role, value) when every turn is well-formed
    images: list[ImageRef]


def _role_fix(role: Any) -> str | None:
    if not isinstance(role, str):
        return "`from` must be the string `user` or `assistant`."
    lowered = role.strip().lower()
    if lowered in ("user", "assistant"):
        return f"Write `{lowered}` exactly (lower case, no spaces)."
    if lowered in ROLE_HINTS:
        return f"Rename `{role}` to `{ROLE_HINTS[lowered]}`."
    if lowered == "system":
        return "Remove the system turn: the chat template sets the system prompt (`You are a helpful assistant.`)."
    return None


class SampleChecker:
    """Checks samples of one file; remembers ids and conversations to find duplicates."""

    def __init__(self) -> None:
        self._ids: dict[str, int] = {}  # id -> index of the first sample using it
        self._conversations: dict[int, int] = {}  # hash of the turns -> index of the first sample
        self._lines = array("l")  # line of each sample checked so far

    def _where(self, index: int) -> str:
        return f"sample #{index} (line {self._lines[index]})"

    def check(self, index: int, line: int, sample: Any, emit: Emit) -> CheckedSample:
        """Check sample number `index` (0-based, consecutive) starting on `line`, reporting through `emit`."""
        self._lines.append(line)
        if not isinstance(sample, dict):
            emit("S101", f"sample is a JSON {_json_type(sample)}, not an object", None, _short(sample), None)
            return CheckedSample(None, [])

        sample_id: str | None = None
        if "id" not in sample:
            emit("S102", "the sample has no `id`", None, None, None)
        else:
            raw_id = sample["id"]
            if not isinstance(raw_id, str):
                emit("S103", f"`id` is a JSON {_json_type(raw_id)} ({_short(raw_id)})", None, None, None)
                sample_id = str(raw_id)
            elif not raw_id.strip():
                emit("S104", "`id` is empty", None, None, None)
            else:
                sample_id = raw_id
                first = self._ids.setdefault(raw_id, index)
                if first != index:
                    emit("S105", f"id {raw_id!r} is already used by {self._where(first)}", None, None, None)

        if len(sample) > 2 or not KNOWN_SAMPLE_KEYS.issuperset(sample):
            extra = [k for k in sample if k not in KNOWN_SAMPLE_KEYS]
            if extra:
                keys = ", ".join(f"`{k}`" for k in extra)
                emit("S119", f"unknown key(s) {keys} are ignored by training", None, None, None)

        if "conversations" not in sample:
            emit("S106", "the sample has no `conversations`", None, None, None)
            return CheckedSample(None, [])
        conversations = sample["conversations"]
        if not isinstance(conversations, list):
            emit("S107", f"`conversations` is a JSON {_json_type(conversations)}", None, _short(conversations), None)
            return CheckedSample(None, [])
        if not conversations:
            emit("S108", "`conversations` is empty", None, None, None)
            return CheckedSample(None, [])

        turns: list[tuple[str, str]] | None = []
        images: list[ImageRef] = []
        previous_role: str | None = None
        pictures = 0
        for t, turn in enumerate(conversations):
            if not isinstance(turn, dict):
                emit("S109", f"turn {t} is a JSON {_json_type(turn)}", t, _short(turn), None)
                turns = None
                previous_role = None
                continue
            role = turn.get("from")
            value = turn.get("value")
            if role is None:
                if "from" in turn:
                    emit("S110", f"turn {t}'s `from` is null", t, None, None)
                else:
                    keys = ", ".join(f"`{k}`" for k in turn) or "no keys"
                    emit("S110", f"turn {t} has no `from` (it has {keys})", t, None, None)
            elif role != "user" and role != "assistant":
                emit("S113", f"turn {t} has role {_short(role)}", t, None, _role_fix(role))
                role = None
            elif t == 0 and role != "user":
                emit("S114", "the first turn is from the assistant", t, _text_snippet(value), None)
            elif previous_role is not None and role == previous_role:
                emit("S115", f"turns {t - 1} and {t} are both from the {role}", t, _text_snippet(value), None)
            previous_role = role

            if value is None:
                if "value" not in turn:
                    emit("S111", f"turn {t} has no `value`", t, None, None)
                else:
                    emit("S112", f"turn {t}'s `value` is null", t, None, None)
                turns = None
                continue
            if not isinstance(value, str):
                emit("S112", f"turn {t}'s `value` is a JSON {_json_type(value)}", t, _short(value), None)
                turns = None
                continue
            if not value.strip():
                emit("S117", f"turn {t}'s `value` is empty", t, None, None)
            elif "<" in value:
                pictures = self._check_markup(
                    value, t, role == "assistant", pictures, index, line, sample_id, images, emit
                )
            if turns is not None:
                if role is None:
                    turns = None
                else:
                    turns.append((role, value))

        last = conversations[-1]
        if isinstance(last, dict) and last.get("from") == "user":
            emit("S116", "the last turn is from the user", len(conversations) - 1, None, None)

        if turns:
            key = hash(tuple(turns))
            first = self._conversations.setdefault(key, index)
            if first != index:
                emit("S118", f"same conversation as {self._where(first)}", None, _text_snippet(turns[0][1]), None)
        return CheckedSample(turns or None, images)

    def _check_markup(
        self,
        value: str,
        t: int,
        assistant: bool,
        pictures: int,
        index: int,
        line: int,
        sample_id: str | None,
        images: list[ImageRef],
        emit: Emit,
    ) -> int:
        scan = scan_markup(value)
        for problem in scan.problems:
            emit(problem.code, problem.message, t, snippet(value, problem.offset), None)
        spans = scan.spans
        for i, span in enumerate(spans):
            kind = span.kind
            if kind == "text":
                continue
            if kind == "img":
                pictures += 1
                self._check_picture(span, value, t, assistant, pictures, emit)
                if span.content.strip():
                    images.append(ImageRef(span.content, index, t, line, sample_id))
            elif kind == "ref":
                following = _next_markup(spans, i)
                if following is None or following.kind not in ("box", "quad"):
                    emit(
                        "M207",
                        f"<ref>{span.content}</ref> is not followed by a <box>",
                        t,
                        snippet(value, span.start),
                        None,
                    )
            elif kind == "box":
                result = parse_box_text(span.content)
                if result.code is not None:
                    emit(result.code, result.message, t, snippet(value, span.start), None)
            else:
                result = parse_quad_text(span.content)
                if result.code is not None:
                    emit(result.code, result.message, t, snippet(value, span.start), None)
        return pictures

    @staticmethod
    def _check_picture(span: Span, value: str, t: int, assistant: bool, number: int, emit: Emit) -> None:
        if span.label and span.number == number and not assistant and span.content.strip():
            return  # the common case: nothing to report
        where = snippet(value, span.start)
        if not span.content.strip():
            emit("M209", "<img></img> holds no path", t, where, None)
        if assistant:
            emit("M206", f"picture {number} is in an assistant turn", t, where, None)
        if span.number is not None and span.number != number:
            emit(
                "M205",
                f"labelled Picture {span.number} but it is picture {number} of the conversation",
                t,
                where,
                f"Write `Picture {number}: ` (pictures count 1, 2, 3… across all turns).",
            )
        if not span.label:
            if span.loose_label:
                emit("M208", f"label {span.loose_label!r} is not the trained form 'Picture {number}: '", t, where, None)
            else:
                emit("M208", f"picture {number} has no `Picture {number}: ` label", t, where, None)


def _next_markup(spans: list[Span], i: int) -> Span | None:
    for span in spans[i + 1 :]:
        if span.kind != "text" or span.content.strip():
            return span
    return None


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    return "object"


def _short(value: Any, width: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= width else text[: width - 1] + "…"


def _text_snippet(value: Any) -> str | None:
    return snippet(value, 0) if isinstance(value, str) else None
