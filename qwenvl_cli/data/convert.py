"""`qwenvl data convert`: a data file with every box in a target family's convention (and, optionally, the other
data format). Reads any file qwenvl reads (data/reader.py converts messages samples and declared boxes to the
internal sample), then writes each box with data/boxes.py's `from_internal` and declares it in a `boxes` key."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import QwenvlError
from .boxes import CONVENTIONS, BoxError, Pictures, from_internal, resize_of
from .messages import to_messages
from .reader import DataFile, DataFileError


@dataclass
class ConvertSummary:
    output: Path
    samples: int
    boxes: int
    target: str
    format: str
    budget: str | None  # where Qwen2.5-VL's min/max pixels came from (qwen2.5-vl only)


def convert_file(
    source: Path,
    target: str,
    output: Path,
    model: Path | None = None,
    fmt: str | None = None,
    boxes: str | None = None,
    image_root: Path | None = None,
) -> ConvertSummary:
    """Write `source` to `output` with its boxes in convention `target`; refuse the whole file on any bad sample."""
    if target not in CONVENTIONS:
        raise QwenvlError(f"--to {target} is not a box convention", f"Pass one of {', '.join(CONVENTIONS)}")
    if boxes is not None and boxes not in CONVENTIONS:
        raise QwenvlError(f"--boxes {boxes} is not a box convention", f"Pass one of {', '.join(CONVENTIONS)}")
    if fmt not in (None, "messages", "conversations"):
        raise QwenvlError(f"--format {fmt} is not a data format", "Pass messages or conversations")
    source, output = Path(source), Path(output)
    if output.exists() and source.exists() and output.resolve() == source.resolve():
        raise QwenvlError(f"--output {output} is the input file", "Write the converted file under another name")
    resize, budget = resize_of(model)
    try:
        data = DataFile.open(source, boxes, image_root, resize)
    except DataFileError as exc:
        raise QwenvlError(
            f"{source} cannot be read: {exc.problem.message}", "Fix the file (qwenvl validate-data)"
        ) from None
    pictures = Pictures(data.pictures.root, resize)
    samples, total_boxes = [], 0
    try:
        for record in data.records():
            where = f"{source} sample #{record.index} (line {record.line})"
            if record.problem is not None:
                raise QwenvlError(f"{where} is not JSON: {record.problem.message}", "Fix it (qwenvl validate-data)")
            if record.conversion:
                first = record.conversion[0]
                raise QwenvlError(
                    f"{where}, {first.field}: {first.message}",
                    first.fix or "Fix it (qwenvl validate-data shows every problem), then convert again",
                )
            sample = record.value
            turns = sample.get("conversations") if isinstance(sample, dict) else None
            if not isinstance(turns, list) or not all(isinstance(t, dict) and "value" in t for t in turns):
                raise QwenvlError(f"{where} is not a sample with conversations", "Fix it (qwenvl validate-data)")
            if fmt is None:
                fmt = "messages" if record.fields is not None else "conversations"
            out_turns, latest = [], None
            for t, turn in enumerate(turns):
                try:
                    text, latest = from_internal(turn["value"], target, pictures, latest)
                except BoxError as exc:
                    raise QwenvlError(f"{where}, turn {t}: {exc}", "Fix it (qwenvl validate-data)") from None
                total_boxes += turn["value"].count("<box>")
                out_turns.append({**turn, "value": text})
            converted = {**sample, "conversations": out_turns}
            converted = to_messages(converted) if fmt == "messages" else converted
            converted["boxes"] = target
            samples.append(converted)
    except DataFileError as exc:
        raise QwenvlError(
            f"{source} cannot be read: {exc.problem.message}", "Fix the file (qwenvl validate-data)"
        ) from None
    _write(samples, output)
    return ConvertSummary(
        output, len(samples), total_boxes, target, fmt or "conversations", budget if target == "qwen2.5-vl" else None
    )


def _write(samples: list, output: Path) -> None:
    jsonl = output.suffix.lower() in (".jsonl", ".ndjson")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            if jsonl:
                handle.writelines(json.dumps(s, ensure_ascii=False) + "\n" for s in samples)
            else:
                json.dump(samples, handle, ensure_ascii=False, indent=1)
                handle.write("\n")
        os.replace(tmp, output)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise QwenvlError(f"cannot write {output} ({exc.strerror or exc})", "Choose a writable --output") from None
