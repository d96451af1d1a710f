"""Proof that `qwenvl train` teaches a new-family model (tiny Qwen2.5-VL) what it sees, on CPU.

`synthesize` one-shape pictures with colour questions; the samples kept are single-picture, single-question
ones whose answer is one of FOUR colours (red, green, blue, yellow), so chance is 1/4 (synth's palette has
six: the other two are dropped here). `init_model("tiny-qwen2.5-vl")` → `run_training --method full`
(LM, lm_head and the vision merger; the random vision tower stays frozen) → held-out accuracy.

Why not --train-vit: at one learning rate for all, the 2-block random vision tower's outputs grew ~500-fold
and kept only the red channel apart (measured: green read as blue, yellow as red, 0.52 held-out after 300
steps at lr 3e-3 – 1e-2), while the frozen random tower already tells the four colours apart and the
merger learns to pass that on (0.98). A separate, smaller vision learning rate (--vision-lr) is being built.

How a question is scored: chat/eval generation for these families is not built yet, so the model's answer
is its own choice among the four candidate answers ("Red.", "Green.", "Blue.", "Yellow."): each candidate is
encoded after the question through the family's own template (`VisionTemplate`, the one training uses, the
picture expanded to its tokens) and teacher-forced through the model; the candidate whose answer tokens
(the closing `<|im_end|>` included) have the highest summed log-likelihood is the answer. Right when it is
the reference. The untrained model must be near chance (so that the test can fail), the trained one ≥ 0.9.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qwenvl_cli.data.synth import synthesize
from qwenvl_cli.families import FAMILIES
from qwenvl_cli.train.runner import TrainOptions, run_training

FAMILY = "qwen2.5-vl"
COLOURS = ("Red.", "Green.", "Blue.", "Yellow.")
CHANCE = 1 / len(COLOURS)
REQUIRED = 0.9
LORA_STEPS = 150
pytestmark = pytest.mark.slow


def four_colour_questions(source: Path, target: Path) -> int:
    """Keep the first question of each one-picture sample whose answer is one of COLOURS; write `target`."""
    kept = []
    for sample in json.loads(source.read_text("utf-8")):
        question, answer = sample["conversations"][0]["value"], sample["conversations"][1]["value"]
        if question.count("<img>") == 1 and answer in COLOURS:
            kept.append({"id": sample["id"], "conversations": sample["conversations"][:2]})
    target.write_text(json.dumps(kept), "utf-8")
    return len(kept)


@pytest.fixture(scope="module")
def colours(tmp_path_factory) -> Path:
    """train4.json and eval4.json beside synth's own files (the pictures are in its images/)."""
    folder = tmp_path_factory.mktemp("family-learn") / "colours"
    synthesize(folder, 1400, seed=0, image_size=56, eval_fraction=0.06, max_shapes=1, questions=["colour"])
    assert four_colour_questions(folder / "train.json", folder / "train4.json") >= 500
    assert four_colour_questions(folder / "eval.json", folder / "eval4.json") >= 40
    return folder


