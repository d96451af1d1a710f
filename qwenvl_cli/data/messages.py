"""The `messages` data format (LLaMA-Factory / ms-swift style), converted on read into qwenvl's own sample.

    {"messages": [{"role": "user", "content": "<image>What is this?"}, {"role": "assistant", "content": "..."}],
     "images": ["a.jpg"]}

becomes {"id": ..., "conversations": [{"from": "user", "value": "Picture 1: <img>a.jpg</img>\\nWhat is this?"}, ...]}:
each `<image>` placeholder, in order across the messages, is replaced by the next picture of `images`. Problems
(a count of placeholders that is not len(images), a system message, a video) are returned beside a best-effort
conversion, so that `validate-data` can report every one of them with the field they are in
(`messages[2].content`) and training never sees the sample. Pure functions, no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
# Keys of a messages sample that the conversion consumes; any other key is carried over (and reported as unknown).
MESSAGES_KEYS = frozenset({"id", "messages", "images", "videos"})


@dataclass(slots=True)
class ConversionProblem:
    code: str
    message: str
    field: str
    fix: str | None = None


@dataclass(slots=True)
class Converted:
    sample: dict[str, Any]
    fields: list[int] = field(default_factory=list)  # turn index -> index in `messages`
    problems: list[ConversionProblem] = field(default_factory=list)


def is_messages_sample(value: Any) -> bool:
    return isinstance(value, dict) and "messages" in value and "conversations" not in value


def from_messages(value: dict[str, Any], index: int) -> Converted:
    """The internal sample of messages sample number `index` (0-based); see the module's docstring."""
    problems: list[ConversionProblem] = []
    sample: dict[str, Any] = {"id": value.get("id", f"sample-{index}")}
    for key, extra in value.items():
        if key not in MESSAGES_KEYS:
            sample[key] = extra
    messages = value["messages"]
    images = value.get("images", [])
    if images is None:
        images = []
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        problems.append(ConversionProblem("S123", "`images` is not a list of path strings", "images"))
        images = [p for p in images if isinstance(p, str)] if isinstance(images, list) else []
    if value.get("videos"):
        problems.append(ConversionProblem("S122", "the sample has `videos`: video samples are not supported", "videos"))
    if not isinstance(messages, list):
        # Let the structural checks report it as `conversations` of the wrong type.
        sample["conversations"] = messages
        return Converted(sample, [], problems)

    turns: list[Any] = []
    fields: list[int] = []
    used = 0
    placeholders = 0
    for m, message in enumerate(messages):
        if not isinstance(message, dict):
            turns.append(message)
            fields.append(m)
            continue
        role = message.get("role")
        content = message.get("content")
        if role == "system":
            problems.append(
                ConversionProblem(
                    "S121",
                    "a system message: qwenvl samples carry no system prompt of their own",
                    f"messages[{m}]",
                )
            )
            continue
        turn: dict[str, Any] = {}
        if "role" in message:
            turn["from"] = role
        if "content" in message:
            turn["value"] = content
        if isinstance(content, str):
            if VIDEO_PLACEHOLDER in content:
                problems.append(
                    ConversionProblem(
                        "S122", "a `<video>` placeholder: video samples are not supported", f"messages[{m}].content"
                    )
                )
            count = content.count(PLACEHOLDER)
            if count:
                placeholders += count
                pieces = content.split(PLACEHOLDER)
                out = [pieces[0]]
                for piece in pieces[1:]:
                    if used < len(images):
                        used += 1
                        out.append(f"Picture {used}: <img>{images[used - 1]}</img>\n")
                    else:
                        out.append(PLACEHOLDER)
                    out.append(piece)
                turn["value"] = "".join(out)
        turns.append(turn)
        fields.append(m)
    if placeholders != len(images):
        problems.append(
            ConversionProblem(
                "S120",
                f"{placeholders} `<image>` placeholder(s) in the messages but {len(images)} path(s) in `images`",
                "images",
            )
        )
    sample["conversations"] = turns
    return Converted(sample, fields, problems)


_PICTURE = re.compile(r"(?:Picture \d+: ?)?<img>(.*?)</img>\n?", re.DOTALL)


def to_messages(sample: dict[str, Any]) -> dict[str, Any]:
    """An internal sample in the `messages` format: each `Picture N: <img>PATH</img>\\n` → `<image>` and PATH
    appended to `images` (from_messages gives the sample back)."""
    images: list[str] = []

    def picture(match: re.Match) -> str:
        images.append(match.group(1))
        return PLACEHOLDER

    messages = [
        {"role": turn["from"], "content": _PICTURE.sub(picture, turn["value"])} for turn in sample["conversations"]
    ]
    out: dict[str, Any] = {"id": sample["id"], "messages": messages} if "id" in sample else {"messages": messages}
    if images:
        out["images"] = images
    return out
