#!/usr/bin/env python
"""How much work the host does per micro-batch of `qwenvl train`, on a model as deep as Qwen-VL 7B.

    python benchmarks/host_ops_bench.py                     # LoRA, 384 tokens
    python benchmarks/host_ops_bench.py --label before --output /tmp/before.json   # in an older checkout
    python benchmarks/host_ops_bench.py --baseline /tmp/before.json               # then here: the ratio

On the H100 the 7B grid's seconds per step hardly grow from 512 to 2,048 tokens (docs/profile.md): the GPU
waits for the host, which launches one kernel per operator. This benchmark counts that work without a GPU.
The model has the official depth (32 LM blocks, 48 ViT blocks, the 256-query resampler) and tiny widths, so
that the operators are the 7B model's and their arithmetic costs little. It trains through the code
`qwenvl train` runs (`run_training`, via the profile worker: same data, LoRA, gradient checkpointing), and
for one micro-batch after the first optimizer step it records every aten operator dispatched (forward,
checkpoint recomputation, backward) and how many of them make the host wait for the device (`.item()` and
`bool()` of a tensor, `nonzero`). The counts are exact and the same on any machine; seconds are not recorded,
because on a CPU they are the CPU's arithmetic, not launch overhead, and on this shared 2-core VM the same
code measured 0.44 and 0.59 s per micro-batch minutes apart. Results go to benchmarks/results/host-ops.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

from _machine import load_average, machine_info

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=384)
    parser.add_argument("--grad-accum", type=int, default=4)
    parser.add_argument("--label", default="current", help="a name for this tree in the JSON")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--baseline", type=Path, help="this script's JSON from an earlier checkout, for the ratio")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="qwenvl-host-ops-") as scratch:
        folder = Path(scratch) / "deep-skinny"
        shape = build_deep_skinny(folder)
        run = measure(folder, args.length, args.grad_accum)
    print(json.dumps(run), flush=True)
    results = {
        "benchmark": "host_ops",
        "label": args.label,
        "machine": machine_info(PACKAGES),
        "model": shape,
        "method": "lora (chat template), gradient checkpointing, batch 1",
        "run": run,
        "load_average_at_end": load_average(),
    }
    if args.baseline:
        baseline = json.loads(args.baseline.read_text("utf-8"))
        before = baseline["run"]
        results["baseline"] = {"label": baseline["label"], "commit": baseline["machine"]["git_commit"], "run": before}
        results["ops_vs_baseline"] = round(run["aten_ops_per_micro_batch"] / before["aten_ops_per_micro_batch"], 3)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n", "utf-8")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
