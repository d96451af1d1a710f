#!/usr/bin/env python
"""How much work the host does per micro-batch of `qwenvl train`, on a model as deep as Qwen-VL 7B.

    python benchmarks/host_ops_bench.py                     # operator counts and host time
    python benchmarks/host_ops_bench.py --label before --output /tmp/before.json   # in an older checkout
    python benchmarks/host_ops_bench.py --baseline /tmp/before.json               # then here: the ratio

On the H100 the 7B grid's seconds per step hardly grow from 512 to 2,048 tokens (docs/profile.md): the GPU
waits for the host, which dispatches and launches one kernel per operator. This benchmark measures that
work without a GPU, on a model with the official depth (32 LM blocks, 48 ViT blocks, the 256-query
resampler) and tiny widths, so that the operators are the 7B model's and their arithmetic costs little.

1. Operators: it trains through the code `qwenvl train` runs (`run_training`, via the profile worker: same
   data, LoRA, gradient checkpointing) and, for one micro-batch of 384 tokens after the first optimizer
   step, counts every aten operator dispatched (forward, checkpoint recomputation, backward) and those that
   make the host wait for the device (`.item()` and `bool()` of a tensor, `nonzero`). Exact, and the same
   on any machine. (Training on a CPU is fp32; bf16 on a GPU adds casts.)
2. Host time: forward and backward of one text-only micro-batch of about 30 tokens, where the arithmetic
   of the tiny widths is negligible and what is left is Python, dispatch and autograd — the host's share
   of a GPU step, less the launches. As on a GPU: bf16 weights, fp32 LoRA adapters made by the runner's
   own `apply_method`, autocast to bf16, gradient checkpointing; one torch thread. Four variants —
   non-reentrant or reentrant checkpointing, eager or `--compile` — each in a fresh process, 3 warm-up
   micro-batches then 15 timed; the variants alternate over `--rounds` rounds and the figure is the median
   of the rounds' medians. Seconds depend on this CPU; the ratios between variants are the result.

Results go to benchmarks/results/host-ops.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

from _machine import load_average, machine_info, write_result

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "host-ops.json"
PACKAGES = ["qwenvl", "torch", "transformers", "peft"]
SYNC_OPS = {"aten._local_scalar_dense", "aten.nonzero", "aten.is_nonzero", "aten.item"}


def build_deep_skinny(folder: Path) -> dict:
    """A checkpoint with the 7B model's depth and the tiny preset's widths (image 56 px: the resampler still
    gives 256 vectors per picture; only the ViT's patch count is smaller)."""
    from qwenvl_cli.model.checkpoint import default_generation_config, save_checkpoint
    from qwenvl_cli.model.presets import build_model, preset_config, tiny_ranks
    from qwenvl_cli.model.tokenizer import VOCAB_FILE, QwenVLTokenizer, write_ranks

    tokenizer = QwenVLTokenizer(tiny_ranks(), name="tiny")
    config = preset_config("tiny", tokenizer.num_ranks)
    config.num_hidden_layers = 32
    config.visual = dict(config.visual, layers=48)
    model = build_model(config, 0)
    write_ranks(tiny_ranks(), folder.parent / VOCAB_FILE)
    save_checkpoint(model, folder, folder.parent / VOCAB_FILE, default_generation_config(tokenizer, chat=True))
    return {"lm_blocks": 32, "vit_blocks": 48, "hidden": config.hidden_size, "vit_width": config.visual["width"]}


def measure(folder: Path, length: int, grad_accum: int) -> dict:
    import torch
    import transformers
    from torch.utils._python_dispatch import TorchDispatchMode

    from qwenvl_cli.profile_worker import run_cell

    counts: collections.Counter = collections.Counter()

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            counts[str(func.overloadpacket)] += 1
            return func(*args, **(kwargs or {}))

    calls = [0]
    original = transformers.Trainer.training_step

    def training_step(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] != grad_accum + 1:
            return original(self, *args, **kwargs)
        with Count():
            return original(self, *args, **kwargs)

    transformers.Trainer.training_step = training_step
    try:
        spec = {
            "model": str(folder),
            "method": "lora",
            "quant": None,
            "length": length,
            "batch_size": 1,
            "grad_accum": grad_accum,
            "steps": 2,
            "warmup": 1,
            "recipe": "qwenvl",
            "threads": torch.get_num_threads(),
            "gradient_checkpointing": True,
        }
        record = run_cell(spec)
    finally:
        transformers.Trainer.training_step = original
    if record.get("status") != "ok":
        raise SystemExit(f"the training run failed: {record}")
    return {
        "length": length,
        "precision": "fp32 (training on a CPU is fp32; bf16 on a GPU adds casts)",
        "aten_ops_per_micro_batch": sum(counts.values()),
        "host_syncs_per_micro_batch": sum(counts[name] for name in SYNC_OPS),
        "top_ops": dict(counts.most_common(15)),
    }


VARIANTS = {  # name: (reentrant checkpointing, compiled blocks)
    "eager, non-reentrant": (False, False),
    "eager, reentrant": (True, False),
    "compiled, non-reentrant": (False, True),
    "compiled, reentrant": (True, True),
}


def time_variant(folder: Path, name: str, timed: int = 15) -> dict:
    """Median seconds of forward + backward of a ~30-token text-only micro-batch (see the module's text)."""
    import statistics
    import time

    import torch

    from qwenvl_cli.families import family_named
    from qwenvl_cli.model.checkpoint import load_checkpoint
    from qwenvl_cli.model.template import ChatTemplate
    from qwenvl_cli.train.method import apply_method
    from qwenvl_cli.train.options import TrainOptions
    from qwenvl_cli.train.placement import compile_blocks
    from qwenvl_cli.train.presets import resolve_rules

    reentrant, compiled = VARIANTS[name]
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, tokenizer = load_checkpoint(folder, dtype=torch.bfloat16)
    options = TrainOptions(method="lora", model=folder, data=folder / "unused.json")
    family = family_named("qwen-vl")
    model = apply_method(model, options, resolve_rules("lora"), family)
    model.train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    model.enable_input_require_grads()
    if compiled:
        compile_blocks(model, family)
    encoded = ChatTemplate(tokenizer).encode([("user", "Describe the red square."), ("assistant", "A blue circle.")])
    ids, labels = torch.tensor([encoded.input_ids]), torch.tensor([encoded.labels])

    def micro_batch() -> float:
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        return time.perf_counter() - started

    for _ in range(3):
        micro_batch()
    seconds = [micro_batch() for _ in range(timed)]
    return {"variant": name, "tokens": ids.shape[1], "median_s": round(statistics.median(seconds), 5)}


def host_time(folder: Path, rounds: int) -> dict:
    import os
    import statistics
    import subprocess

    per_round: dict[str, list[float]] = {name: [] for name in VARIANTS}
    names = list(VARIANTS)
    for round_index in range(rounds):
        order = names if round_index % 2 == 0 else names[::-1]
        for name in order:
            done = subprocess.run(
                [sys.executable, __file__, "--time-variant", name, "--folder", str(folder)],
                capture_output=True,
                text=True,
                check=False,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
            )
            if done.returncode != 0:
                raise SystemExit(f"{name} failed:\n{done.stderr[-2000:]}")
            record = json.loads(done.stdout.strip().splitlines()[-1])
            per_round[name].append(record["median_s"])
            print(json.dumps(record), flush=True)
    medians = {name: statistics.median(values) for name, values in per_round.items()}
    first = names[0]
    return {
        "tokens": record["tokens"],
        "seconds_per_micro_batch": {name: round(value, 5) for name, value in medians.items()},
        "per_round": per_round,
        "vs_eager_non_reentrant": {name: round(value / medians[first], 3) for name, value in medians.items()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=384)
    parser.add_argument("--grad-accum", type=int, default=4)
    parser.add_argument("--label", default="current", help="a name for this tree in the JSON")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--baseline", type=Path, help="this script's JSON from an earlier checkout, for the ratio")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the four host-time variants")
    parser.add_argument("--no-time", action="store_true", help="operator counts only")
    parser.add_argument("--time-variant", help=argparse.SUPPRESS)  # one variant, in a child process
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.time_variant:
        print(json.dumps(time_variant(args.folder, args.time_variant)))
        return 0
    with tempfile.TemporaryDirectory(prefix="qwenvl-host-ops-") as scratch:
        folder = Path(scratch) / "deep-skinny"
        shape = build_deep_skinny(folder)
        run = measure(folder, args.length, args.grad_accum)
        print(json.dumps(run), flush=True)
        timing = None if args.no_time else host_time(folder, args.rounds)
    results = {
        "benchmark": "host_ops",
        "label": args.label,
        "machine": machine_info(PACKAGES),
        "model": shape,
        "method": "lora (chat template), gradient checkpointing, batch 1",
        "run": run,
        "host_time": timing,
        "load_average_at_end": load_average(),
    }
    if args.baseline:
        baseline = json.loads(args.baseline.read_text("utf-8"))
        before = baseline["run"]
        results["baseline"] = {"label": baseline["label"], "commit": baseline["machine"]["git_commit"], "run": before}
        results["ops_vs_baseline"] = round(run["aten_ops_per_micro_batch"] / before["aten_ops_per_micro_batch"], 3)
    write_result(args.output, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
