"""Box conventions of data files (docs/data-format.md "Box conventions"): every declared convention ↔ the internal
`<ref>label</ref><box>(x1,y1),(x2,y2)</box>` markup with numbers relative to the original picture, [0,1000).

A sample declares its convention with a `"boxes"` key (`--boxes` overrides it for a whole file); no key means
`qwen-vl`. Pictures are needed only for `qwen2.5-vl` (pixels of the processor-resized picture) and `pixels`
(pixels of the original picture): a box refers to the latest picture before it in the conversation, as in training.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import QwenvlError
from ..grounding import (
    _round,
    absolute_to_relative,
    clamp_relative,
    data_box,
    json_box,
    pixels_to_relative,
    relative_to_absolute,
    smart_resize,
    special_token_box,
    to_pixels,
)
from ..markup import parse_box_text

CONVENTIONS = ("qwen-vl", "qwen2-vl", "qwen2.5-vl", "qwen3-vl", "pixels")
DEFAULT = "qwen-vl"
# The official Qwen2.5-VL processor's budget (preprocessor_config.json of the released models): patch 14 × merge 2.
QWEN25_DEFAULT_RESIZE = (28, 3136, 12845056)  # factor, min_pixels, max_pixels

_INTERNAL = re.compile(
    r"(?:<ref>(?P<label>(?:(?!</?ref>).)*?)</ref>\s*)?<box>(?P<box>.*?)</box>|<img>(?P<img>.*?)</img>", re.DOTALL
)
_TOKENS = re.compile(
    r"(?:<\|object_ref_start\|>(?P<label>(?:(?!<\|object_ref_(?:start|end)\|>).)*?)<\|object_ref_end\|>\s*)?<\|box_start\|>(?P<box>.*?)<\|box_end\|>"
    r"|<img>(?P<img>.*?)</img>",
    re.DOTALL,
)
_JSON = re.compile(r'\{[^{}]*"bbox_2d"[^{}]*\}|<img>(?P<img>.*?)</img>', re.DOTALL)


class BoxError(ValueError):
    """A box that cannot be converted (its message names it); `code` is its check (data/checks.py)."""

    def __init__(self, message: str, code: str = "B311", fix: str | None = None):
        super().__init__(message)
        self.code, self.fix = code, fix


def _declare_fix(other: str) -> str:
    return (
        f"If the file's boxes are {other}, declare it (`--boxes`, or a `boxes` key per sample), or convert the file "
        "once: `qwenvl data convert FILE --boxes FROM --to qwen-vl --output NEW`."
    )


def _sanity(box, convention: str, size: tuple[int, int] | None, raw: str, notes: list | None) -> None:
    """Boxes that do not fit the declared convention: past their picture (error), absolute-looking numbers in a
    relative convention (error), relative-looking numbers in an absolute one on a big picture (warning)."""
    if size is None:
        if max(box) > 1000:
            raise BoxError(
                f"box {raw.strip()} has numbers over 1000 in the relative `{convention}` convention: it looks absolute",
                "B313",
                _declare_fix("pixels of the original pictures (`pixels`) or of the resized ones (`qwen2.5-vl`)"),
            )
        return
    width, height = size
    grid = "resized picture" if convention == "qwen2.5-vl" else "picture"
    x1, y1, x2, y2 = box
    if max(x1, x2) > width or max(y1, y2) > height:
        raise BoxError(
            f"box {raw.strip()} is past the {width}×{height} {grid} it refers to (`{convention}` boxes are its pixels)",
            "B312",
            _declare_fix("relative 0–1000 (`qwen-vl`, `qwen2-vl`, `qwen3-vl`)"),
        )
    if notes is not None and width > 1000 and height > 1000 and max(box) < 1000:
        notes.append(
            BoxError(
                f"box {raw.strip()} fits in [0,1000) on a {width}×{height} {grid}: it looks relative, "
                f"not `{convention}` pixels",
                "B314",
                _declare_fix("relative 0–1000 (`qwen-vl`, `qwen2-vl`, `qwen3-vl`)"),
            )
        )


@dataclass
class Pictures:
    """Sizes of the pictures of a file (opened once per path, header only)."""

    root: Path
    resize: tuple[int, int, int] = QWEN25_DEFAULT_RESIZE

    def __post_init__(self) -> None:
        self._sizes: dict[str, tuple[int, int]] = {}

    def original(self, path: str) -> tuple[int, int]:
        """(W, H) of the picture as stored."""
        if path not in self._sizes:
            from PIL import Image

            target = Path(path) if Path(path).is_absolute() else self.root / path
            try:
                with Image.open(target) as image:
                    self._sizes[path] = image.size
            except (OSError, ValueError) as exc:
                raise BoxError(f"picture {path} cannot be opened to convert its boxes ({exc})") from None
        return self._sizes[path]

    def resized(self, path: str) -> tuple[int, int]:
        """(W′, H′) of the picture after the Qwen2.5-VL processor's smart_resize."""
        width, height = self.original(path)
        factor, low, high = self.resize
        resized_h, resized_w = smart_resize(height, width, factor, low, high)
        return resized_w, resized_h


