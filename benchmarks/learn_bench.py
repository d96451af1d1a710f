#!/usr/bin/env python
"""Proof of learning: `qwenvl train` makes the built-in tiny model learn the synthetic shapes task.

    python benchmarks/learn_bench.py                               # the recorded configuration (a few minutes, CPU)
    python benchmarks/learn_bench.py --method lora --lr 5e-3 --lora-r 64 --lora-alpha 128
    python benchmarks/learn_bench.py --method full lora --lr 2e-3 5e-3   # both, one learning rate each
    python benchmarks/learn_bench.py --steps 100 --output /tmp/learn.json   # a quick look

Steps, all through the product's Python API in one process:

1. `synthesize` a seeded data set (`--n` samples, 10 % held out in eval.json; pictures `--image-size` px).
2. `init_model("tiny", seed=--seed)`: a freshly initialised tiny model (56-pixel pictures, 0.8 M parameters).
3. Ask it the first `--eval-limit` samples of eval.json (`evaluate_folder`): the "before" numbers.
4. Train it with `run_training` (each `--method` in turn, `--steps` optimizer steps of
   `--batch-size` × `--grad-accum` samples, cosine schedule, one learning rate per method).
5. Ask the trained model the same questions (`evaluate_folder`, with `adapter_dir` for LoRA): "after".

Scores are `qwenvl eval`'s: exact match for answers, Acc@0.5 for boxes. The question kind (colour, count,
grounding, compare = "which picture has more shapes") is read from the question text, and every question
is scored per kind as well, by the same `evaluate` function with every wrong answer kept (the totals are
checked against `evaluate_folder`'s report). To tell learning to read the picture from learning the answer
*form*, each kind also has a *constant baseline*: the accuracy on the same questions of always giving the
most common training answer of that kind (for grounding: the mean training box, per question's wording).
The JSON also keeps the most common predictions per kind and a few example answers.

The script exits with status 1 when, for any method, the accuracy after training is not higher than before,
so a regression cannot pass silently. Results go to benchmarks/results/learn.json (`--output`).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
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
        entry = per_kind.setdefault(kind, {"n": 0, "correct": 0, "ious": []})
        entry["n"] += 1
        miss = wrong.get((sample_id, turn))
        entry["correct"] += miss is None
        if kind == "grounding":
            entry["ious"].append(miss.iou if miss is not None else None)
        if kind in predictions:
            shown = miss.prediction if miss is not None else reference  # a correct answer matches its reference
            if kind == "grounding":  # the form, not the numbers: do the answers name the shape and give a box?
                shown = _grounding_form(shown, question)
            predictions[kind][shown] += 1
            right[kind][shown] += miss is None
    for kind, entry in per_kind.items():
        ious = entry.pop("ious")
        entry["accuracy"] = _ratio(entry["correct"], entry["n"])
        if kind == "grounding":
            known = [x for x in ious if x is not None]
            entry["mean_iou_of_misses"] = round(sum(known) / len(known), 4) if known else None
        entry["distinct_predictions"] = len(predictions.get(kind, ()))
        # [answer, times given, times correct]; for grounding the answer's form instead of its text
        entry["top_predictions"] = [
            [text, count, right[kind][text]] for text, count in predictions.get(kind, Counter()).most_common(6)
        ]
    examples = [
        {"question": r.question.splitlines()[-1], "reference": r.reference, "prediction": r.prediction, "iou": r.iou}
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
    }


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


def _kind_line(label: str, block: dict) -> str:
    parts = [f"all {block['accuracy'] or 0:.1%}"]
    for kind in KINDS:
        entry = block["per_kind"].get(kind)
        if entry:
            parts.append(f"{kind} {entry['accuracy'] or 0:.1%} ({entry['correct']}/{entry['n']})")
    return f"  {label:<22} " + " · ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="samples synthesised (train + eval)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, the model and the training")
    parser.add_argument("--image-size", type=int, default=224, help="side of the synthetic pictures")
    parser.add_argument("--eval-limit", type=int, default=100, help="eval.json samples asked")
    parser.add_argument("--method", nargs="+", choices=("full", "lora"), default=["full"])
    parser.add_argument("--lr", type=float, nargs="+", default=[2e-3], help="one value, or one per --method")
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--warmup-steps", type=int, default=0)
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
        data = synthesize(work / "data", args.n, seed=args.seed, image_size=args.image_size, force=True)
        train_file, eval_file = Path(data.train_file), Path(data.eval_file)
        model_dir = work / "tiny"
        model_info = init_model("tiny", model_dir, seed=args.seed, force=True)
        train_samples = json.loads(train_file.read_text("utf-8"))
        eval_samples = json.loads(eval_file.read_text("utf-8"))[: args.eval_limit]
        baselines = constant_baselines(train_samples, _questions(eval_samples))

        key = {"n": args.n, "seed": args.seed, "image_size": args.image_size, "eval_limit": args.eval_limit}
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
            runs.append({**trained, "after": after, "improved": improved})

    result = {
        "benchmark": "learn",
        "command": "python benchmarks/learn_bench.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine,
        "data": {
            "n": args.n,
            "seed": args.seed,
            "image_size": args.image_size,
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
        "passed": all(run["improved"] for run in runs),
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
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
