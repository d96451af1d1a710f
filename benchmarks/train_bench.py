#!/usr/bin/env python
"""Training throughput: `qwenvl train` (dynamic padding, and --packing) against the upstream recipe (every
sample padded to --max-length), on the same model and data, in one run.

    python benchmarks/train_bench.py                          # defaults: tiny, LoRA, 128 samples, 2 rounds
    python benchmarks/train_bench.py --lengths uniform        # lengths spread evenly instead of log-uniformly
    python benchmarks/train_bench.py --method full --n 64 --rounds 1 --output /tmp/train.json
    python benchmarks/train_bench.py --preset tiny-qwen2.5-vl --min-tokens 64 --max-length 512 \
        --output benchmarks/results/train-qwen2.5-vl.json   # a newer family: against padding to max length
    python benchmarks/train_bench.py --preset qwen-vl-7b --n 32 --rounds 1 --threads 8 \
        --output gpu/train-7b.json      # on a GPU: the official sizes, random weights built in each run

On a GPU (`--preset qwen-vl-7b | qwen2-vl-7b | qwen2.5-vl-7b | qwen3-vl-8b`, refused without one) each run
builds random weights of the official size on the GPU (nothing is read or written), trains in bf16 with
gradient checkpointing as the seed's table does, and reports the CUDA allocator's peak reserved memory beside
the RSS. `--configs` picks some of the configurations (the first named is the baseline of the ratios).

Data: `--n` conversations, one picture each (a 224-px PNG of its own), whose lengths in tokens — the chat
template, the picture's 258 positions and the text together — are drawn from `--min-tokens`..`--max-length`
(log-uniform by default: most samples short, a few long, as in real instruction data; `--lengths uniform`
spreads them evenly). The text is filler words whose count is searched so that each sample has exactly the
drawn length under the model's own template.

Runs, each in a fresh Python process (so that its peak memory is its own), all through `run_training` with
the same seed, learning rate, `--batch-size` and `--grad-accum`, for one epoch:

- upstream: `--recipe upstream`: every sample padded to `--max-length`, no packing, and the upstream model
  code's way of computing (eager attention with the score matrix materialised, logits of every position);
- dynamic: qwenvl's default, each batch padded to its longest sample (a multiple of 8), SDPA attention,
  logits of the scored positions only;
- packing: `--packing`, samples packed into rows of `--max-length` tokens, each sample attending to itself.

For the newer families (`--preset tiny-qwen2-vl | tiny-qwen2.5-vl | tiny-qwen3-vl`) there is no upstream
recipe (it is Qwen-VL v1's finetune.py); the baseline is then `padded`: qwenvl's own training with every batch
padded to `--max-length` (the collator's `pad_to`), which is what padding to the maximum length costs. A sample's
picture is 224 px, whose tokens the family's processor decides (the tiny presets: 16 + 2 markers).

Every configuration runs `--rounds` times, in a rotating order; the JSON keeps every run and the medians.
Reported per run: samples/s and real tokens/s over the training loop (data loading included, model loading
not), the share of computed positions that were padding, peak RSS of the process, and the final loss.
Ratios are against the upstream recipe's median from the same invocation. Results go to
benchmarks/results/train.json (`--output`).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _machine import load_average, machine_info

from qwenvl_cli.train.lengths_data import make_data

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "train.json"
PACKAGES = ["qwenvl", "torch", "transformers", "peft", "accelerate", "Pillow", "numpy"]
CONFIGS = {
    "upstream": {"recipe": "upstream"},
    "dynamic": {},
    "packing": {"packing": True},
}
# the newer families: padding every batch to --max-length is the baseline (no upstream recipe exists for them)
FAMILY_CONFIGS = {
    "padded": {},
    "dynamic": {},
    "packing": {"packing": True},
}
# --------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------


def draw_lengths(n: int, low: int, high: int, kind: str, seed: int) -> list[int]:
    rng = random.Random(seed)
    if kind == "uniform":
        return [rng.randint(low, high) for _ in range(n)]
    return [min(high, max(low, round(math.exp(rng.uniform(math.log(low), math.log(high)))))) for _ in range(n)]


# --------------------------------------------------------------------------------------------------------------
# One run (in its own process)
# --------------------------------------------------------------------------------------------------------------


def worker(spec: dict) -> dict:
    import torch

    from qwenvl_cli.train.runner import TrainOptions, run_training

    torch.set_num_threads(spec["threads"])
    options = TrainOptions(**spec["options"])
    gpu = torch.cuda.is_available()
    if spec.get("pad_to_max"):  # the `padded` baseline: every batch padded to --max-length
        from qwenvl_cli.families import family_for

        family = family_for(options.model)
        collator = family.collator
        family.collator = lambda tokenizer, pad_to=None: collator(tokenizer, pad_to=options.max_length)
    result = run_training(options)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    memory = {"peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3)} if gpu else {}
    return {
        **memory,
        "samples_seen": result.samples_seen,
        "steps": result.global_step,
        "train_seconds": result.train_seconds,
        "samples_per_second": result.samples_per_second,
        "tokens_per_second": result.tokens_per_second,
        "padding_share": result.padding_share,
        "final_loss": result.final_loss,
        "peak_rss_mib": round(peak_kib / 1024, 1),
        "notes": result.notes,
    }


def run_config(name: str, args, work: Path, round_index: int) -> dict:
    options = {
        "method": args.method,
        "model": str(work / "model"),
        "data": str(work / "data" / "data.json"),
        "output": str(work / "runs" / f"{name}-{round_index}"),
        "max_length": args.max_length,
        "batch_size": args.batch_size,
        "grad_accum": args.grad_accum,
        "epochs": 1.0,
        "lr": 1e-4,
        "lora_r": args.lora_r,
        "save_steps": 10**6,
        "seed": 0,
        **configs_of(args)[name],
    }
    if args.on_device:  # the seed's table trains with gradient checkpointing; the weights are built in the run
        options.update(random_weights=True, gradient_checkpointing=True)
    spec = {"threads": args.threads, "options": options, "pad_to_max": name == "padded"}
    command = [sys.executable, __file__, "--worker", json.dumps(spec)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def configs_of(args) -> dict[str, dict]:
    known = CONFIGS if args.preset in ("tiny", "tiny-base", "qwen-vl-7b") else FAMILY_CONFIGS
    if not args.configs:
        return known
    names = [name.strip() for name in args.configs.split(",") if name.strip()]
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise SystemExit(f"--configs {args.configs!r}: choose from {', '.join(known)} for --preset {args.preset}")
    return {name: known[name] for name in names}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=128, help="samples (one epoch each run)")
    parser.add_argument("--lengths", choices=("loguniform", "uniform"), default="loguniform")
    parser.add_argument("--min-tokens", type=int, default=300, help="shortest sample (a picture alone is 258)")
    parser.add_argument("--max-length", type=int, default=2048, help="longest sample, the upstream padding width")
    parser.add_argument("--method", choices=("lora", "full"), default="lora")
    parser.add_argument(
        "--preset",
        default="tiny",
        help="init-model preset: tiny (Qwen-VL) or tiny-qwen2-vl|tiny-qwen2.5-vl|tiny-qwen3-vl",
    )
    parser.add_argument("--batch-size", type=int, default=1, help="the seed's table: 1")
    parser.add_argument("--grad-accum", type=int, default=8, help="the seed's table: 8")
    parser.add_argument("--lora-r", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each run")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each configuration, in rotating order")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--configs", help="comma-separated configurations (default: all; the first is the baseline)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    import torch

    from qwenvl_cli.families import family_of_preset

    family = family_of_preset(args.preset)
    args.on_device = args.preset in family.device_presets
    if args.on_device and not torch.cuda.is_available():
        raise SystemExit(f"--preset {args.preset} needs a GPU: its random weights are built there in each run")
    configs_of(args)  # a bad --configs stops here, before any data is built
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="qwenvl-train-bench-") as scratch:
        work = Path(scratch)
        vocab = family.tiny_vocabulary(work / family.tokenizer_files[0]) if args.on_device else None
        family.init_model(args.preset, work / "model", seed=0, **({"vocab": vocab} if vocab else {}))
        wanted = draw_lengths(args.n, args.min_tokens, args.max_length, args.lengths, args.seed)
        lengths = make_data(work / "data", work / "model", wanted, args.seed)
        print(
            f"{args.n} samples, {min(lengths)}–{max(lengths)} tokens, mean {statistics.mean(lengths):.0f} "
            f"({args.lengths}); padding width {args.max_length}",
            flush=True,
        )
        names = list(configs_of(args))
        baseline = names[0]
        runs: dict[str, list[dict]] = {name: [] for name in names}
        load_before = load_average()
        for round_index in range(args.rounds):
            order = names[round_index % len(names) :] + names[: round_index % len(names)]
            for name in order:
                record = run_config(name, args, work, round_index)
                runs[name].append(record)
                print(
                    f"  round {round_index + 1} {name:9s} {record['samples_per_second']:7.2f} samples/s "
                    f"{record['tokens_per_second']:9,.0f} tokens/s  padding {record['padding_share']:.0%}  "
                    f"peak {record['peak_rss_mib']:,.0f} MiB"
                    + (f", GPU {record['peak_reserved_gib']:.1f} GiB" if "peak_reserved_gib" in record else ""),
                    flush=True,
                )
        load_after = load_average()

    def median(name: str, key: str) -> float:
        return statistics.median(run[key] for run in runs[name])

    summary = {}
    for name in names:
        keys = ["samples_per_second", "tokens_per_second", "padding_share", "peak_rss_mib", "train_seconds"]
        summary[name] = {key: median(name, key) for key in keys + ["peak_reserved_gib"] * args.on_device}
        summary[name][f"samples_per_second_vs_{baseline}"] = round(
            summary[name]["samples_per_second"] / summary[baseline]["samples_per_second"], 2
        )
        summary[name][f"peak_rss_vs_{baseline}"] = round(
            summary[name]["peak_rss_mib"] / summary[baseline]["peak_rss_mib"], 3
        )
    result = {
        "benchmark": "train",
        "command": "python benchmarks/train_bench.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(PACKAGES),
        "load_average_before": load_before,
        "load_average_after": load_after,
        "data": {
            "samples": args.n,
            "distribution": args.lengths,
            "min_tokens": min(lengths),
            "max_tokens": max(lengths),
            "mean_tokens": round(statistics.mean(lengths), 1),
            "median_tokens": statistics.median(lengths),
            "pictures_per_sample": 1,
        },
        "settings": {
            "model": f"{args.preset} (random weights, "
            + (
                f"built on the GPU, bf16, gradient checkpointing, {torch.cuda.get_device_name(0)})"
                if args.on_device
                else "fp32, CPU)"
            ),
            "baseline": baseline,
            "method": args.method,
            "max_length": args.max_length,
            "batch_size": args.batch_size,
            "grad_accum": args.grad_accum,
            "lora_r": args.lora_r,
            "threads": args.threads,
            "rounds": args.rounds,
        },
        "median": summary,
        "runs": runs,
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n", "utf-8")
    for name in names:
        print(
            f"{name:9s} {summary[name]['samples_per_second']:7.2f} samples/s  "
            f"×{summary[name][f'samples_per_second_vs_{baseline}']:.2f} vs {baseline}  "
            f"peak RSS ×{summary[name][f'peak_rss_vs_{baseline}']:.2f}"
        )
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
