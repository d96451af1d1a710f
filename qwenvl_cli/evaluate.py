"""`qwenvl eval`: ask a model every question of a data file and score its answers.

Scoring, per assistant turn (the *reference*) against the model's answer (the *prediction*):

- If the reference contains boxes, the question is a grounding question. It is correct when every
  reference box has some predicted box with IoU ≥ 0.5 (Acc@0.5; the ref texts are not compared, and
  extra predicted boxes cost nothing). Its `iou` is the worst, over the reference boxes, of the best
  IoU any predicted box reaches: the question is correct exactly when `iou >= 0.5`.
- Otherwise it is correct on an exact match after ignoring case, surrounding white space and one final
  period: "red" matches "Red.", "Red, mostly." does not.

The model answers each turn with the reference conversation before it as history, in the prompt
layout it was trained on (`ChatSession`), so one wrong answer never changes the next question.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from . import __version__
from .errors import QwenvlError
from .families import ModelFamily
from .grounding import family_box_style
from .inference import check_adapter
from .markup import parse_box_text, scan_markup
from .schemas import Box, GenerationSettings, Sample, Severity

IOU_THRESHOLD = 0.5
# questions answered, questions in all
EvalProgress = Callable[[int, int], None]


class SampleScore(BaseModel):
    """The score of one answer. `iou` is set for grounding questions only."""

    kind: Literal["exact", "grounding"]
    correct: bool
    iou: float | None = None


class QuestionResult(SampleScore):
    """One question of the evaluation, with the model's answer."""

    sample_id: str
    turn: int  # 0-based index of the assistant turn in `conversations`
    question: str
    reference: str
    prediction: str


class EvalReport(BaseModel):
    """What `qwenvl eval --format json` prints. Accuracies are None when there is nothing to score."""

    schema_version: int = 1
    qwenvl_version: str = __version__
    model: str | None = None
    adapter: str | None = None
    data: str | None = None
    samples: int
    questions: int
    correct: int
    accuracy: float | None
    exact_n: int
    exact_correct: int
    exact_match: float | None
    grounding_n: int
    grounding_correct: int
    acc_at_50: float | None
    mean_iou: float | None
    worst: list[QuestionResult]
    elapsed_s: float


