#!/usr/bin/env python
"""Proof of learning: `qwenvl train` on the built-in tiny model and the synthetic shapes task, before and after.

    python benchmarks/learn_bench.py                     # the recorded run: full, 6000 steps of 2 (~6-10 min, 2 CPUs)
    python benchmarks/learn_bench.py --require-pictures  # also fail unless the answers depend on the pictures
    python benchmarks/learn_bench.py --method full lora --lr 1e-3 5e-3 --lora-alpha 128   # both methods
    python benchmarks/learn_bench.py --steps 1600 --output /tmp/learn.json                  # a shorter look

Everything goes through the product's Python API, in one process:

1. `synthesize` a seeded data set (`--n` samples, 10 % held out in eval.json).
2. `init_model("tiny", seed=--seed)`: a freshly initialised tiny model (56-pixel pictures, 0.8 M parameters).
3. Ask it the first `--eval-limit` samples of eval.json (`evaluate_folder`): the "before" numbers.
4. Train it with `run_training` (each `--method` in turn, `--steps` optimizer steps of `--batch-size` ×
   `--grad-accum` samples, cosine schedule after `--warmup-steps`, one learning rate per method).
5. Ask the trained model the same questions (`evaluate_folder`, with `adapter_dir` for LoRA): "after".

Scores are `qwenvl eval`'s: exact match for answers, Acc@0.5 for boxes. Each question's kind (colour,
count, grounding, compare = "Which picture has more shapes?") is read from its text, and every question is
also scored per kind: `evaluate_folder` runs once with its report keeping every wrong answer (`evaluate`'s
`worst=`), and the per-kind counts are checked against the report's totals.

Learning the answer *forms* needs only the text, so three more measurements tell whether the model learned
to read the pictures:

- the *form rate* per kind: answers of the right shape, right or wrong (one colour word; "There are N.";
  a box after a `<ref>` that repeats the shape the question names; "Picture N." / "The same.");
- the *constant answer* per kind: the accuracy on the same questions of always giving the most common
  training answer of that kind (for grounding: the mean training box). A model that ignores the pictures
  cannot do much better;
- the *picture gain*: the teacher-forced loss on the answer tokens with each sample's pictures swapped for
  another sample's, relative to its own pictures, on colour and count answers (0 % when the pictures are
  ignored).

Exit status 1 when, for any method, the accuracy after training is not higher than before (and, with
`--require-pictures`, when the picture gain is under 10 %), so a regression cannot pass silently. Results go
to benchmarks/results/learn.json (`--output`); `--work DIR` keeps the data, model and runs (and reuses the
untrained model's evaluation from an earlier run with the same data settings).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from _machine import load_average, machine_info

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "learn.json"
PACKAGES = ["qwenvl", "torch", "transformers", "peft", "accelerate", "safetensors", "Pillow", "numpy"]
KINDS = ("colour", "count", "grounding", "compare")
PICTURE_GAIN_REQUIRED = 0.10  # --require-pictures: swapped pictures must cost at least 10 % more answer loss
_KIND_PATTERNS = (
    ("colour", re.compile(r"What colour is the ")),
    ("count", re.compile(r"How many shapes are there")),
    ("grounding", re.compile(r"Where is the ")),
    ("compare", re.compile(r"Which picture has more shapes")),
)


def question_kind(question: str) -> str:
    """The kind of a synthetic question, from its text (the last line: picture markup comes first)."""
    text = question.strip().splitlines()[-1] if question.strip() else ""
    for kind, pattern in _KIND_PATTERNS:
        if pattern.search(text):
            return kind
    return "other"


def _questions(samples: list[dict]) -> list[tuple[str, int, str, str]]:
    """(sample id, assistant turn index, question, reference) for every assistant turn, in eval order."""
    out = []
    for sample in samples:
        turns = sample["conversations"]
        for index in range(1, len(turns), 2):
            out.append((sample["id"], index, turns[index - 1]["value"], turns[index]["value"]))
    return out


def _clip(text: str, limit: int = 80) -> str:
    """An answer as kept in the JSON: an untrained model's 64 tokens of noise are cut short."""
    return text if len(text) <= limit else text[:limit] + "…"


