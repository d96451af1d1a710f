"""`qwenvl data synth`: a synthetic data set of coloured shapes, in the data format, with exact boxes.

Every picture shows 1–3 non-overlapping shapes (square, circle, triangle) on a light background, each
of a different kind and a different colour, so "the square" and "the red circle" always name one
shape. Conversations ask about colour ("What colour is the square?" → "Red."), count ("How many
shapes are there?" → "There are 2.") and location (`<ref>the red circle</ref><box>…</box>`); some are
multi-turn, some show two pictures. Answers are short and always worded the same way, so that even
a tiny model can learn them and `qwenvl eval` can score them by exact match.

A box is computed from the pixels the shape actually covers (the bounding box of its drawing mask,
right and bottom edges exclusive) and normalised with `Box.from_pixels`, so it is exact whatever
the rasteriser does at the edges. Each sample has pictures of its own: `train.json` and `eval.json`
never share one. The same seed always gives the same files, byte for byte.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from PIL import Image, ImageDraw
from pydantic import BaseModel

from ..errors import QwenvlError
from ..markup import grounding_markup, picture_markup
from ..schemas import Box

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 70),
    "blue": (40, 80, 220),
    "yellow": (230, 190, 30),
    "orange": (240, 130, 30),
    "purple": (140, 60, 180),
}
KINDS: tuple[str, ...] = ("square", "circle", "triangle")
BACKGROUND = (245, 245, 240)
WRITTEN = ("images", "train.json", "eval.json")  # what synth puts in its folder (and --force replaces)
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 32, 4096
QuestionKind = Literal["colour", "count", "grounding", "compare"]
QUESTION_KINDS: tuple[str, ...] = ("colour", "count", "grounding", "compare")
# side of a shape as a share of the picture's side (smallest, largest), by the most shapes a picture may hold
SHAPE_SIDES: dict[int, tuple[float, float]] = {1: (0.35, 0.7), 2: (0.25, 0.45), 3: (0.18, 0.34)}

# samples done, samples in all
SynthProgress = Callable[[int, int], None]


class SynthSummary(BaseModel):
    """What `synthesize` wrote."""

    output: str
    train_file: str
    eval_file: str
    seed: int
    image_size: int
    max_shapes: int = 3
    question_kinds: list[str] = list(QUESTION_KINDS)  # the kinds asked for
    train_samples: int
    eval_samples: int
    pictures: int
    questions: dict[str, int]  # per kind (colour, count, grounding, compare), both splits together
    elapsed_s: float


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    pixels: tuple[int, int, int, int]  # left, top, right, bottom of the covered pixels (right/bottom exclusive)
    box: Box


@dataclass(frozen=True)
class Picture:
    path: str  # relative to the output folder, as written in the data
    shapes: tuple[Shape, ...]


def draw_picture(rng: random.Random, size: int, max_shapes: int = 3) -> tuple[Image.Image, tuple[Shape, ...]]:
    """A light picture with 1–`max_shapes` shapes of distinct kinds and colours, with gaps between them."""
    image = Image.new("RGB", (size, size), BACKGROUND)
    wanted = rng.randint(1, max_shapes)
    kinds = rng.sample(KINDS, wanted)
    colours = rng.sample(list(PALETTE), wanted)
    small, large = SHAPE_SIDES[max_shapes]  # fewer shapes, larger ones: room for them all, and easier to see
    low, high = max(6, round(size * small)), max(8, round(size * large))
    gap, margin = max(2, size // 64), max(1, size // 112)
    placed: list[tuple[int, int, int, int]] = []
    shapes: list[Shape] = []
    for kind, colour in zip(kinds, colours, strict=True):
        for _ in range(200):
            side = rng.randint(low, high)
            left = rng.randint(margin, size - side - margin)
            top = rng.randint(margin, size - side - margin)
            spot = (left, top, left + side, top + side)
            if all(_apart(spot, other, gap) for other in placed):
                break
        else:
            continue  # no room left: the picture keeps fewer shapes
        placed.append(spot)
        mask = Image.new("L", (size, size), 0)
        _draw_shape(ImageDraw.Draw(mask), kind, spot)
        image.paste(PALETTE[colour], (0, 0, size, size), mask)
        pixels = mask.getbbox()
        shapes.append(Shape(kind, colour, pixels, Box.from_pixels(*pixels, size, size)))
    return image, tuple(shapes)


def _apart(a: tuple[int, int, int, int], b: tuple[int, int, int, int], gap: int) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def _draw_shape(pen: ImageDraw.ImageDraw, kind: str, spot: tuple[int, int, int, int]) -> None:
    left, top, right, bottom = spot[0], spot[1], spot[2] - 1, spot[3] - 1  # PIL's corners are inclusive
    if kind == "square":
        pen.rectangle((left, top, right, bottom), fill=255)
    elif kind == "circle":
        pen.ellipse((left, top, right, bottom), fill=255)
    else:
        pen.polygon([(left, bottom), (right, bottom), ((left + right) / 2, top)], fill=255)


# --------------------------------------------------------------------------------------------------
# Questions and their answers: one wording each, short and regular.


def _where(picture: int | None) -> str:
    return f" in Picture {picture}" if picture is not None else ""


def colour_question(shape: Shape, picture: int | None = None) -> tuple[str, str]:
    return f"What colour is the {shape.kind}{_where(picture)}?", f"{shape.colour.capitalize()}."


def count_question(shapes: tuple[Shape, ...], picture: int | None = None) -> tuple[str, str]:
    n = len(shapes)
    return f"How many shapes are there{_where(picture)}?", "There is 1." if n == 1 else f"There are {n}."


def grounding_question(shape: Shape, picture: int | None = None) -> tuple[str, str]:
    name = f"the {shape.colour} {shape.kind}"
    return f"Where is {name}{_where(picture)}?", grounding_markup(shape.box, name)


def compare_question(first: Picture, second: Picture) -> tuple[str, str]:
    a, b = len(first.shapes), len(second.shapes)
    answer = "Picture 1." if a > b else "Picture 2." if b > a else "The same."
    return "Which picture has more shapes?", answer


def _ask_about(
    rng: random.Random, picture: Picture, number: int | None, asked: set[str], allowed: frozenset[str]
) -> tuple[str, str, str] | None:
    """A question of an `allowed` kind about one picture, not asked yet in this conversation:
    (kind, question, answer); None when every such question has been asked."""
    options: list[tuple[str, tuple[str, str]]] = [("count", count_question(picture.shapes, number))]
    for shape in picture.shapes:
        options.append(("colour", colour_question(shape, number)))
        options.append(("grounding", grounding_question(shape, number)))
    kinds = sorted({kind for kind, (question, _) in options if question not in asked and kind in allowed})
    if not kinds:
        return None
    kind = rng.choice(kinds)
    question, answer = rng.choice([qa for k, qa in options if k == kind and qa[0] not in asked])
    asked.add(question)
    return kind, question, answer


# --------------------------------------------------------------------------------------------------
# Samples


class _Writer:
    """Draws pictures into `folder/images` with names `{split}-NNNNN.png`."""

    def __init__(self, folder: Path, split: str, size: int, max_shapes: int = 3):
        self.folder, self.split, self.size, self.max_shapes = folder, split, size, max_shapes
        self.count = 0

    def picture(self, rng: random.Random) -> Picture:
        image, shapes = draw_picture(rng, self.size, self.max_shapes)
        path = f"images/{self.split}-{self.count:05d}.png"
        self.count += 1
        image.save(self.folder / path)
        return Picture(path, shapes)


def make_sample(
    rng: random.Random,
    writer: _Writer,
    sample_id: str,
    kinds: dict[str, int],
    allowed: frozenset[str] = frozenset(QUESTION_KINDS),
) -> dict:
    """One conversation: three in four about a single picture (1–3 turns), the rest about two. Only
    questions of the `allowed` kinds are asked (only compare: every sample compares two pictures)."""
    turns: list[tuple[str, str]] = []
    asked: set[str] = set()
    pending = ""  # picture markup not yet sent: it goes with the next question asked

    def add(prefix: str, question: tuple[str, str, str] | None) -> None:
        nonlocal pending
        if question is None:
            pending += prefix
            return
        kind, text, answer = question
        turns.append((pending + prefix + text, answer))
        pending = ""
        kinds[kind] = kinds.get(kind, 0) + 1

    def compare(first: Picture, second: Picture) -> tuple[str, str, str] | None:
        return ("compare", *compare_question(first, second)) if "compare" in allowed else None

    two_pictures = allowed == {"compare"} or rng.random() >= 0.75
    if not two_pictures:
        picture = writer.picture(rng)
        n_turns = rng.choices((1, 2, 3), weights=(5, 3, 2))[0]
        for turn in range(n_turns):
            prefix = picture_markup(1, picture.path) if turn == 0 else ""
            add(prefix, _ask_about(rng, picture, None, asked, allowed))
    elif allowed == {"compare"} or rng.random() < 0.6:  # both pictures in the first message
        first, second = writer.picture(rng), writer.picture(rng)
        prefix = picture_markup(1, first.path) + picture_markup(2, second.path)
        if allowed == {"compare"} or ("compare" in allowed and rng.random() < 0.5):
            add(prefix, compare(first, second))
        else:
            number = rng.choice((1, 2))
            add(prefix, _ask_about(rng, (first, second)[number - 1], number, asked, allowed))
        if allowed != {"compare"} and rng.random() < 0.5:
            number = rng.choice((1, 2))
            add("", _ask_about(rng, (first, second)[number - 1], number, asked, allowed))
    else:  # the second picture arrives in the second message, numbered on from the first
        first = writer.picture(rng)
        add(picture_markup(1, first.path), _ask_about(rng, first, None, asked, allowed))
        second = writer.picture(rng)
        add(picture_markup(2, second.path), _ask_about(rng, second, 2, asked, allowed))
        if rng.random() < 0.5:
            add("", compare(first, second))
    conversations = []
    for question, answer in turns:
        conversations.append({"from": "user", "value": question})
        conversations.append({"from": "assistant", "value": answer})
    return {"id": sample_id, "conversations": conversations}


def split_sizes(n: int, eval_fraction: float) -> tuple[int, int]:
    """(train, eval) sample counts: eval is round(n × fraction), at least 1, leaving train at least 1."""
    n_eval = min(n - 1, max(1, round(n * eval_fraction)))
    return n - n_eval, n_eval


def _check_arguments(
    output: Path, n: int, image_size: int, eval_fraction: float, force: bool, max_shapes: int, questions: Sequence[str]
) -> None:
    if not 1 <= max_shapes <= len(KINDS):
        raise QwenvlError(
            f"--max-shapes {max_shapes} is outside [1, {len(KINDS)}]",
            f"Pictures hold 1 to {len(KINDS)} shapes (one of each kind); pick a number in that range",
        )
    unknown = [kind for kind in questions if kind not in QUESTION_KINDS]
    if unknown or not questions:
        raise QwenvlError(
            f"--questions {','.join(questions) or '(empty)'} names "
            + (f"unknown kinds: {', '.join(unknown)}" if unknown else "no kind"),
            f"Give a comma-separated list of {', '.join(QUESTION_KINDS)}",
        )
    if n < 2:
        raise QwenvlError(f"--n {n} is too small", "Ask for at least 2 samples: one for train.json, one for eval.json")
    if not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE:
        raise QwenvlError(
            f"--image-size {image_size} is outside [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}]",
            "Pick a side length in pixels within that range (224 is a good default)",
        )
    if not 0 < eval_fraction < 1:
        raise QwenvlError(
            f"--eval-fraction {eval_fraction} is not between 0 and 1",
            "Give the held-out share as a fraction, e.g. 0.1 for 10%",
        )
    if output.exists() and not output.is_dir():
        raise QwenvlError(f"{output} exists and is not a folder", "Choose a folder path for --output")
    if output.is_dir() and any(output.iterdir()) and not force:
        raise QwenvlError(
            f"{output} is not empty",
            "Choose a new folder, or pass --force to replace its train.json, eval.json and images/",
        )


def synthesize(
    output: Path,
    n: int,
    seed: int = 0,
    image_size: int = 224,
    eval_fraction: float = 0.1,
    force: bool = False,
    on_progress: SynthProgress | None = None,
    max_shapes: int = 3,
    questions: Sequence[str] = QUESTION_KINDS,
) -> SynthSummary:
    """Write `n` samples (split into train.json and eval.json) and their pictures into `output`.

    The files are built in a temporary folder beside `output` and moved in at the end, so an
    interrupted run leaves `output` as it was. With `force`, an existing train.json, eval.json and
    images/ in `output` are replaced; other files there are left alone. `max_shapes` caps the shapes per
    picture (1 makes every colour question answerable from the picture's colours alone) and `questions`
    limits the kinds asked.
    """
    started = time.perf_counter()
    output = Path(output)
    _check_arguments(output, n, image_size, eval_fraction, force, max_shapes, questions)
    allowed = frozenset(questions)
    n_train, n_eval = split_sizes(n, eval_fraction)
    output.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{output.name}.synth-", dir=output.parent))
    kinds: dict[str, int] = {}
    pictures = 0
    try:
        (scratch / "images").mkdir()
        done = 0
        for split, count in (("train", n_train), ("eval", n_eval)):
            # One random stream per split: the eval set of a seed does not depend on the train size.
            rng = random.Random(f"qwenvl-synth:{seed}:{split}")
            writer = _Writer(scratch, split, image_size, max_shapes)
            samples = []
            for index in range(count):
                samples.append(make_sample(rng, writer, f"synth-{split}-{index:05d}", kinds, allowed))
                done += 1
                if on_progress is not None:
                    on_progress(done, n)
            pictures += writer.count
            text = json.dumps(samples, ensure_ascii=False, indent=2) + "\n"
            (scratch / f"{split}.json").write_text(text, "utf-8")
        _move_into(scratch, output)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return SynthSummary(
        output=str(output),
        train_file=str(output / "train.json"),
        eval_file=str(output / "eval.json"),
        seed=seed,
        image_size=image_size,
        max_shapes=max_shapes,
        question_kinds=[kind for kind in QUESTION_KINDS if kind in allowed],
        train_samples=n_train,
        eval_samples=n_eval,
        pictures=pictures,
        questions={kind: kinds.get(kind, 0) for kind in QUESTION_KINDS},
        elapsed_s=round(time.perf_counter() - started, 3),
    )


def _move_into(scratch: Path, output: Path) -> None:
    if not output.exists():
        umask = os.umask(0)
        os.umask(umask)
        scratch.chmod(0o777 & ~umask)  # mkdtemp made it private; the data set is not
        os.replace(scratch, output)
        return
    for name in WRITTEN:
        target = output / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        os.replace(scratch / name, target)