# --------------------------------------------------------------------------------------------------
# Metrics


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes (in their normalised coordinates)."""
    width = min(a.x2, b.x2) - max(a.x1, b.x1)
    height = min(a.y2, b.y2) - max(a.y1, b.y1)
    inter = max(0, width) * max(0, height)
    union = (a.x2 - a.x1) * (a.y2 - a.y1) + (b.x2 - b.x1) * (b.y2 - b.y1) - inter
    return inter / union


def _normalise(text: str) -> str:
    text = text.strip().casefold()
    return text[:-1].rstrip() if text.endswith(".") else text


def answer_matches(pred: str, ref: str) -> bool:
    """Exact match after ignoring case, surrounding white space and one final period."""
    return _normalise(pred) == _normalise(ref)


def extract_boxes(text: str) -> list[tuple[str | None, Box]]:
    """The valid boxes of `text` in order, each with the text of the `<ref>` directly before it (a
    ref names every box that follows it with nothing in between); None for a box without a ref.

    Never raises: a model's answer may be malformed, so broken tags and boxes that break the box rule
    are skipped rather than refused.
    """
    found: list[tuple[str | None, Box]] = []
    ref: str | None = None
    for span in scan_markup(text).spans:
        if span.kind == "ref":
            ref = span.content
        elif span.kind == "box":
            coords = parse_box_text(span.content)
            if coords.code is None and coords.points:
                (x1, y1), (x2, y2) = coords.points
                found.append((ref, Box(x1=x1, y1=y1, x2=x2, y2=y2)))
        else:
            ref = None
    return found


def score(pred: str, ref: str) -> SampleScore:
    """Grounding (Acc@0.5) when `ref` has boxes: correct when every reference box is matched by some
    predicted box with IoU ≥ 0.5. Otherwise exact match (`answer_matches`)."""
    ref_boxes = [box for _, box in extract_boxes(ref)]
    if not ref_boxes:
        return SampleScore(kind="exact", correct=answer_matches(pred, ref))
    pred_boxes = [box for _, box in extract_boxes(pred)]
    worst = min(max((iou(r, p) for p in pred_boxes), default=0.0) for r in ref_boxes)
    return SampleScore(kind="grounding", correct=worst >= IOU_THRESHOLD, iou=round(worst, 4))


def _pixel_iou(a: Sequence[float], b: Sequence[float]) -> float:
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(0, width) * max(0, height)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def score_family(
    pred: str,
    ref: str,
    style: str | None,
    size: tuple[int, int] | None = None,
    resized: tuple[int, int] | None = None,
) -> SampleScore:
    """`score` for a family whose answers write boxes in its own convention (docs/families.md §4): the
    prediction's boxes are read in `style` ("tokens", "absolute", "relative"; None: v1's markup, `score`) and
    IoU is computed in pixels of the picture (`size` (W, H); the reference's 0–1000 boxes are scaled to it).
    `resized` (H′, W′) is the picture as the model saw it (Qwen2.5-VL's numbers are its pixels)."""
    if style is None:
        return score(pred, ref)
    from .grounding import answer_boxes, to_pixels

    ref_boxes = [box for _, box in extract_boxes(ref)]
    if not ref_boxes:
        return SampleScore(kind="exact", correct=answer_matches(pred, ref))
    width, height = size or (1000, 1000)
    refs = [(b.x1 * width / 1000, b.y1 * height / 1000, b.x2 * width / 1000, b.y2 * height / 1000) for b in ref_boxes]
    preds = [to_pixels(box.numbers, style, width, height, resized) for box in answer_boxes(pred, style)]
    worst = min(max((_pixel_iou(r, p) for p in preds), default=0.0) for r in refs)
    return SampleScore(kind="grounding", correct=worst >= IOU_THRESHOLD, iou=round(worst, 4))


def _latest_picture(history: Sequence[tuple[str, str]], question: str) -> str | None:
    found = [span.content for q, _ in history for span in scan_markup(q).spans if span.kind == "img"]
    found += [span.content for span in scan_markup(question).spans if span.kind == "img"]
    return found[-1] if found else None


def _picture_sizes(processor, picture: str | None, style: str | None):
    """((W, H) of the picture itself, (H′, W′) as the model sees it) for a family's grounding score."""
    if style is None or picture is None:
        return None, None
    from .images import load_image

    image = load_image(picture, getattr(processor, "image_root", None))
    resized = processor.template.resized(picture) if style == "absolute" else None
    return (image.width, image.height), resized


# --------------------------------------------------------------------------------------------------
# The evaluation loop


def _questions(sample: Sample) -> list[tuple[int, list[tuple[str, str]], str, str]]:
    """(assistant turn index, history of reference exchanges, question, reference) for each answer."""
    turns = sample.conversations
    out = []
    for index in range(1, len(turns), 2):
        history = [(turns[j].value, turns[j + 1].value) for j in range(0, index - 1, 2)]
        out.append((index, history, turns[index - 1].value, turns[index].value))
    return out


def _ratio(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def evaluate(
    model,
    processor,
    samples: Sequence[Sample | dict],
    settings=None,
    progress: EvalProgress | None = None,
    *,
    family: ModelFamily,
    generation: dict | None = None,
    worst: int = 5,
) -> EvalReport:
    """Ask `model` every assistant turn of `samples` and score the answers (greedy decoding, 64 new
    tokens at most, unless `settings` say otherwise). `worst` wrong answers, lowest IoU first, are kept
    as examples. `family` asks in its own chat session; `generation` is the model's generation config
    (chat_format, max_window_size)."""
    started = time.perf_counter()
    settings = settings or GenerationSettings(max_new_tokens=64)
    parsed = [s if isinstance(s, Sample) else Sample.model_validate(s) for s in samples]
    plan = [(sample, question) for sample in parsed for question in _questions(sample)]
    session = family.chat_session(model, processor, generation or {})
    style = family_box_style(family)
    results: list[QuestionResult] = []
    for done, (sample, (turn, history, question, reference)) in enumerate(plan, 1):
        session.history = list(history)
        prediction = session.ask(question, settings=settings)
        if style is None:
            scored = score(prediction, reference)
        else:
            size, resized = _picture_sizes(processor, _latest_picture(history, question), style)
            scored = score_family(prediction, reference, style, size, resized)
        results.append(
            QuestionResult(
                **scored.model_dump(),
                sample_id=sample.id,
                turn=turn,
                question=question,
                reference=reference,
                prediction=prediction,
            )
        )
        if progress is not None:
            progress(done, len(plan))

    exact = [r for r in results if r.kind == "exact"]
    grounding = [r for r in results if r.kind == "grounding"]
    correct = sum(r.correct for r in results)
    wrong = sorted((r for r in results if not r.correct), key=lambda r: r.iou or 0.0)
    return EvalReport(
        samples=len(parsed),
        questions=len(results),
        correct=correct,
        accuracy=_ratio(correct, len(results)),
        exact_n=len(exact),
        exact_correct=sum(r.correct for r in exact),
        exact_match=_ratio(sum(r.correct for r in exact), len(exact)),
        grounding_n=len(grounding),
        grounding_correct=sum(r.correct for r in grounding),
        acc_at_50=_ratio(sum(r.correct for r in grounding), len(grounding)),
        mean_iou=round(sum(r.iou or 0.0 for r in grounding) / len(grounding), 4) if grounding else None,
        worst=wrong[:worst],
        elapsed_s=round(time.perf_counter() - started, 3),
    )


def _check_adapter(adapter_dir: Path) -> None:
    check_adapter(adapter_dir, "leave out --adapter to evaluate the model alone")


def _refuse_invalid(data_file: Path, image_root: Path | None) -> None:
    from .data.validate import ValidateOptions, validate_data

    report = validate_data([data_file], ValidateOptions(image_root=image_root))
    if report.errors == 0 and report.exit_code != 2:
        return
    errors = [f for f in report.findings if f.severity is Severity.error]
    shown = []
    for f in errors[:3]:
        where = f"line {f.line}" if f.line is not None else Path(f.file).name
        if f.sample_id is not None:
            where += f" (id {f.sample_id!r})"
        shown.append(f"{where}: {f.code} {f.message}")
    raise QwenvlError(
        f"{data_file} has {report.errors} data error(s), e.g. " + "; ".join(shown),
        f"Run `qwenvl validate-data {data_file}` for the full report and fix them, or evaluate only the "
        "valid samples written by its --output-clean",
    )


def _read_samples(data_file: Path, limit: int | None) -> list[Sample]:
    from .data.reader import DataFile

    samples = []
    for record in DataFile.open(data_file).records():
        if limit is not None and len(samples) >= limit:
            break
        samples.append(Sample.model_validate(record.value))
    return samples


def evaluate_folder(
    model_dir: str | Path,
    data_file: str | Path,
    adapter_dir: str | Path | None = None,
    image_root: str | Path | None = None,
    limit: int | None = None,
    max_new_tokens: int = 64,
    progress: EvalProgress | None = None,
) -> EvalReport:
    """Evaluate a checkpoint folder (plus a LoRA adapter, when given) on a data file.

    The data is validated first and refused if it has errors. Relative image paths start from
    `image_root`, by default the data file's folder. `limit` keeps the first samples only. The model
    runs on the GPU when there is one (bf16 where supported), else on the CPU in fp32.
    """
    from .inference import load_for_inference

    model_dir, data_file = Path(model_dir), Path(data_file)
    adapter = Path(adapter_dir) if adapter_dir is not None else None
    root = Path(image_root) if image_root is not None else data_file.parent
    if limit is not None and limit < 1:
        raise QwenvlError(f"--limit {limit} is less than 1", "Pass a positive number of samples, or leave it out")
    if max_new_tokens < 1:
        raise QwenvlError(f"--max-new-tokens {max_new_tokens} is less than 1", "Allow at least one new token")
    if adapter is not None:
        _check_adapter(adapter)
    _refuse_invalid(data_file, root)
    samples = _read_samples(data_file, limit)

    loaded = load_for_inference(model_dir, adapter)
    processor = loaded.family.processor(loaded.tokenizer, loaded.config, image_root=root)
    report = evaluate(
        loaded.model,
        processor,
        samples,
        GenerationSettings(max_new_tokens=max_new_tokens),
        progress,
        family=loaded.family,
        generation=loaded.generation,
    )
    return report.model_copy(
        update={"model": str(model_dir), "adapter": str(adapter) if adapter else None, "data": str(data_file)}
    )
