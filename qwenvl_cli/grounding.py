"""Boxes between coordinate systems (docs/families.md §4): the data's relative [0,1000) numbers → what each
Qwen generation learns. Pure functions; `smart_resize` alone imports transformers (lazily), so that the
numbers are those of the processor that feeds the model.

- Qwen-VL v1, Qwen2-VL, Qwen3-VL: relative 0–1000, the same numbers as the data (clamped to [0, 1000]).
- Qwen2.5-VL: absolute pixels of the smart-resized picture, a = round(n / 1000 · W′) clamped to [0, W′ − 1]
  (y with H′), so the numbers depend on the processor's min/max pixels.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

Box = tuple[int, int, int, int]  # x1, y1, x2, y2


def _round(value: float) -> int:
    """Half away from zero (Python's round() rounds half to even)."""
    return math.floor(value + 0.5) if value >= 0 else -math.floor(-value + 0.5)


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(H′, W′): the size the Qwen2-VL-style image processor resizes a H×W picture to (transformers' own)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as resize

    resized_h, resized_w = resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    return int(resized_h), int(resized_w)


def clamp_relative(box: Sequence[int]) -> Box:
    """Relative numbers as Qwen2-VL/Qwen3-VL learn them: unchanged, clamped to [0, 1000]."""
    x1, y1, x2, y2 = (min(1000, max(0, int(v))) for v in box)
    return x1, y1, x2, y2


def relative_to_absolute(box: Sequence[int], resized_w: int, resized_h: int) -> Box:
    """Relative [0,1000) → Qwen2.5-VL's absolute pixels of the W′×H′ picture the model is fed."""
    x1, y1, x2, y2 = box
    sx, sy = resized_w / 1000, resized_h / 1000
    return (
        min(resized_w - 1, max(0, _round(x1 * sx))),
        min(resized_h - 1, max(0, _round(y1 * sy))),
        min(resized_w - 1, max(0, _round(x2 * sx))),
        min(resized_h - 1, max(0, _round(y2 * sy))),
    )


def absolute_to_relative(box: Sequence[int], resized_w: int, resized_h: int) -> Box:
    """Qwen2.5-VL's absolute pixels of a W′×H′ picture → relative 0–1000."""
    x1, y1, x2, y2 = box
    return clamp_relative(
        (
            _round(x1 / resized_w * 1000),
            _round(y1 / resized_h * 1000),
            _round(x2 / resized_w * 1000),
            _round(y2 / resized_h * 1000),
        )
    )


def pixels_to_relative(box: Sequence[float], width: int, height: int) -> Box:
    """A box in original pixels → relative 0–1000 (the data's convention)."""
    x1, y1, x2, y2 = box
    return clamp_relative(
        (_round(x1 / width * 1000), _round(y1 / height * 1000), _round(x2 / width * 1000), _round(y2 / height * 1000))
    )


def special_token_box(box: Sequence[int], label: str | None) -> str:
    """Qwen2-VL's markup: `<|object_ref_start|>label<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>`."""
    x1, y1, x2, y2 = box
    ref = f"<|object_ref_start|>{label}<|object_ref_end|>" if label is not None else ""
    return f"{ref}<|box_start|>({x1},{y1}),({x2},{y2})<|box_end|>"


def data_box(box: Sequence[int], label: str | None) -> str:
    """The data format's markup: `<ref>label</ref><box>(x1,y1),(x2,y2)</box>` (no `<ref>` without a label)."""
    x1, y1, x2, y2 = box
    ref = f"<ref>{label}</ref>" if label is not None else ""
    return f"{ref}<box>({x1},{y1}),({x2},{y2})</box>"


def json_box(box: Sequence[int], label: str | None) -> str:
    """Qwen2.5-VL/Qwen3-VL's markup: `{"bbox_2d": [x1, y1, x2, y2], "label": "…"}`."""
    entry: dict = {"bbox_2d": [int(v) for v in box]}
    if label is not None:
        entry["label"] = label
    return json.dumps(entry, ensure_ascii=False)


# -- reading boxes in a model's answer (never raises: a model's output may be malformed) ----------------------
# The convention each family's numbers are in (by `Generation.box_style`; None: Qwen-VL v1's <ref>/<box> markup)
CONVENTIONS = {
    None: "relative-1000",
    "tokens": "relative-1000",
    "relative": "relative-1000",
    "absolute": "resized-pixels",
}


def family_box_style(family) -> str | None:
    """A family's box convention (hf_vl `Generation.box_style`: "tokens", "absolute", "relative"); None for Qwen-VL
    v1's `<ref>/<box>` markup."""
    return getattr(getattr(family, "generation", None), "box_style", None)


@dataclass(frozen=True)
class AnswerBox:
    """One box found in an answer: its label, the family's own numbers, and where its text is in the answer."""

    label: str | None
    numbers: tuple[float, float, float, float]
    start: int
    end: int


_NUMBER = r"\s*(-?\d+(?:\.\d+)?)\s*"
_TOKEN_BOX = re.compile(
    r"(?:<\|object_ref_start\|>(?P<label>.*?)<\|object_ref_end\|>\s*)?<\|box_start\|>\s*\("
    + _NUMBER
    + ","
    + _NUMBER
    + r"\)\s*,\s*\("
    + _NUMBER
    + ","
    + _NUMBER
    + r"\)\s*<\|box_end\|>",
    re.DOTALL,
)


def _number(value: float) -> float:
    """An integral number as int (so that it prints as the model wrote it)."""
    return int(value) if float(value).is_integer() else float(value)


def special_token_boxes(text: str) -> list[AnswerBox]:
    """Boxes in Qwen2-VL's markup (`<|object_ref_start|>l<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>`;
    Qwen2.5-VL may write it too, with its own numbers)."""
    found = []
    for match in _TOKEN_BOX.finditer(text):
        numbers = tuple(_number(float(match.group(i))) for i in range(2, 6))
        found.append(AnswerBox(match.group("label"), numbers, match.start(), match.end()))  # type: ignore[arg-type]
    return found


def _box_entry(value) -> tuple[str | None, tuple[float, float, float, float]] | None:
    if not isinstance(value, dict):
        return None
    box = value.get("bbox_2d", value.get("bbox"))
    if not isinstance(box, list | tuple) or len(box) != 4:
        return None
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in box):
        return None
    label = value.get("label")
    return (str(label) if label is not None else None), tuple(_number(v) for v in box)  # type: ignore[return-value]


def json_boxes(text: str) -> list[AnswerBox]:
    """Boxes written as JSON objects `{"bbox_2d": [x1, y1, x2, y2], "label": …}` anywhere in `text` (alone, in a
    list, inside a ```json fence); an object that does not parse or has no four numbers is skipped."""
    decoder = json.JSONDecoder()
    found: list[AnswerBox] = []
    index = text.find("{")
    while index != -1:
        try:
            value, end = decoder.raw_decode(text, index)
        except ValueError:
            index = text.find("{", index + 1)
            continue
        entry = _box_entry(value)
        if entry is not None:
            found.append(AnswerBox(entry[0], entry[1], index, end))
            index = text.find("{", end)
        else:
            index = text.find("{", index + 1)
    return found


def answer_boxes(text: str, style: str | None) -> list[AnswerBox]:
    """The boxes of a family's answer, in order: JSON objects for Qwen2.5-VL/Qwen3-VL (and the special-token form,
    which they also write), the special-token form for Qwen2-VL."""
    if not isinstance(text, str):
        return []
    tokens = special_token_boxes(text)
    if style == "tokens":
        return tokens
    return sorted(json_boxes(text) + tokens, key=lambda box: box.start)


def to_relative(numbers: Sequence[float], style: str | None, resized: tuple[int, int] | None = None) -> Box:
    """A family's box numbers → relative 0–1000 (the data's numbers). `resized` (H′, W′) is needed for
    Qwen2.5-VL's absolute pixels."""
    if CONVENTIONS.get(style) == "resized-pixels" and resized is not None:
        height, width = resized
        return absolute_to_relative(numbers, width, height)
    return clamp_relative([_round(v) for v in numbers])


def to_pixels(
    numbers: Sequence[float], style: str | None, width: int, height: int, resized: tuple[int, int] | None = None
) -> Box:
    """A family's box numbers → pixels of the W×H picture itself (`resized` (H′, W′) for Qwen2.5-VL)."""
    x1, y1, x2, y2 = numbers
    if CONVENTIONS.get(style) == "resized-pixels" and resized is not None:
        scale_x, scale_y = width / resized[1], height / resized[0]
    else:
        scale_x, scale_y = width / 1000, height / 1000
    return (
        min(width, max(0, _round(x1 * scale_x))),
        min(height, max(0, _round(y1 * scale_y))),
        min(width, max(0, _round(x2 * scale_x))),
        min(height, max(0, _round(y2 * scale_y))),
    )


def to_data_markup(text: str, style: str | None, resized: tuple[int, int] | None = None) -> str:
    """A family's answer with its boxes written back as the data format's `<ref>l</ref><box>(x1,y1),(x2,y2)</box>`
    (relative, below 1000), so that a saved chat can be trained on. A JSON list or ```json fence that holds only
    boxes is replaced as a whole."""
    boxes = answer_boxes(text, style)
    if not boxes:
        return text

    def markup(box: AnswerBox) -> str:
        return data_box([min(999, v) for v in to_relative(box.numbers, style, resized)], box.label)

    out, cursor = [], 0
    for box in boxes:
        if box.start < cursor:
            continue
        out += [text[cursor : box.start], markup(box)]
        cursor = box.end
    out.append(text[cursor:])
    joined = "".join(out)
    return _MARKUP_LIST.sub(
        lambda m: re.sub(r"</box>[\s,]+(?=<)", "</box> ", (m.group(1) or m.group(2)).strip(" ,\n")), joined
    )


# A ```json fence or a JSON list left holding only rewritten boxes (separators, white space)
_BOXES = r"((?:\s*(?:<ref>[^<]*</ref>)?<box>[^<]*</box>[\s,]*)+)"
_MARKUP_LIST = re.compile(r"```(?:json)?\s*\[?" + _BOXES + r"\]?\s*```|\[" + _BOXES + r"\]")
