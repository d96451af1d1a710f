#!/usr/bin/env python
"""Peak memory and time of the training loss: the lm_head and cross-entropy over the scored rows, whole
or in chunks (`qwenvl_cli.model.modeling.chunked_scored_loss`), at the official 7B sizes.

    python benchmarks/loss_memory_bench.py                          # CPU, bf16, 512 and 2048 scored rows
    python benchmarks/loss_memory_bench.py --rows 256 1024 2048 --device cuda

Each case runs in a fresh process: an lm_head of 151,936 x 4,096 (frozen, as in LoRA on the chat model and
Q-LoRA; or trainable, as in LoRA on the base model, where peft trains a copy of it), `rows` hidden states
that require a gradient, one forward and one backward pass. Memory is the peak above what the process held
once its inputs existed: on CPU the growth of the peak resident set (glibc is told to return every block
over 128 KiB to the system at once, so the peak is the tensors' peak), on CUDA the allocator's peak
allocated bytes. The loss and the hidden-state gradient of the chunked run are compared with the whole
run's. `qwenvl train` chunks only a frozen lm_head: the trainable cases are here to show why (their chunked
runs force `chunk_trainable=True`). Results go to benchmarks/results/loss-memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from _machine import load_average, machine_info, write_result

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "loss-memory.json"
HIDDEN, VOCAB = 4096, 151936
PACKAGES = ["qwenvl", "torch"]


def _rss_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_case(case: dict) -> dict:
    import torch

    from qwenvl_cli.model.modeling import LOSS_CHUNK_ELEMENTS, chunked_scored_loss

    torch.manual_seed(0)
    device = torch.device(case["device"])
    dtype = torch.bfloat16
    lm_head = torch.nn.Linear(HIDDEN, VOCAB, bias=False, device=device, dtype=dtype)
    torch.nn.init.normal_(lm_head.weight, std=0.02)
    lm_head.weight.requires_grad_(case["trainable"])
    hidden = torch.randn(case["rows"], HIDDEN, device=device, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, VOCAB, (case["rows"],), device=device)
    budget = LOSS_CHUNK_ELEMENTS if case["chunked"] else 2**62
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _rss_bytes()
    started = time.perf_counter()
    loss = chunked_scored_loss(lm_head, hidden, targets, VOCAB, None, budget, chunk_trainable=True)
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    seconds = time.perf_counter() - started
    return {
        **case,
        "chunk_rows": min(case["rows"], max(1, budget // VOCAB)),
        "peak_above_inputs_gib": round(peak / 2**30, 3),
        "seconds": round(seconds, 3),
        "loss": float(loss),
        "hidden_grad_norm": float(hidden.grad.float().norm()),
        "lm_head_grad_norm": float(lm_head.weight.grad.float().norm()) if case["trainable"] else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[512, 2048], help="scored rows per case")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--case", help=argparse.SUPPRESS)  # one case, in a child process
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return 0

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    results = {"benchmark": "loss_memory", "machine": machine_info(PACKAGES), "hidden": HIDDEN, "vocab": VOCAB}
    results["dtype"], results["device"], cases = "bf16", args.device, []
    if args.device.startswith("cuda"):
        import torch

        results["device_name"] = torch.cuda.get_device_name(0)
    for rows in args.rows:
        for trainable in (False, True):
            pair = {}
            for chunked in (False, True):
                case = {"rows": rows, "trainable": trainable, "chunked": chunked, "device": args.device}
                done = subprocess.run(
                    [sys.executable, __file__, "--case", json.dumps(case)],
                    capture_output=True,
                    text=True,
                    env=env,
                    check=False,
                )
                if done.returncode != 0:
                    raise SystemExit(f"case {case} failed:\n{done.stderr[-2000:]}")
                pair[chunked] = json.loads(done.stdout.strip().splitlines()[-1])
                print(json.dumps(pair[chunked]), flush=True)
            whole, chunked_result = pair[False], pair[True]
            chunked_result["memory_vs_whole"] = round(
                chunked_result["peak_above_inputs_gib"] / whole["peak_above_inputs_gib"], 3
            )
            chunked_result["time_vs_whole"] = round(chunked_result["seconds"] / whole["seconds"], 3)
            chunked_result["loss_difference"] = abs(chunked_result["loss"] - whole["loss"])
            chunked_result["hidden_grad_norm_difference"] = abs(
                chunked_result["hidden_grad_norm"] - whole["hidden_grad_norm"]
            )
            cases += [whole, chunked_result]
    results["cases"] = cases
    results["load_average_at_end"] = load_average()
    write_result(args.output, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
