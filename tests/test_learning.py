"""Proof that `qwenvl train` learns: held-out colour questions about synthetic pictures, before and after.

Everything runs through the product's Python API on CPU: `synthesize` a data set of one-shape pictures
with colour questions only (six colours: chance is 1/6), `init_model("tiny")`, `run_training`, and
`evaluate_folder` (exact match on eval.json, whose pictures the model never saw). Questions about a
sample with one picture must reach 0.9; all of them, including "What colour is the square in Picture 2?"
about two pictures (harder for the two-layer tiny model: it must find the right picture), 0.75.

- full: from the freshly initialised tiny model, which answers no question right before training.
- LoRA: on the model the full run produced, with the answers re-worded ("Red." → "It is red, I think.",
  a form that model never gives): only an adapter that learned the new form *and* keeps naming the
  colour it sees scores. The base alone scores 0 on these references.

Why LoRA starts from the trained model rather than from the random one: a random language model and a
random, frozen vision tower leave LoRA too little to work with in a few hundred steps (measured: 8.5 %
after 300 steps at lr 5e-3), while the realistic use of LoRA — adapting a model that can already see — is
what this test exercises. docs/train.md has both numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qwenvl_cli.data.synth import PALETTE, synthesize
from qwenvl_cli.evaluate import evaluate_folder
from qwenvl_cli.model.presets import init_model
from qwenvl_cli.train.runner import TrainOptions, run_training

CHANCE = 1 / len(PALETTE)
REQUIRED = 0.9  # one-picture questions
REQUIRED_WITH_TWO_PICTURES = 0.75  # every question, "What colour is the square in Picture 2?" included
PARTS = ("eval", "eval-one", "eval-two")
pytestmark = pytest.mark.slow


def reword(answer: str) -> str:
    """ "Red." → "It is red, I think." """
    return f"It is {answer.rstrip('.').lower()}, I think."


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    """One-shape pictures (56 px, the tiny model's size), colour questions only; 40 held out."""
    folder = tmp_path_factory.mktemp("learn") / "colours"
    synthesize(folder, 840, seed=0, image_size=56, eval_fraction=40 / 840, max_shapes=1, questions=["colour"])
    split_by_pictures(folder / "eval.json")
    return folder


def split_by_pictures(eval_file: Path) -> None:
    """eval-one.json: the samples with one picture ("What colour is the circle?"); eval-two.json: those with
    two, whose questions name the picture ("… in Picture 2?"), which the tiny model finds harder."""
    samples = json.loads(eval_file.read_text("utf-8"))
    one = [s for s in samples if sum(t["value"].count("<img>") for t in s["conversations"]) == 1]
    two = [s for s in samples if s not in one]
    assert one and two
    (eval_file.parent / "eval-one.json").write_text(json.dumps(one), "utf-8")
    (eval_file.parent / "eval-two.json").write_text(json.dumps(two), "utf-8")


@pytest.fixture(scope="module")
def full_run(colours, tmp_path_factory):
    root = tmp_path_factory.mktemp("learn-full")
    init_model("tiny", root / "tiny", seed=0)
    before = evaluate_folder(root / "tiny", colours / "eval.json", max_new_tokens=8)
    options = TrainOptions(
        method="full",
        model=root / "tiny",
        data=colours / "train.json",
        output=root / "run",
        max_steps=300,
        batch_size=8,
        grad_accum=1,
        lr=2e-3,
        warmup_steps=5,
        save_steps=10**6,
        seed=0,
    )
    result = run_training(options)
    after = {part: evaluate_folder(root / "run", colours / f"{part}.json", max_new_tokens=8) for part in PARTS}
    return before, result, after, root / "run"


def test_full_training_learns_to_name_the_colour_it_sees(full_run, colours):
    before, result, after, run = full_run
    print("full: held-out colour accuracy", before.accuracy, "->", {k: v.accuracy for k, v in after.items()})
    assert after["eval"].questions >= 40 and after["eval"].exact_n == after["eval"].questions  # colour only
    assert before.accuracy == 0.0
    assert result.final_loss is not None and result.final_loss < 0.2
    assert_learned(after)
    assert chat_answers(colours / "eval-one.json", ["--model", str(run)]) >= 4  # of 5, through qwenvl chat


def assert_learned(after: dict) -> None:
    """One-picture questions at least 0.9 (chance 1/6); all, two-picture ones included, at least 0.75."""
    misses = [(r.question.splitlines()[-1], r.reference, r.prediction) for r in after["eval"].worst]
    assert after["eval-one"].accuracy >= REQUIRED > 3 * CHANCE, misses
    assert after["eval"].accuracy >= REQUIRED_WITH_TWO_PICTURES, misses


def chat_answers(eval_file, model_args: list[str], n: int = 5) -> int:
    """How many of the first `n` single-picture held-out questions `qwenvl chat --prompt` answers exactly."""
    import re

    from typer.testing import CliRunner

    from qwenvl_cli.cli import app

    right = asked = 0
    for sample in json.loads(eval_file.read_text("utf-8")):
        question, reference = sample["conversations"][0]["value"], sample["conversations"][1]["value"]
        pictures = re.findall(r"<img>(.*?)</img>", question)
        if len(pictures) != 1:
            continue
        text = question.split("\n")[-1]
        picture = str((eval_file.parent / pictures[0]) if not Path(pictures[0]).is_absolute() else pictures[0])
        result = CliRunner().invoke(app, ["chat", *model_args, "--image", picture, "--prompt", text, "--json"])
        assert result.exit_code == 0, result.output
        right += json.loads(result.stdout)["answer"] == reference
        asked += 1
        if asked == n:
            break
    return right


def test_lora_learns_a_new_answer_form_and_keeps_reading_the_picture(full_run, colours, tmp_path):
    _, _, _, base = full_run
    data = tmp_path / "reworded"
    data.mkdir()
    for split in ("train", "eval", "eval-one", "eval-two"):
        samples = json.loads((colours / f"{split}.json").read_text("utf-8"))
        for sample in samples:
            for turn in sample["conversations"][1::2]:
                turn["value"] = reword(turn["value"])
            for turn in sample["conversations"][::2]:
                turn["value"] = turn["value"].replace("images/", str(colours / "images") + "/")
        (data / f"{split}.json").write_text(json.dumps(samples), "utf-8")
    before = evaluate_folder(base, data / "eval.json", max_new_tokens=12)
    assert before.accuracy == 0.0  # the base answers "Red.": right colour, wrong form
    options = TrainOptions(
        method="lora",
        model=base,
        data=data / "train.json",
        output=tmp_path / "adapter",
        max_steps=250,
        batch_size=8,
        grad_accum=1,
        lr=5e-3,
        warmup_steps=5,
        lora_r=16,
        lora_alpha=32,
        save_steps=10**6,
        seed=0,
    )
    result = run_training(options)
    assert result.trainable_parameters < result.total_parameters / 5
    adapter = tmp_path / "adapter"
    after = {p: evaluate_folder(base, data / f"{p}.json", adapter_dir=adapter, max_new_tokens=12) for p in PARTS}
    print("lora: held-out colour accuracy", before.accuracy, "->", {k: v.accuracy for k, v in after.items()})
    assert_learned(after)
    adapter_args = ["--model", str(base), "--adapter", str(tmp_path / "adapter")]
    assert chat_answers(data / "eval-one.json", adapter_args) >= 4  # of 5, through qwenvl chat --adapter
    from qwenvl_cli.merge import merge_adapter

    merged = merge_adapter(adapter, tmp_path / "merged")
    assert chat_answers(data / "eval-one.json", ["--model", merged.output]) >= 4  # and after qwenvl merge