def _ratio(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


# --------------------------------------------------------------------------------------------------------------
# Constant baselines: what answering without looking at the picture can score
# --------------------------------------------------------------------------------------------------------------


def _grounding_template(question: str) -> str:
    """'Where is the red circle?' → 'the red circle': the ref text the answer repeats."""
    match = re.search(r"Where is (the \w+ \w+)", question)
    return match.group(1) if match else ""


def constant_baselines(train: list[dict], questions: list[tuple[str, int, str, str]]) -> dict:
    """Per kind: the accuracy on `questions` of always giving the most common training answer of that kind.
    Grounding: the mean training box (with the question's ref text), scored at IoU ≥ 0.5."""
    from qwenvl_cli.evaluate import extract_boxes, score

    answers: dict[str, Counter] = {kind: Counter() for kind in KINDS}
    boxes = []
    for _, _, question, reference in _questions(train):
        kind = question_kind(question)
        if kind == "grounding":
            boxes.extend(box for _, box in extract_boxes(reference))
        elif kind in answers:
            answers[kind][reference] += 1
    mean = [round(sum(getattr(b, f) for b in boxes) / len(boxes)) for f in ("x1", "y1", "x2", "y2")] if boxes else None
    result: dict = {}
    for kind in KINDS:
        asked = [(q, r) for _, _, q, r in questions if question_kind(q) == kind]
        if not asked:
            continue
        if kind == "grounding":
            if mean is None:
                continue
            box = f"<box>({mean[0]},{mean[1]}),({mean[2]},{mean[3]})</box>"
            correct = sum(score(f"<ref>{_grounding_template(q)}</ref>{box}", r).correct for q, r in asked)
            result[kind] = {"answer": box, "n": len(asked), "correct": correct, "accuracy": _ratio(correct, len(asked))}
        else:
            answer = answers[kind].most_common(1)[0][0] if answers[kind] else ""
            correct = sum(score(answer, r).correct for _, r in asked)
            result[kind] = {
                "answer": answer,
                "n": len(asked),
                "correct": correct,
                "accuracy": _ratio(correct, len(asked)),
            }
    return result


# --------------------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------------------


def _evaluate_folder_all_misses(model_dir: Path, eval_file: Path, limit: int, adapter: Path | None):
    """`evaluate_folder`, with its report keeping every wrong answer: `evaluate`'s `worst=` (how many wrong
    answers the report keeps as examples, 5 in the product) is raised for this call. Nothing else changes:
    the counts and rates do not depend on it, and each question is asked once."""
    import functools

    import qwenvl_cli.evaluate as module

    original = module.evaluate
    module.evaluate = functools.partial(original, worst=10**9)
    try:
        return module.evaluate_folder(model_dir, eval_file, adapter_dir=adapter, limit=limit)
    finally:
        module.evaluate = original


def evaluate_model(model_dir: Path, eval_file: Path, limit: int, adapter: Path | None = None) -> dict:
    """`evaluate_folder`'s report (the headline numbers), plus the same questions scored per kind."""
    started = time.perf_counter()
    report = _evaluate_folder_all_misses(model_dir, eval_file, limit, adapter)
    seconds = time.perf_counter() - started
    samples = json.loads(eval_file.read_text("utf-8"))[:limit]
    questions = _questions(samples)
    wrong = {(r.sample_id, r.turn): r for r in report.worst}
    if len(questions) != report.questions or len(wrong) != report.questions - report.correct:
        raise SystemExit(
            f"cannot score per kind: {len(questions)} questions and {len(wrong)} misses here, "
            f"{report.questions} questions and {report.questions - report.correct} misses in the report"
        )
    per_kind: dict[str, dict] = {}
    predictions: dict[str, Counter] = {kind: Counter() for kind in KINDS}
    right: dict[str, Counter] = {kind: Counter() for kind in KINDS}
    for sample_id, turn, question, reference in questions:
        kind = question_kind(question)
        entry = per_kind.setdefault(kind, {"n": 0, "correct": 0, "form_ok": 0, "ious": []})
        entry["n"] += 1
        miss = wrong.get((sample_id, turn))
        entry["correct"] += miss is None
        entry["form_ok"] += answer_form_ok(kind, miss.prediction if miss is not None else reference, question)
        if kind == "grounding":
            entry["ious"].append(miss.iou if miss is not None else None)
        if kind in predictions:
            shown = miss.prediction if miss is not None else reference  # a correct answer matches its reference
            if kind == "grounding":  # the form, not the numbers: do the answers name the shape and give a box?
                shown = _grounding_form(shown, question)
            shown = _clip(shown)
            predictions[kind][shown] += 1
            right[kind][shown] += miss is None
    for kind, entry in per_kind.items():
        ious = entry.pop("ious")
        entry["accuracy"] = _ratio(entry["correct"], entry["n"])
        entry["form_rate"] = _ratio(entry["form_ok"], entry["n"])
        if kind == "grounding":
            known = [x for x in ious if x is not None]
            entry["mean_iou_of_misses"] = round(sum(known) / len(known), 4) if known else None
        entry["distinct_predictions"] = len(predictions.get(kind, ()))
        # [answer, times given, times correct]; for grounding the answer's form instead of its text
        entry["top_predictions"] = [
            [text, count, right[kind][text]] for text, count in predictions.get(kind, Counter()).most_common(6)
        ]
    examples = [
        {
            "question": r.question.splitlines()[-1],
            "reference": r.reference,
            "prediction": _clip(r.prediction),
            "iou": r.iou,
        }
        for r in report.worst[:: max(1, len(report.worst) // 6)][:6]
    ]
    return {
        "samples": report.samples,
        "questions": report.questions,
        "correct": report.correct,
        "accuracy": report.accuracy,
        "exact_n": report.exact_n,
        "exact_correct": report.exact_correct,
        "exact_match": report.exact_match,
        "grounding_n": report.grounding_n,
        "grounding_correct": report.grounding_correct,
        "acc_at_50": report.acc_at_50,
        "mean_iou": report.mean_iou,
        "per_kind": dict(sorted(per_kind.items(), key=lambda kv: KINDS.index(kv[0]) if kv[0] in KINDS else 99)),
        "example_misses": examples,
        "evaluate_folder_s": round(seconds, 2),
        "answer_loss_own_vs_swapped_pictures": picture_reliance(model_dir, eval_file, samples, adapter),
    }


_FORMS = {
    "colour": re.compile(r"(Red|Green|Blue|Yellow|Orange|Purple)\.", re.IGNORECASE),
    "count": re.compile(r"There is 1\.|There are [23]\.", re.IGNORECASE),
    "compare": re.compile(r"Picture [12]\.|The same\.", re.IGNORECASE),
}


def answer_form_ok(kind: str, prediction: str, question: str) -> bool:
    """Whether an answer has the form of its kind, right or wrong: one colour word and a period; "There
    is 1." / "There are N."; "Picture N." / "The same."; for grounding, a valid box after a <ref> that
    repeats the shape named in the question."""
    if kind == "grounding":
        return _grounding_form(prediction, question) == "<ref> + box, ref text right"
    pattern = _FORMS.get(kind)
    return bool(pattern and pattern.fullmatch(prediction.strip()))


def _grounding_form(prediction: str, question: str) -> str:
    """How a grounding answer is shaped: right ref text or not, and whether it has a valid box."""
    from qwenvl_cli.evaluate import extract_boxes

    boxes = extract_boxes(prediction)
    wanted = _grounding_template(question)
    if not boxes:
        return "no valid box"
    ref = boxes[0][0]
    if ref is None:
        return "box without <ref>"
    return "<ref> + box, ref text right" if ref == wanted else "<ref> + box, ref text wrong"


# --------------------------------------------------------------------------------------------------------------
# Does the model look at the pictures?
# --------------------------------------------------------------------------------------------------------------


def picture_reliance(model_dir: Path, eval_file: Path, samples: list[dict], adapter: Path | None = None) -> dict:
    """Teacher-forced loss (nats per token) on the answer tokens of `samples`, per question kind, with each
    sample's own pictures and with the pictures of another sample (the next one with as many pictures).
    A model that ignores its pictures scores the same both ways; one that reads them does worse on
    swapped pictures. Every answer is scored with the reference conversation before it, as in training."""
    import torch

    from qwenvl_cli.images import load_image
    from qwenvl_cli.model.checkpoint import load_checkpoint
    from qwenvl_cli.model.image import preprocess_images
    from qwenvl_cli.model.template import ChatTemplate

    model, tokenizer = load_checkpoint(model_dir, dtype="fp32", device="cpu")
    if adapter is not None:
        import contextlib

        from qwenvl_cli import quiet_import

        with contextlib.suppress(ImportError):
            quiet_import("gptqmodel")  # peft imports it when present; its banner is noise here (as in qwenvl eval)
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    template = ChatTemplate(tokenizer)
    head = len(template.heads["assistant"])  # <|im_start|>assistant\n
    tail = 1 + len(tokenizer.encode_plain("\n"))  # <|im_end|>\n
    size = (model.base_model.model if adapter is not None else model).config.image_size
    encoded = []
    for sample in samples:
        turns = [(turn["from"], turn["value"]) for turn in sample["conversations"]]
        full = template.encode(turns)
        answers = []  # (kind, first, end) of each answer's content tokens
        for index in range(1, len(turns), 2):
            end = len(template.encode(turns[: index + 1])) - tail
            first = len(template.encode(turns[:index])) + head
            answers.append((question_kind(turns[index - 1][1]), first, end))
        encoded.append((full, answers))
    by_count: dict[int, list[int]] = {}
    for i, (full, _) in enumerate(encoded):
        by_count.setdefault(len(full.image_paths), []).append(i)
    donor = {}
    for group in by_count.values():
        for j, i in enumerate(group):
            donor[i] = group[(j + 1) % len(group)]
    sums = {"own": Counter(), "swapped": Counter()}
    tokens: Counter = Counter()
    with torch.no_grad():
        for i, (full, answers) in enumerate(encoded):
            ids = torch.tensor([full.input_ids])
            for mode, source in (("own", i), ("swapped", donor[i])):
                paths = encoded[source][0].image_paths
                pixels = preprocess_images([load_image(p, eval_file.parent) for p in paths], size) if paths else None
                logits = model(input_ids=ids, pixel_values=pixels, use_cache=False).logits[0]
                losses = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:], reduction="none")
                for kind, first, end in answers:
                    sums[mode][kind] += float(losses[first - 1 : end - 1].sum())
                    if mode == "own":
                        tokens[kind] += end - first
    out: dict = {}
    for kind in [*KINDS, "all"]:
        n = sum(tokens.values()) if kind == "all" else tokens[kind]
        if not n:
            continue
        own = (sum(sums["own"].values()) if kind == "all" else sums["own"][kind]) / n
        swapped = (sum(sums["swapped"].values()) if kind == "all" else sums["swapped"][kind]) / n
        out[kind] = {"answer_tokens": n, "own": round(own, 4), "swapped": round(swapped, 4)}
    return out


# --------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------


def train(method: str, lr: float, args, model_dir: Path, train_file: Path, output: Path) -> dict:
    from qwenvl_cli.train.runner import TrainOptions, run_training

    options = TrainOptions(
        method=method,
        model=model_dir,
        data=train_file,
        output=output,
        max_length=args.max_length,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        max_steps=args.steps,
        lr=lr,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        train_vit=args.train_vit and method == "full",
        seed=args.seed,
        save_steps=args.steps + 1,  # no intermediate checkpoints: the benchmark measures learning, not saving
        save_total_limit=1,
    )
    losses: list[tuple[int, float]] = []
    last_print = [time.perf_counter()]

    def on_event(kind: str, payload: dict) -> None:
        if kind == "log":
            losses.append((payload["step"], payload["loss"]))
            if time.perf_counter() - last_print[0] > 15 or payload["step"] == payload["total"]:
                last_print[0] = time.perf_counter()
                print(f"    step {payload['step']}/{payload['total']}  loss {payload['loss']:.3f}", flush=True)

    load_before = load_average()
    started = time.perf_counter()
    result = run_training(options, on_event)
    seconds = time.perf_counter() - started
    tail = [loss for _, loss in losses[-max(1, len(losses) // 10) :]]
    head = [loss for _, loss in losses[: max(1, len(losses) // 10)]]
    marks = sorted({max(1, round(len(losses) * f)) for f in (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)}) if losses else []
    return {
        "method": method,
        "lr": lr,
        "options": json.loads(options.model_dump_json()),
        "samples": result.samples,
        "dropped_samples": result.dropped_samples,
        "trainable_parameters": result.trainable_parameters,
        "total_parameters": result.total_parameters,
        "global_step": result.global_step,
        "samples_seen": result.global_step * args.batch_size * args.grad_accum,
        "epochs_seen": round(result.global_step * args.batch_size * args.grad_accum / max(1, result.samples), 2),
        "train_seconds": round(seconds, 1),
        "run_training_seconds": result.seconds,
        "tokens_per_second": result.tokens_per_second,
        "final_loss": result.final_loss,
        "first_loss": losses[0][1] if losses else None,
        "mean_loss_first_10pct": round(sum(head) / len(head), 4) if head else None,
        "mean_loss_last_10pct": round(sum(tail) / len(tail), 4) if tail else None,
        "loss_at": {str(losses[i - 1][0]): round(losses[i - 1][1], 4) for i in marks},
        "load_average_before": load_before,
        "load_average_after": load_average(),
    }


# --------------------------------------------------------------------------------------------------------------


def run_summary(before: dict, after: dict, baselines: dict) -> dict:
    """Per kind: accuracy before, after and of the constant answer, and the share of answers in the right
    form; plus the picture gain: how much worse the colour and count answers get (teacher-forced loss) when
    the pictures are swapped. Answer forms come from the text alone; beating the constant answer and a
    positive picture gain need the pictures."""
    kinds = {}
    for kind in KINDS:
        if kind not in after["per_kind"]:
            continue
        kinds[kind] = {
            "n": after["per_kind"][kind]["n"],
            "accuracy_before": before["per_kind"].get(kind, {}).get("accuracy"),
            "accuracy_after": after["per_kind"][kind]["accuracy"],
            "constant_answer_accuracy": baselines.get(kind, {}).get("accuracy"),
            "form_rate_before": before["per_kind"].get(kind, {}).get("form_rate"),
            "form_rate_after": after["per_kind"][kind]["form_rate"],
        }
    losses = after["answer_loss_own_vs_swapped_pictures"]
    own = sum(losses[k]["own"] * losses[k]["answer_tokens"] for k in ("colour", "count") if k in losses)
    swapped = sum(losses[k]["swapped"] * losses[k]["answer_tokens"] for k in ("colour", "count") if k in losses)
    gain = swapped / own - 1 if own else 0.0
    return {
        "accuracy_before": before["accuracy"],
        "accuracy_after": after["accuracy"],
        "per_kind": kinds,
        "picture_gain": round(gain, 4),
        "reads_pictures": gain >= PICTURE_GAIN_REQUIRED,
    }


def _kind_line(label: str, block: dict) -> str:
    parts = [f"all {block['accuracy'] or 0:.1%}"]
    for kind in KINDS:
        entry = block["per_kind"].get(kind)
        if entry:
            parts.append(f"{kind} {entry['accuracy'] or 0:.1%} ({entry['correct']}/{entry['n']})")
    return f"  {label:<22} " + " · ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=3000, help="samples synthesised (train + eval)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, the model and the training")
    parser.add_argument("--image-size", type=int, default=224, help="side of the synthetic pictures")
    parser.add_argument("--max-shapes", type=int, default=3, help="most shapes per picture (qwenvl data synth)")
    parser.add_argument(
        "--questions", default="colour,count,grounding,compare", help="question kinds asked (qwenvl data synth)"
    )
    parser.add_argument("--loss-curve", type=Path, help="copy the (first) run's loss.png here, e.g. into docs/")
    parser.add_argument("--eval-limit", type=int, default=100, help="eval.json samples asked")
    parser.add_argument("--method", nargs="+", choices=("full", "lora"), default=["full"])
    parser.add_argument("--lr", type=float, nargs="+", default=[1e-3], help="one value, or one per --method")
    parser.add_argument("--steps", type=int, default=6000, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--warmup-steps", type=int, default=50)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--lora-r", type=int, default=64)
    parser.add_argument("--lora-alpha", type=int, default=16)
    parser.add_argument("--lora-dropout", type=float, default=0.05)
    parser.add_argument("--train-vit", action="store_true", help="full: train the ViT too (--train-vit)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--work",
        type=Path,
        default=None,
        help="folder for data, model and runs (default: temporary); the untrained model's evaluation is kept "
        "there and reused by later runs with the same data and model settings (for exploring)",
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--require-pictures",
        action="store_true",
        help="also fail unless the answers to colour and count questions depend on the pictures (loss with "
        f"swapped pictures at least {PICTURE_GAIN_REQUIRED * 100:.0f}%% higher than with their own)",
    )
    args = parser.parse_args(argv)
    if len(args.lr) not in (1, len(args.method)):
        parser.error("--lr takes one value, or one per --method")
    lrs = args.lr * len(args.method) if len(args.lr) == 1 else args.lr

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from qwenvl_cli.data.synth import synthesize
    from qwenvl_cli.model.presets import init_model

    machine = machine_info(PACKAGES)
    machine["torch_threads"] = torch.get_num_threads()
    machine["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    wall = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="qwenvl-learn-") as scratch:
        work = args.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        print(f"synthesising {args.n} samples ({args.image_size} px, seed {args.seed}) …", flush=True)
        kinds = [kind.strip() for kind in args.questions.split(",") if kind.strip()]
        data = synthesize(
            work / "data",
            args.n,
            seed=args.seed,
            image_size=args.image_size,
            force=True,
            max_shapes=args.max_shapes,
            questions=kinds,
        )
        train_file, eval_file = Path(data.train_file), Path(data.eval_file)
        model_dir = work / "tiny"
        model_info = init_model("tiny", model_dir, seed=args.seed, force=True)
        train_samples = json.loads(train_file.read_text("utf-8"))
        eval_samples = json.loads(eval_file.read_text("utf-8"))[: args.eval_limit]
        baselines = constant_baselines(train_samples, _questions(eval_samples))

        weights = hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()
        key = {
            "n": args.n,
            "seed": args.seed,
            "image_size": args.image_size,
            "max_shapes": args.max_shapes,
            "questions": kinds,
            "eval_limit": args.eval_limit,
            "model_sha256": weights,
        }
        cached = work / "before.json"
        before_reused = False
        if args.work is not None and cached.is_file() and json.loads(cached.read_text("utf-8"))["key"] == key:
            before, before_reused = json.loads(cached.read_text("utf-8"))["before"], True
            print("reusing the untrained model's evaluation from", cached, flush=True)
        else:
            print(f"evaluating the untrained model on {len(eval_samples)} eval samples …", flush=True)
            before = evaluate_model(model_dir, eval_file, args.eval_limit)
            cached.write_text(json.dumps({"key": key, "before": before}) + "\n", "utf-8")
        print(_kind_line("before", before), flush=True)

        runs = []
        for method, lr in zip(args.method, lrs, strict=True):
            print(
                f"training {method}: {args.steps} steps × {args.batch_size} × {args.grad_accum}, lr {lr:g} …",
                flush=True,
            )
            run_dir = work / f"run-{method}-{lr:g}-{time.strftime('%H%M%S')}"
            trained = train(method, lr, args, model_dir, train_file, run_dir)
            print(
                f"    {trained['train_seconds']:.0f} s, final loss {trained['final_loss']:.3f} "
                f"(first {trained['first_loss']:.3f})",
                flush=True,
            )
            if method == "lora":
                after = evaluate_model(model_dir, eval_file, args.eval_limit, adapter=run_dir)
            else:
                after = evaluate_model(run_dir, eval_file, args.eval_limit)
            print(_kind_line(f"after {method}", after), flush=True)
            improved = (after["accuracy"] or 0) > (before["accuracy"] or 0)
            summary = run_summary(before, after, baselines)
            print(
                f"    picture gain (colour + count answer loss, swapped / own − 1): {summary['picture_gain']:+.1%}",
                flush=True,
            )
            runs.append({**trained, "summary": summary, "after": after, "improved": improved})
            if args.loss_curve is not None and len(runs) == 1 and (run_dir / "loss.png").is_file():
                import shutil

                args.loss_curve.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(run_dir / "loss.png", args.loss_curve)

    result = {
        "benchmark": "learn",
        "command": " ".join(["python benchmarks/learn_bench.py", *(argv if argv is not None else sys.argv[1:])]),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine,
        "data": {
            "n": args.n,
            "seed": args.seed,
            "image_size": args.image_size,
            "max_shapes": args.max_shapes,
            "question_kinds": kinds,
            "train_samples": data.train_samples,
            "eval_samples": data.eval_samples,
            "eval_samples_asked": len(eval_samples),
            "questions_per_kind_both_splits": data.questions,
            "synth_seconds": data.elapsed_s,
        },
        "model": {
            "preset": "tiny",
            "seed": args.seed,
            "parameters": model_info["parameters"],
            "vocab_size": model_info["vocab_size"],
            "weights_sha256": weights,
        },
        "settings": {
            "steps": args.steps,
            "batch_size": args.batch_size,
            "grad_accum": args.grad_accum,
            "warmup_steps": args.warmup_steps,
            "weight_decay": args.weight_decay,
            "lr_scheduler": "cosine",
            "lora_r": args.lora_r,
            "lora_alpha": args.lora_alpha,
            "lora_dropout": args.lora_dropout,
            "train_vit_with_full": args.train_vit,
        },
        "constant_baselines": baselines,
        "before": before,
        "before_reused_from_work_folder": before_reused,
        "runs": runs,
        "total_seconds": round(time.perf_counter() - wall, 1),
        "require_pictures": args.require_pictures,
        "passed": all(
            run["improved"] and (not args.require_pictures or run["summary"]["reads_pictures"]) for run in runs
        ),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", "utf-8")
    print(f"wrote {args.output} ({result['total_seconds']:.0f} s in all)")
    for run in runs:
        if not run["improved"]:
            print(
                f"FAIL: {run['method']} (lr {run['lr']:g}) did not improve: accuracy {before['accuracy']} → "
                f"{run['after']['accuracy']}",
                file=sys.stderr,
            )
        if args.require_pictures and not run["summary"]["reads_pictures"]:
            print(
                f"FAIL: {run['method']} (lr {run['lr']:g}) does not read the pictures: picture gain "
                f"{run['summary']['picture_gain']:+.1%} (at least {PICTURE_GAIN_REQUIRED:.0%} required)",
                file=sys.stderr,
            )
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