def _points(raw: str) -> tuple[int, int, int, int]:
    parsed = parse_box_text(raw)
    if parsed.points is None or len(parsed.points) != 2:
        raise BoxError(f"box {raw!r} cannot be read: {parsed.message}")
    (x1, y1), (x2, y2) = parsed.points
    return x1, y1, x2, y2


def _need(picture: str | None, raw: str, convention: str) -> str:
    if picture is None:
        raise BoxError(f"box {raw.strip()} comes before any picture, and `{convention}` boxes are pixels of a picture")
    return picture


def to_internal(
    text: str, convention: str, pictures: Pictures | None, picture: str | None, notes: list | None = None
) -> tuple[str, str | None]:
    """`text` with every box of `convention` in the internal markup, and the latest picture after it. Raises
    BoxError for a box that cannot be converted; appends warnings (BoxError too) to `notes`."""
    if convention == "qwen2-vl":
        pattern = _TOKENS
    elif convention in ("qwen2.5-vl", "qwen3-vl"):
        pattern = _JSON
    else:
        pattern = _INTERNAL
    latest = picture

    def replace(match: re.Match) -> str:
        nonlocal latest
        if match.group("img") is not None:
            latest = match.group("img")
            return match.group(0)
        if pattern is _JSON:
            try:
                entry = json.loads(match.group(0))
                numbers = entry["bbox_2d"]
                x1, y1, x2, y2 = (_round(float(v)) for v in numbers)
            except (ValueError, TypeError, KeyError):
                raise BoxError(f"{match.group(0)} is not a box {{'bbox_2d': [x1, y1, x2, y2], ...}}") from None
            label = entry.get("label")
            label = None if label is None else str(label)
        else:
            x1, y1, x2, y2 = _points(match.group("box"))
            label = match.group("label")
        box = (x1, y1, x2, y2)
        raw = match.group(0)
        if convention == "qwen2.5-vl":
            size = pictures.resized(_need(latest, raw, convention))
            _sanity(box, convention, size, raw, notes)
            box = absolute_to_relative(box, *size)
        elif convention == "pixels":
            size = pictures.original(_need(latest, raw, convention))
            _sanity(box, convention, size, raw, notes)
            box = pixels_to_relative(box, *size)
        elif convention in ("qwen2-vl", "qwen3-vl"):
            _sanity(box, convention, None, raw, notes)
            box = clamp_relative(box)
        return data_box(box, label)

    return pattern.sub(replace, text), latest


def from_internal(text: str, convention: str, pictures: Pictures | None, picture: str | None) -> tuple[str, str | None]:
    """`text` (internal markup) with every box written in `convention`, and the latest picture after it."""
    latest = picture

    def replace(match: re.Match) -> str:
        nonlocal latest
        if match.group("img") is not None:
            latest = match.group("img")
            return match.group(0)
        box = _points(match.group("box"))
        label = match.group("label")
        if convention == "qwen-vl":
            return match.group(0)
        if convention == "qwen2-vl":
            return special_token_box(clamp_relative(box), label)
        if convention == "qwen3-vl":
            return json_box(clamp_relative(box), label)
        path = _need(latest, match.group(0), convention)
        if convention == "qwen2.5-vl":
            return json_box(relative_to_absolute(box, *pictures.resized(path)), label)
        return data_box(to_pixels(box, None, *pictures.original(path)), label)

    return _INTERNAL.sub(replace, text), latest


def resize_of(model_dir: Path | None) -> tuple[tuple[int, int, int], str]:
    """Qwen2.5-VL's (factor, min_pixels, max_pixels) for pixel boxes, and where they come from: the model folder's
    image processor when it has one of the Qwen2-VL kind, else the official defaults."""
    if model_dir is not None:
        from ..families.hf_vl import image_processor, pixel_budget

        try:
            patch, merge, low, high = pixel_budget(image_processor(Path(model_dir)))
        except (QwenvlError, OSError, ValueError):  # a v1 folder (no such processor): the official budget
            pass
        else:
            return (patch * merge, low, high), f"{model_dir}'s processor (min_pixels {low:,}, max_pixels {high:,})"
    _factor, low, high = QWEN25_DEFAULT_RESIZE
    return QWEN25_DEFAULT_RESIZE, f"the official Qwen2.5-VL defaults (min_pixels {low:,}, max_pixels {high:,})"
