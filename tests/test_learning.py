"""Proof that `qwenvl train` learns: held-out colour questions about synthetic pictures, before and after.

Everything runs through the product's Python API on CPU: `synthesize` a data set of one-shape pictures
with colour questions only (six colours: chance is 1/6), `init_model("tiny")`, `run_training`, and
`evaluate_folder` (exact match on eval.json, whose pictures the model never saw).

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

import pytest

from qwenvl_cli.data.synth import PALETTE, synthesize
from qwenvl_cli.evaluate import evaluate_folder
from qwenvl_cli.model.presets import init_model
from qwenvl_cli.train.runner import TrainOptions, run_training

CHANCE = 1 / len(PALETTE)
REQUIRED = 0.9
pytestmark = pytest.mark.slow


def reword(answer: str) -> str:
    """ "Red." → "It is red, I think." """
    return f"It is {answer.rstrip('.').lower()}, I think."


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    """One-shape pictures (56 px, the tiny model's size), colour questions only; 40 held out."""
    folder = tmp_path_factory.mktemp("learn") / "colours"
    synthesize(folder, 840, seed=0, image_size=56, eval_fraction=40 / 840, max_shapes=1, questions=["colour"])
    return folder


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
    after = evaluate_folder(root / "run", colours / "eval.json", max_new_tokens=8)
    return before, result, after, root / "run"


def test_full_training_learns_to_name_the_colour_it_sees(full_run):
    before, result, after, _ = full_run
    print(f"full: held-out colour accuracy {before.accuracy:.3f} -> {after.accuracy:.3f} ({after.questions} questions)")
    assert after.questions >= 40 and after.exact_n == after.questions  # every question is a colour question
    assert before.accuracy == 0.0
    assert result.final_loss is not None and result.final_loss < 0.2
    assert after.accuracy >= REQUIRED > 3 * CHANCE, [(r.reference, r.prediction) for r in after.worst]


def test_lora_learns_a_new_answer_form_and_keeps_reading_the_picture(full_run, colours, tmp_path):
    _, _, _, base = full_run
    data = tmp_path / "reworded"
    data.mkdir()
    for split in ("train", "eval"):
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
        max_steps=150,
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
    after = evaluate_folder(base, data / "eval.json", adapter_dir=tmp_path / "adapter", max_new_tokens=12)
    print(f"lora: held-out colour accuracy {before.accuracy:.3f} -> {after.accuracy:.3f} ({after.questions} questions)")
    assert after.accuracy >= REQUIRED > 3 * CHANCE, [(r.reference, r.prediction) for r in after.worst]
