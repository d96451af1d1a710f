"""Training data: validated samples → token ids once (the family's template), and --packing's rows.

With --packing, several samples share one row of up to --max-length tokens (best-fit decreasing, decided
once, so every epoch and every resumed run sees the same rows). The family's dataset turns samples (or rows)
into tensors, with pictures decoded in DataLoader workers and dynamic padding to the longest of the batch."""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data.boxes import resize_of
from ..data.reader import DataFile
from ..data.validate import ValidateOptions, validate_data
from ..errors import QwenvlError
from ..families.base import picture_spans
from ..schemas import ValidationReport


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class PreparedData:
    samples: list  # the family's EncodedConversation
    dropped_too_long: int
    skipped_invalid: int
    report: ValidationReport
    data: DataFile  # the file as read (its --boxes and picture sizes), to read its samples again


def prepare_samples(
    data_file: str | Path,
    template: Any,
    max_length: int,
    picture_tokens: int,
    image_root: Path | None = None,
    skip_invalid: bool = False,
    boxes: str | None = None,
    box_model: Path | None = None,
) -> PreparedData:
    """Validate the file with validate-data's checks, then encode every valid sample once with the family's
    `template` (a picture takes `picture_tokens` tokens). `boxes` (--boxes) is the box convention of every
    sample over their `boxes` keys; `box_model`'s image processor sizes the pictures of Qwen2.5-VL pixel
    boxes (data/boxes.py).

    Samples longer than `max_length` are truncated at the end, except when the cut would fall inside a
    picture or leave no assistant token: those are dropped and counted."""
    report = validate_data([data_file], ValidateOptions(image_root=image_root, boxes=boxes, box_model=box_model))
    if report.exit_code == 2:
        first = report.findings[0]
        raise QwenvlError(f"{data_file} cannot be read: {first.message}", first.fix)
    bad = {f.sample_index for f in report.findings if f.severity.value == "error" and f.sample_index is not None}
    if bad and not skip_invalid:
        examples = "; ".join(
            f"{f.code} line {f.line}: {f.message}" for f in report.findings if f.severity.value == "error"
        )[:600]
        raise QwenvlError(
            f"{data_file} has {report.errors} errors in {len(bad)} samples ({examples})",
            "Fix them (qwenvl validate-data shows all of them), or pass --skip-invalid to train on the rest",
        )
    samples = []
    dropped = 0
    fixed = picture_tokens
    data = DataFile.open(data_file, boxes, image_root, resize_of(box_model)[0])
    for record in data.records():
        if record.index in bad or record.problem is not None:
            continue
        turns = [(turn["from"], turn["value"]) for turn in record.value["conversations"]]
        encoded = template.encode(turns)
        if len(encoded) > max_length:
            spans = picture_spans(encoded, fixed)
            cut_in_picture = any(
                start < max_length < start + n for start, n in zip(encoded.image_starts, spans, strict=True)
            )
            no_target = encoded.first_target is None or encoded.first_target >= max_length
            if cut_in_picture or no_target:
                dropped += 1
                continue
            keep = [s for s, n in zip(encoded.image_starts, spans, strict=True) if s + n <= max_length]
            encoded.image_paths = encoded.image_paths[: len(keep)]
            encoded.image_starts = keep
            if getattr(encoded, "image_lengths", None):
                encoded.image_lengths = encoded.image_lengths[: len(keep)]
            encoded.input_ids = encoded.input_ids[:max_length]
            encoded.labels = encoded.labels[:max_length]
        samples.append(encoded)
    if not samples:
        raise QwenvlError(
            f"no sample of {data_file} is left to train on ({dropped} too long for --max-length {max_length})",
            "Raise --max-length or check the data with qwenvl validate-data --model",
        )
    return PreparedData(samples, dropped, len(bad), report, data)


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Sample indices grouped into rows of at most `capacity` tokens: best-fit decreasing (each sample, the
    longest first, goes into the fullest row that still has room). Rows list their samples in data order."""
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (tokens left, row number), sorted
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        length = lengths[index]
        if length > capacity:
            raise ValueError(f"sample {index} has {length} tokens, more than a row's {capacity}")
        spot = bisect.bisect_left(room, (length, -1))
        if spot < len(room):
            left, row = room.pop(spot)
        else:
            left, row = capacity, len(rows)
            rows.append([])
        rows[row].append(index)
        if left - length > 0:
            bisect.insort(room, (left - length, row))
    return [sorted(row) for row in rows]
