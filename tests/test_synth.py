"""`qwenvl data synth`: deterministic, valid, exact boxes, disjoint splits, short regular answers."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from qwenvl_cli.cli import app
from qwenvl_cli.data.synth import BACKGROUND, KINDS, PALETTE, draw_picture, split_sizes, synthesize
from qwenvl_cli.data.validate import validate_data
from qwenvl_cli.errors import QwenvlError
from qwenvl_cli.evaluate import extract_boxes, iou
from qwenvl_cli.markup import scan_markup
from qwenvl_cli.schemas import Box

COLOURS = "|".join(PALETTE)
ANSWER_FORMS = [
    re.compile(rf"(?:{'|'.join(c.capitalize() for c in PALETTE)})\."),
    re.compile(r"There is 1\.|There are [23]\."),
    re.compile(rf"<ref>the (?:{COLOURS}) (?:{'|'.join(KINDS)})</ref><box>\(\d+,\d+\),\(\d+,\d+\)</box>"),
    re.compile(r"Picture [12]\.|The same\."),
]
WHERE = re.compile(rf"Where is the ({COLOURS}) (\w+)(?: in Picture (\d))?\?")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("synth") / "shapes"
    synthesize(folder, 120, seed=3)
    return folder


def load(folder: Path, split: str) -> list[dict]:
    return json.loads((folder / f"{split}.json").read_text("utf-8"))


def pictures_of(sample: dict) -> list[str]:
    return [s.content for t in sample["conversations"] for s in scan_markup(t["value"]).spans if s.kind == "img"]


def colour_bbox(pixels: np.ndarray, colour: tuple[int, int, int]) -> tuple[int, int, int, int] | None:
    """Pixel bounds (right/bottom exclusive) of the pixels of exactly `colour`."""
    ys, xs = np.nonzero((pixels == np.array(colour, dtype=np.uint8)).all(axis=-1))
    if not len(xs):
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def test_same_seed_gives_the_same_bytes_and_another_seed_does_not(tmp_path):
    def files(folder: Path) -> dict[str, bytes]:
        return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}

    synthesize(tmp_path / "a", 12, seed=5)
    synthesize(tmp_path / "b", 12, seed=5)
    synthesize(tmp_path / "c", 12, seed=6)
    assert files(tmp_path / "a") == files(tmp_path / "b")
    assert files(tmp_path / "a")["train.json"] != files(tmp_path / "c")["train.json"]


def test_eval_split_does_not_depend_on_the_train_size(tmp_path):
    synthesize(tmp_path / "small", 10, seed=1, eval_fraction=0.3)  # 7 train, 3 eval
    synthesize(tmp_path / "large", 30, seed=1, eval_fraction=0.1)  # 27 train, 3 eval
    assert load(tmp_path / "small", "eval") == load(tmp_path / "large", "eval")


def test_everything_written_passes_validate_data(dataset):
    report = validate_data([dataset / "train.json", dataset / "eval.json"])
    assert report.exit_code == 0
    assert report.errors == 0 and report.warnings == 0
    assert report.samples == 120
    assert report.images_checked == len(list((dataset / "images").iterdir()))


def test_summary_counts_what_was_written(tmp_path):
    summary = synthesize(tmp_path / "s", 40, seed=2, eval_fraction=0.25)
    train, held_out = load(tmp_path / "s", "train"), load(tmp_path / "s", "eval")
    assert (summary.train_samples, summary.eval_samples) == (len(train), len(held_out)) == (30, 10)
    assert summary.pictures == len(list((tmp_path / "s" / "images").iterdir()))
    answers = sum(len(s["conversations"]) // 2 for s in train + held_out)
    assert sum(summary.questions.values()) == answers


def test_split_sizes():
    assert split_sizes(100, 0.1) == (90, 10)
    assert split_sizes(2, 0.01) == (1, 1)  # eval keeps one sample
    assert split_sizes(3, 0.99) == (1, 2)  # and train keeps one


def test_splits_use_different_pictures_and_ids(dataset):
    train, held_out = load(dataset, "train"), load(dataset, "eval")
    train_pictures = {p for s in train for p in pictures_of(s)}
    eval_pictures = {p for s in held_out for p in pictures_of(s)}
    assert train_pictures and eval_pictures and not train_pictures & eval_pictures
    assert not {s["id"] for s in train} & {s["id"] for s in held_out}
    on_disk = {f"images/{p.name}" for p in (dataset / "images").iterdir()}
    assert on_disk == train_pictures | eval_pictures  # every picture used, none missing


def test_answers_are_short_and_regular_and_the_mix_is_there(dataset):
    samples = load(dataset, "train") + load(dataset, "eval")
    for sample in samples:
        for turn in sample["conversations"][1::2]:
            assert any(form.fullmatch(turn["value"]) for form in ANSWER_FORMS), turn["value"]
    questions = [t["value"] for s in samples for t in s["conversations"][0::2]]
    assert any("What colour is the" in q for q in questions)
    assert any("How many shapes are there" in q for q in questions)
    assert any(q.startswith("Where is the") or "\nWhere is the" in q for q in questions)
    assert any(len(s["conversations"]) >= 4 for s in samples)  # multi-turn
    two = [s for s in samples if len(pictures_of(s)) == 2]
    assert two
    assert any("Picture 2: <img>" in s["conversations"][2]["value"] for s in two if len(s["conversations"]) > 2)
    for sample in two:  # numbered across the conversation
        labels = [m for t in sample["conversations"] for m in re.findall(r"Picture (\d): <img>", t["value"])]
        assert labels == ["1", "2"]


def test_boxes_are_the_drawn_shapes(dataset):
    checked = 0
    for sample in load(dataset, "train") + load(dataset, "eval"):
        paths = pictures_of(sample)
        turns = sample["conversations"]
        for question, answer in zip(turns[0::2], turns[1::2], strict=True):
            where = WHERE.search(question["value"])
            if where is None:
                continue
            colour, kind, number = where.groups()
            image_path = dataset / paths[int(number or 1) - 1]
            pixels = np.asarray(Image.open(image_path).convert("RGB"))
            height, width = pixels.shape[:2]
            [(ref, box)] = extract_boxes(answer["value"])
            assert ref == f"the {colour} {kind}"
            x1, y1, x2, y2 = box.to_pixels(width, height)
            drawn = colour_bbox(pixels, PALETTE[colour])
            assert drawn is not None
            assert all(abs(a - b) <= 1 for a, b in zip((x1, y1, x2, y2), drawn, strict=True)), (box, drawn)
            centre = pixels[(y1 + y2) // 2, (x1 + x2) // 2]
            assert tuple(centre) == PALETTE[colour]
            assert iou(box, Box.from_pixels(x1, y1, x2, y2, width, height)) >= 0.9
            checked += 1
    assert checked >= 20


def test_counts_and_colours_agree_with_the_pixels(dataset):
    for sample in load(dataset, "train")[:40]:
        paths = pictures_of(sample)
        turns = sample["conversations"]
        for question, answer in zip(turns[0::2], turns[1::2], strict=True):
            number = re.search(r"in Picture (\d)", question["value"])
            pixels = np.asarray(Image.open(dataset / paths[int(number.group(1)) - 1 if number else 0]))
            present = [c for c, rgb in PALETTE.items() if colour_bbox(pixels, rgb) is not None]
            if "How many shapes" in question["value"]:
                n = len(present)
                assert answer["value"] == ("There is 1." if n == 1 else f"There are {n}.")
            elif "What colour is the" in question["value"]:
                assert answer["value"][:-1].lower() in present


def test_drawn_shapes_are_apart_distinct_and_exact():
    rng = random.Random(0)
    for _ in range(60):
        image, shapes = draw_picture(rng, 96)
        assert 1 <= len(shapes) <= 3
        assert len({s.kind for s in shapes}) == len({s.colour for s in shapes}) == len(shapes)
        pixels = np.asarray(image)
        for i, shape in enumerate(shapes):
            assert colour_bbox(pixels, PALETTE[shape.colour]) == shape.pixels
            for other in shapes[i + 1 :]:
                a, b = shape.pixels, other.pixels
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]
        assert tuple(pixels[0, 0]) == BACKGROUND or any(s.pixels[:2] == (0, 0) for s in shapes)


def test_refuses_a_non_empty_folder_and_force_replaces(tmp_path):
    folder = tmp_path / "data"
    synthesize(folder, 20, seed=0)
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(QwenvlError) as caught:
        synthesize(folder, 6, seed=0)
    assert caught.value.exit_code == 2
    assert "not empty" in str(caught.value) and "--force" in str(caught.value)
    assert len(load(folder, "train")) == 18  # untouched

    synthesize(folder, 6, seed=0, force=True)
    assert len(load(folder, "train")) + len(load(folder, "eval")) == 6
    used = {p for s in load(folder, "train") + load(folder, "eval") for p in pictures_of(s)}
    assert {f"images/{p.name}" for p in (folder / "images").iterdir()} == used  # no stale pictures
    assert (folder / "notes.txt").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no scratch folder left


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"n": 1}, "--n 1"),
        ({"n": 10, "image_size": 16}, "--image-size 16"),
        ({"n": 10, "eval_fraction": 0.0}, "--eval-fraction"),
        ({"n": 10, "eval_fraction": 1.0}, "--eval-fraction"),
    ],
)
def test_refuses_bad_arguments(tmp_path, kwargs, words):
    with pytest.raises(QwenvlError, match=re.escape(words)):
        synthesize(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_refuses_a_file_as_output(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(QwenvlError, match="not a folder"):
        synthesize(tmp_path / "f", 4)


def test_cli_writes_then_refuses_without_a_traceback(tmp_path):
    runner = CliRunner()
    env = {"COLUMNS": "160", "NO_COLOR": "1"}
    args = ["data", "synth", "--output", str(tmp_path / "d"), "--n", "8", "--seed", "1", "--image-size", "64"]
    result = runner.invoke(app, args, env=env)
    assert result.exit_code == 0, result.output
    assert "wrote 8 samples" in result.stdout and "eval.json" in result.stdout
    assert json.loads((tmp_path / "d" / "eval.json").read_text())

    again = runner.invoke(app, args, env=env)
    assert again.exit_code == 2
    assert "not empty" in again.output and "Traceback" not in again.output

    assert runner.invoke(app, [*args, "--force"], env=env).exit_code == 0

    helped = runner.invoke(app, ["data", "synth", "--help"], env=env)
    assert helped.exit_code == 0 and "qwenvl data synth --output data/shapes --n 2000" in helped.stdout
    assert "data" in runner.invoke(app, ["--help"], env=env).stdout


def test_max_shapes_and_question_kinds_limit_what_is_drawn_and_asked(tmp_path):
    summary = synthesize(tmp_path / "c", 60, seed=4, max_shapes=1, questions=["colour"])
    assert summary.max_shapes == 1 and summary.question_kinds == ["colour"]
    assert summary.questions["colour"] > 0
    assert all(count == 0 for kind, count in summary.questions.items() if kind != "colour")
    samples = json.loads((tmp_path / "c" / "train.json").read_text()) + json.loads(
        (tmp_path / "c" / "eval.json").read_text()
    )
    for sample in samples:
        for question in sample["conversations"][::2]:
            assert "What colour is the " in question["value"], question["value"]
        for answer in sample["conversations"][1::2]:
            assert answer["value"].rstrip(".").lower() in PALETTE
    for png in (tmp_path / "c" / "images").iterdir():  # one shape: the background plus one colour
        colours = {c for _, c in Image.open(png).convert("RGB").getcolors(1 << 16)}
        assert colours - {BACKGROUND} and len(colours & set(PALETTE.values())) == 1, png.name
    assert validate_data([tmp_path / "c" / "train.json"]).errors == 0


def test_only_compare_questions_compare_two_pictures(tmp_path):
    summary = synthesize(tmp_path / "p", 20, seed=1, questions=["compare"])
    assert summary.questions["compare"] == 20 and summary.pictures == 40


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_shapes": 0}, "--max-shapes 0 is outside [1, 3]"),
        ({"max_shapes": 4}, "--max-shapes 4 is outside [1, 3]"),
        ({"questions": ["colour", "size"]}, "unknown kinds: size"),
        ({"questions": []}, "names no kind"),
    ],
)
def test_bad_shape_and_question_settings_are_refused(tmp_path, kwargs, message):
    with pytest.raises(QwenvlError, match=re.escape(message)):
        synthesize(tmp_path / "x", 10, **kwargs)


def test_cli_synth_max_shapes_and_questions(tmp_path):
    args = ["data", "synth", "--output", str(tmp_path / "d"), "--n", "6", "--max-shapes", "1"]
    result = CliRunner().invoke(app, [*args, "--questions", "colour, grounding"])
    assert result.exit_code == 0, result.output
    assert "count" not in result.stdout.split("questions:")[1] and "1–1 shapes" in result.stdout
    bad = CliRunner().invoke(app, ["data", "synth", "--output", str(tmp_path / "e"), "--n", "6", "--questions", "size"])
    assert bad.exit_code == 2 and "unknown kinds: size" in bad.output
