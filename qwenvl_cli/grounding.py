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
from collections.abc import Sequence

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


def json_box(box: Sequence[int], label: str | None) -> str:
    """Qwen2.5-VL/Qwen3-VL's markup: `{"bbox_2d": [x1, y1, x2, y2], "label": "…"}`."""
    entry: dict = {"bbox_2d": [int(v) for v in box]}
    if label is not None:
        entry["label"] = label
    return json.dumps(entry, ensure_ascii=False)
