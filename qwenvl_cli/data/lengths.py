"""Token-length check: the sample as training will see it (the model family's template and picture tokens;
for Qwen-VL ChatML and 258 tokens per picture), against `--max-length`, and the length distribution of the
whole file."""

from __future__ import annotations

import math
from array import array
from collections.abc import Callable, Sequence
from pathlib import Path

from ..errors import QwenvlError
from ..families import family_for
from ..families.base import picture_spans
from ..schemas import HistogramBin, LengthStats

# (code, message)
EmitLength = Callable[[str, str], None]


class LengthChecker:
    def __init__(self, model_dir: str | Path, max_length: int, image_root: Path | None = None):
        self.model_dir = Path(model_dir)
        family = family_for(self.model_dir)
        self.template = family.template(family.tokenizer(self.model_dir), image_root=image_root)
        self.picture_tokens = family.picture_tokens()
        self.max_length = max_length
        self.lengths = array("l")

    def check(self, turns: Sequence[tuple[str, str]], emit: EmitLength) -> None:
        try:
            encoded = self.template.encode(turns)
        except QwenvlError:
            # A family whose picture spans depend on the picture's size must open it; a picture that cannot be
            # opened is the picture check's finding (I-codes), and this sample's length is not counted.
            return
        length = len(encoded)
        self.lengths.append(length)
        limit = self.max_length
        if length <= limit:
            return
        over = f"{length} tokens > --max-length {limit}"
        for picture, (start, span) in enumerate(
            zip(encoded.image_starts, picture_spans(encoded, self.picture_tokens), strict=True), 1
        ):
            if start < limit < start + span:
                last = start + span - 1
                emit("L501", f"{over}: the cut falls inside picture {picture} (tokens {start}–{last})")
                return
        if encoded.first_target is None or encoded.first_target >= limit:
            emit("L502", f"{over}: no token of the assistant's answers is left after truncation")
            return
        emit("L503", f"{over}: the last {length - limit} tokens will not be learned")

    def stats(self, bins: int = 8) -> LengthStats | None:
        if not self.lengths:
            return None
        ordered = sorted(self.lengths)
        count = len(ordered)
        top = max(ordered[-1], self.max_length)
        width = max(1, -(-top // bins))
        counts = [0] * bins
        for value in ordered:
            counts[min(bins - 1, (value - 1) // width if value > 0 else 0)] += 1
        return LengthStats(
            tokenizer=str(self.model_dir),
            max_length=self.max_length,
            count=count,
            min=ordered[0],
            median=ordered[(count - 1) // 2],
            p95=ordered[max(0, math.ceil(0.95 * count) - 1)],
            max=ordered[-1],
            over_limit=sum(1 for value in ordered if value > self.max_length),
            histogram=[
                HistogramBin(low=i * width + 1 if i else 0, high=(i + 1) * width, count=c) for i, c in enumerate(counts)
            ],
        )
