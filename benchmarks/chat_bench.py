#!/usr/bin/env python
"""`qwenvl chat` speed: time to first token and tokens per second, with the KV cache and without.

    python benchmarks/chat_bench.py                       # tiny model, CPU, 256 new tokens, 5 runs each
    python benchmarks/chat_bench.py --new-tokens 64 128 --threads 1 2

Everything goes through the chat service (`open_conversation`, `Conversation.stream`: the prompt built as
`qwenvl chat` builds it, pictures numbered, the answer decoded piece by piece), on a freshly initialised tiny
model in fp32. The question carries one 448-px picture (258 positions). So that every run writes exactly N
tokens, the session's stop tokens are switched off for the benchmark (a trained model stops by itself; a
random one may stop at any token). Each configuration runs `--repeat` times, alternating cache on and off,
after one warm-up of each; the JSON keeps every run and the medians. Time to first token covers building
the prompt, reading and preprocessing the picture, the vision tower and the prefill. Results go to
benchmarks/results/chat.json.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _machine import load_average, machine_info, write_result

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "chat.json"
PACKAGES = ["qwenvl", "torch", "transformers", "Pillow", "numpy"]


def one_run(conversation, settings) -> dict:
    conversation.clear()
    conversation.pending.append(conversation.picture_for_bench)
    started = time.perf_counter()
    first = None
    pieces = 0
    for _ in conversation.stream("Describe the picture in detail.", settings):
        if first is None:
            first = time.perf_counter() - started
        pieces += 1
    total = time.perf_counter() - started
    tokens = settings.max_new_tokens
    return {
        "first_token_s": round(first or total, 4),
        "total_s": round(total, 4),
        "tokens_per_s_after_first": round((tokens - 1) / max(total - (first or 0), 1e-9), 1),
        "pieces": pieces,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, nargs="+", default=[256])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, nargs="+", default=[2])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    import torch
    from PIL import Image, ImageDraw

    from qwenvl_cli.chat import open_conversation
    from qwenvl_cli.model.generation import ChatSession, GenerationSettings
    from qwenvl_cli.model.presets import init_model

    ChatSession.stop_ids = lambda self: []  # exactly N tokens per run (see the docstring)
    results = []
    with tempfile.TemporaryDirectory(prefix="qwenvl-chat-bench-") as scratch:
        work = Path(scratch)
        init_model("tiny", work / "tiny", seed=0)
        picture = work / "picture.png"
        image = Image.new("RGB", (448, 448), (245, 245, 240))
        ImageDraw.Draw(image).ellipse((100, 120, 300, 320), fill=(40, 80, 220))
        image.save(picture)
        conversation = open_conversation(work / "tiny")
        conversation.picture_for_bench = str(picture)
        for threads in args.threads:
            torch.set_num_threads(threads)
            for tokens in args.new_tokens:
                runs: dict[str, list[dict]] = {"cache": [], "no_cache": []}
                load_before = load_average()
                for round_index in range(args.repeat + 1):
                    order = ("cache", "no_cache") if round_index % 2 == 0 else ("no_cache", "cache")
                    for mode in order:
                        settings = GenerationSettings(max_new_tokens=tokens, use_cache=mode == "cache")
                        record = one_run(conversation, settings)
                        if round_index > 0:  # round 0 warms up
                            runs[mode].append(record)
                medians = {
                    mode: {key: statistics.median(r[key] for r in records) for key in records[0] if key != "pieces"}
                    for mode, records in runs.items()
                }
                speedup = medians["no_cache"]["total_s"] / medians["cache"]["total_s"]
                results.append(
                    {
                        "threads": threads,
                        "new_tokens": tokens,
                        "median": medians,
                        "total_time_no_cache_over_cache": round(speedup, 2),
                        "runs": runs,
                        "load_average_before": load_before,
                        "load_average_after": load_average(),
                    }
                )
                print(
                    f"threads {threads} · {tokens} tokens · first token "
                    f"{medians['cache']['first_token_s'] * 1000:.0f} ms"
                    f" · with cache {medians['cache']['tokens_per_s_after_first']:,.0f} tok/s, without "
                    f"{medians['no_cache']['tokens_per_s_after_first']:,.0f} tok/s ({speedup:.1f}× faster in all)",
                    flush=True,
                )
    out = {
        "benchmark": "chat",
        "command": "python benchmarks/chat_bench.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(PACKAGES),
        "model": "tiny (random weights, fp32, CPU), one 448-px picture (258 positions) in the question",
        "results": results,
    }
    write_result(args.output, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