def likelihoods(model_dir: Path, data: Path, candidates_of, adapter: Path | None = None) -> list[list[float]]:
    """For each sample of `data`, the summed log-likelihood of each of `candidates_of(reference)` as its answer
    (the answer's tokens, the closing `<|im_end|>` included), under the model (with `adapter` applied)."""
    import torch

    from qwenvl_cli.families.hf_vl import PictureCollator, PictureDataset
    from qwenvl_cli.inference import attach_adapter

    family = FAMILIES[FAMILY]
    model, tokenizer = family.load(model_dir, "fp32", "cpu")
    if adapter is not None:
        model = attach_adapter(model, adapter, model_dir).eval()
    template = family.template(tokenizer, image_root=data.parent)
    config = family.config(model_dir)
    collate = PictureCollator(tokenizer.convert_tokens_to_ids("<|endoftext|>"))
    found = []
    with torch.no_grad():
        for sample in json.loads(data.read_text("utf-8")):
            question, reference = (turn["value"] for turn in sample["conversations"][:2])
            candidates = candidates_of(reference)
            encoded = [template.encode([("user", question), ("assistant", answer)]) for answer in candidates]
            rows = PictureDataset(encoded, model_dir, data.parent, int(config.image_token_id))
            batch = collate([rows[i] for i in range(len(rows))])
            labels = batch.pop("labels")
            logits = model(**batch).logits[:, :-1].float()
            targets = labels[:, 1:]
            mask = targets != -100
            picked = logits.log_softmax(-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            found.append((picked * mask).sum(-1).tolist())
    return found


def choose(model_dir: Path, data: Path, candidates: tuple[str, ...] = COLOURS) -> tuple[float, list[str]]:
    """(accuracy, chosen answers): for each sample, the candidate answer with the highest log-likelihood."""
    references = [sample["conversations"][1]["value"] for sample in json.loads(data.read_text("utf-8"))]
    scores = likelihoods(model_dir, data, lambda _: candidates)
    chosen = [candidates[max(range(len(candidates)), key=row.__getitem__)] for row in scores]
    return sum(map(str.__eq__, chosen, references)) / len(references), chosen


@pytest.fixture(scope="module")
def full_run(colours, tmp_path_factory):
    root = tmp_path_factory.mktemp("family-learn-full")
    family = FAMILIES[FAMILY]
    family.init_model(family.generation.preset, root / "base", seed=0)
    before = choose(root / "base", colours / "eval4.json")
    options = TrainOptions(
        method="full",
        model=root / "base",
        data=colours / "train4.json",
        output=root / "run",
        max_steps=300,
        batch_size=8,
        grad_accum=1,
        lr=5e-3,
        weight_decay=0.0,
        warmup_steps=5,
        save_steps=10**6,
        seed=0,
    )
    result = run_training(options)
    after = choose(root / "run", colours / "eval4.json")
    return before, result, after, root / "run"


def test_full_training_of_tiny_qwen25_vl_learns_to_name_the_colour_it_sees(full_run):
    (before, before_chosen), result, (after, _), _ = full_run
    print(f"{FAMILY} full: held-out colour accuracy {before:.3f} -> {after:.3f}; final loss {result.final_loss}")
    # untrained: near chance (it mostly picks one colour whatever the picture)
    assert before <= CHANCE + 0.2, before_chosen
    assert after >= REQUIRED > 3 * CHANCE


def reword(answer: str) -> str:
    """ "Red." → "It is red, I think." (v1's re-wording in tests/test_learning.py)"""
    return f"It is {answer.rstrip('.').lower()}, I think."


NEW_FORM = tuple(reword(colour) for colour in COLOURS)


def reworded(colours: Path, split: str) -> Path:
    """`{split}4.json` with every answer re-worded, beside it (so that its pictures are found the same way)."""
    samples = json.loads((colours / f"{split}4.json").read_text("utf-8"))
    for sample in samples:
        sample["conversations"][1]["value"] = reword(sample["conversations"][1]["value"])
    target = colours / f"{split}4-reworded.json"
    target.write_text(json.dumps(samples), "utf-8")
    return target


def new_form_scores(model_dir: Path, data: Path, adapter: Path | None = None) -> tuple[float, float]:
    """(colour accuracy among the four NEW_FORM answers, share of questions where the true colour's new form
    is more likely than its old one, "It is red, I think." over "Red.")."""
    old_form = dict(zip(NEW_FORM, COLOURS, strict=True))
    references = [sample["conversations"][1]["value"] for sample in json.loads(data.read_text("utf-8"))]
    scores = likelihoods(model_dir, data, lambda reference: (*NEW_FORM, old_form[reference]), adapter)
    right = prefer_new = 0
    for reference, row in zip(references, scores, strict=True):
        right += NEW_FORM[max(range(len(NEW_FORM)), key=row.__getitem__)] == reference
        prefer_new += row[NEW_FORM.index(reference)] > row[-1]
    return right / len(references), prefer_new / len(references)


def test_lora_on_tiny_qwen25_vl_learns_a_new_answer_form_and_keeps_reading_the_picture(full_run, colours, tmp_path):
    """As v1's LoRA test (tests/test_learning.py): LoRA on the model the full run produced, every answer
    re-worded ("Red." → "It is red, I think."). That model prefers the old form for the true colour; only an
    adapter that learned the new form (preferred on most held-out questions) and keeps naming the colour it sees
    (≥ 0.9 among the four answers in the new form) passes.

    lm_head is among the LoRA targets (`--lora-targets '<family regex>|lm_head'`): the full run pushed down the
    output rows of every token its four answers never use ("It", " is", "h", "i", "n", "k", …) along one shared
    direction, so with lm_head frozen they stay tied (measured: LoRA on the LM alone plateaued at loss ~4.4, each
    token of the new form at log-probability ~-5.5 ≈ ln(1/245), the old form still preferred on 0 of 46)."""
    *_, base = full_run
    train, held_out = reworded(colours, "train"), reworded(colours, "eval")
    before, before_new = new_form_scores(base, held_out)
    options = TrainOptions(
        method="lora",
        model=base,
        data=train,
        output=tmp_path / "adapter",
        max_steps=LORA_STEPS,
        batch_size=8,
        grad_accum=1,
        lr=5e-3,
        weight_decay=0.0,
        warmup_steps=5,
        lora_r=16,
        lora_alpha=32,
        lora_targets=[f"{FAMILIES[FAMILY].lora_targets[0]}|lm_head"],
        save_steps=10**6,
        seed=0,
    )
    result = run_training(options)
    assert result.trainable_parameters < result.total_parameters / 5
    after, after_new = new_form_scores(base, held_out, tmp_path / "adapter")
    print(
        f"{FAMILY} lora: new form preferred {before_new:.3f} -> {after_new:.3f}; colour accuracy in the new form "
        f"{before:.3f} -> {after:.3f}; final loss {result.final_loss}"
    )
    assert before_new <= 0.2  # the base answers "Red.": it must prefer the old form, or the test could not fail
    assert after_new >= REQUIRED
    assert after >= REQUIRED > 3 * CHANCE


# -- several processes -----------------------------------------------------------------------------------------
def train_family_in_processes(model: Path, out: Path, *flags: str) -> None:
    """`qwenvl train` on the demo data as a real command (one or several processes)."""
    import os
    import subprocess
    import sys

    from qwenvl_cli.demo import DEMO_DATA

    env = {**os.environ, "QWENVL_CACHE_DIR": str(out.parent / "cache")}
    common = ["--model", str(model), "--data", str(DEMO_DATA), "--output", str(out), "--max-steps", "2"]
    command = [sys.executable, "-m", "qwenvl_cli", "train", *flags, *common, "--grad-accum", "1", "--lora-r", "4"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]


def test_two_processes_train_a_family_like_one_process_with_their_batches_together(vl_models, tmp_path):
    """As v1's test in test_train.py, for tiny Qwen2.5-VL LoRA over DDP (gloo): 2 processes × batch 1 give the
    per-step losses and the adapter of one process with batches of 2 (1e-4 on losses, 1e-4 relative on
    weights)."""
    import torch
    from safetensors.torch import load_file

    flags = ["--lr", "1e-2", "--save-steps", "1", "--seed", "3", "--lora-dropout", "0", "--gradient-checkpointing"]
    model = vl_models / FAMILY
    train_family_in_processes(model, tmp_path / "one", *flags, "--batch-size", "2")
    train_family_in_processes(model, tmp_path / "two", *flags, "--batch-size", "1", "--nproc", "2")

    def losses(run: Path) -> list[float]:
        state = json.loads((run / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())
        return [entry["loss"] for entry in state["log_history"] if "loss" in entry]

    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 2
    assert all(abs(a - b) <= 1e-4 for a, b in zip(one, two, strict=True)), (one, two)
    assert json.loads((tmp_path / "two" / "qwenvl_run.json").read_text())["processes"] == 2
    first = load_file(str(tmp_path / "one" / "adapter_model.safetensors"))
    second = load_file(str(tmp_path / "two" / "adapter_model.safetensors"))
    assert first.keys() == second.keys() and first
    for key in first:
        torch.testing.assert_close(first[key], second[key], atol=1e-5, rtol=1e-4, msg=key)


def test_deepspeed_zero3_on_two_processes_writes_a_family_model_whole(vl_models, tmp_path):
    """As v1's test: ZeRO-3 shards every parameter across the 2 ranks; full fine-tuning of tiny Qwen2.5-VL for one
    step must still write every tensor whole (the base's keys and shapes), the LM changed, the vision tower not."""
    pytest.importorskip("deepspeed")
    import torch
    from safetensors.torch import load_file

    out = tmp_path / "ds"
    flags = ["--method", "full", "--nproc", "2", "--engine", "deepspeed", "--zero", "3", "--lr", "1e-2"]
    train_family_in_processes(vl_models / FAMILY, out, *flags)
    assert json.loads((out / "deepspeed_config.json").read_text())["zero_optimization"]["stage"] == 3
    trained, base = load_file(str(out / "model.safetensors")), load_file(str(vl_models / FAMILY / "model.safetensors"))
    assert {k: v.shape for k, v in trained.items()} == {k: v.shape for k, v in base.items()}
    assert all(v.numel() > 0 for v in trained.values())
    lm = [k for k in base if k.startswith("model.layers.") and k.endswith("proj.weight")]
    assert lm and all(not torch.equal(trained[k], base[k]) for k in lm)
    vision = [k for k in base if k.startswith("visual.blocks.")]
    assert vision and all(torch.equal(trained[k], base[k]) for k in vision)
