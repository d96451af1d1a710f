"""Synthetic training samples of an exact token length, one picture each (for benchmarks and `qwenvl profile`).

Each sample is one user turn with a 224-px PNG of its own (a red square on a pale ground) plus filler words,
and an answer of filler words; the filler count is searched so that the sample has exactly the asked length
under the model's own chat template (the picture's positions and its markers included).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

PICTURE_SIZE = 224  # each sample's picture is PICTURE_SIZE × PICTURE_SIZE pixels (`qwenvl profile` states its tokens)
WORDS = [
    "the",
    "red",
    "square",
    "sits",
    "left",
    "of",
    "a",
    "small",
    "blue",
    "circle",
    "while",
    "two",
    "green",
    "triangles",
    "wait",
    "near",
    "the",
    "top",
    "edge",
]


def make_data(folder: Path, model_dir: Path, lengths: list[int], seed: int) -> list[int]:
    """Write data.json with one sample per length (exact, under the model's template); returns the lengths."""
    from PIL import Image, ImageDraw

    from qwenvl_cli.families import family_for

    family = family_for(model_dir)
    template = family.template(family.tokenizer(model_dir), image_root=folder)  # pictures relative to data.json
    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    samples, made = [], []
    for index, target in enumerate(lengths):
        picture = f"images/{index:05d}.png"
        image = Image.new("RGB", (PICTURE_SIZE, PICTURE_SIZE), (245, 245, 240))
        left, top = rng.randint(0, 150), rng.randint(0, 150)
        ImageDraw.Draw(image).rectangle((left, top, left + 60, top + 60), fill=(220, 40, 40))
        image.save(folder / picture)

        def sample(words: int, answer_words: int, picture=picture, index=index) -> dict:
            text = " ".join(WORDS[i % len(WORDS)] for i in range(words))
            answer = " ".join(WORDS[(i + 3) % len(WORDS)] for i in range(answer_words)) or "Red."
            question = f"Picture 1: <img>{picture}</img>\nDescribe this. {text}"
            return {
                "id": f"bench-{index}",
                "conversations": [{"from": "user", "value": question}, {"from": "assistant", "value": answer}],
            }

        def length(candidate: dict) -> int:
            turns = [(turn["from"], turn["value"]) for turn in candidate["conversations"]]
            return len(template.encode(turns).input_ids)

        answer_words = max(1, (target - 300) // 8)  # a sizeable answer, so that the loss covers real tokens
        low, high = 0, target
        while low < high:  # the most filler words that keep the sample within its length
            middle = (low + high + 1) // 2
            if length(sample(middle, answer_words)) <= target:
                low = middle
            else:
                high = middle - 1
        best = sample(low, answer_words)
        while length(best) > target and answer_words > 1:
            answer_words -= 1
            best = sample(0, answer_words)
        best = _fill(best, target, length)
        samples.append(best)
        made.append(length(best))
    (folder / "data.json").write_text(json.dumps(samples), "utf-8")
    return made


def _fill(sample: dict, target: int, length) -> dict:
    """Top the answer up a token at a time (the word search can stop one or two short of `target`)."""
    current = length(sample)
    while current < target:
        for piece in (" a", ".", "a", " "):
            question, answer = sample["conversations"]
            candidate = {**sample, "conversations": [question, {**answer, "value": answer["value"] + piece}]}
            size = length(candidate)
            if current < size <= target:
                sample, current = candidate, size
                break
        else:
            return sample
    return sample
