#!/usr/bin/env python
"""Benchmark the native model code: generation with and without the KV cache, and the tokenizer.

    python benchmarks/model_bench.py                         # defaults: 64 and 256 new tokens, 5 runs, 4 MB of text
    python benchmarks/model_bench.py --threads 1 2           # each torch thread count in turn
    python benchmarks/model_bench.py --skip-tokenizer        # generation only
    python benchmarks/model_bench.py --vocab path/to/qwen.tiktoken

Generation: the tiny preset (`qwenvl init-model`, written to a temporary folder and read back with
`load_checkpoint`), fp32 on the CPU, greedy, no stop ids, so that exactly N tokens are generated. Two prompts
go through `QwenVLProcessor.encode_prompt`: one with a picture (258 image tokens + the chat template + a
question) and one text-only. Each N is timed through `stream_tokens` with `GenerationSettings(use_cache=True)`
and `use_cache=False`, alternating the order each round, after one warm-up run of each; every figure is the
median of `--repeat` runs in this one process, for each torch thread count in `--threads` in turn. Every run
must give the same tokens, and `generate` is checked against the stream once per N. The load average before
and after each block is recorded: on a shared machine, other work shows up there first.

Tokenizer: the official vocabulary (151,643 ranks; default /work/shared/vocab/qwen.tiktoken, or --vocab). Load
time of `QwenVLTokenizer.from_file`, `encode` throughput on a generated mixed English/Chinese text (per
paragraph, and as one string), and `ChatTemplate.encode` on generated conversations in the seed's format.
Without the vocabulary file this part is skipped and the JSON says so. Results go to
benchmarks/results/model.json.
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from _machine import load_average, machine_info

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "model.json"
DEFAULT_VOCAB = HERE.parents[1] / "shared" / "vocab" / "qwen.tiktoken"
OFFICIAL_RANKS = 151_643
OFFICIAL_IMG_START = 151_857
PACKAGES = ["qwenvl", "torch", "transformers", "tiktoken", "safetensors", "regex", "Pillow", "numpy"]

PICTURE_QUESTION = "Picture 1: <img>picture.png</img>\nDescribe the image in detail."
TEXT_QUESTION = (
    "A train left the station at nine and arrived three hours later. "
    "How long was the journey, and what time did it arrive?"
)


def _median(values: list[float]) -> float:
    return statistics.median(values)


# --------------------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------------------


def _timed_stream(model, inputs: dict, settings) -> tuple[list[int], float, float]:
    """(tokens, seconds to the first token, seconds to the last token) of one `stream_tokens` run."""
    from qwenvl_cli.model.generation import stream_tokens

    tokens: list[int] = []
    first = None
    start = time.perf_counter()
    for token in stream_tokens(model, inputs["input_ids"], inputs["pixel_values"], settings, stop_ids=()):
        if first is None:
            first = time.perf_counter() - start
        tokens.append(token)
    total = time.perf_counter() - start
    return tokens, first if first is not None else total, total


def _summary(runs: list[tuple[float, float]], new_tokens: int) -> dict:
    ttft = [r[0] for r in runs]
    total = [r[1] for r in runs]
    decode = [(new_tokens - 1) / (t - f) for f, t in runs if t > f]
    return {
        "time_to_first_token_s": round(_median(ttft), 5),
        "total_s": round(_median(total), 4),
        "tokens_per_s": round(new_tokens / _median(total), 1),
        "decode_tokens_per_s": round(_median(decode), 1) if decode else None,
        "runs_time_to_first_token_s": [round(x, 5) for x in ttft],
        "runs_total_s": [round(x, 4) for x in total],
    }


def _measure_prompt(model, name: str, inputs: dict, tokens_list: list[int], repeat: int) -> dict:
    """Cached vs uncached runs of one prompt for each N, alternating which goes first in each round."""
    from qwenvl_cli.model.generation import GenerationSettings, generate
    from qwenvl_cli.model.template import IMAGE_TOKENS

    pictures = 0 if inputs["pixel_values"] is None else int(inputs["pixel_values"].shape[0])
    entry: dict = {
        "prompt_tokens": int(inputs["input_ids"].shape[1]),
        "pictures": pictures,
        "image_tokens": pictures * IMAGE_TOKENS,
        "new_tokens": {},
    }
    for warm in (True, False):  # warm-up: first calls pay for allocations and kernel selection
        _timed_stream(model, inputs, GenerationSettings(max_new_tokens=8, use_cache=warm))
    for n in tokens_list:
        order = (
            ("cache", GenerationSettings(max_new_tokens=n, use_cache=True)),
            ("no_cache", GenerationSettings(max_new_tokens=n, use_cache=False)),
        )
        runs: dict[str, list[tuple[float, float]]] = {"cache": [], "no_cache": []}
        reference: list[int] | None = None
        for round_ in range(repeat):
            for mode, settings in order if round_ % 2 == 0 else reversed(order):
                tokens, first, total = _timed_stream(model, inputs, settings)
                if reference is None:
                    reference = tokens
                assert len(tokens) == n, f"{name}: {mode} gave {len(tokens)} tokens, expected {n}"
                assert tokens == reference, f"{name}, {n} tokens: {mode} differs from the first run"
                runs[mode].append((first, total))
        via_generate = generate(model, inputs["input_ids"], inputs["pixel_values"], order[0][1])
        assert via_generate == reference, f"{name}, {n} tokens: generate() differs from stream_tokens()"
        with_cache, without = _summary(runs["cache"], n), _summary(runs["no_cache"], n)
        decode_ratio = None
        if with_cache["decode_tokens_per_s"] and without["decode_tokens_per_s"]:
            decode_ratio = round(with_cache["decode_tokens_per_s"] / without["decode_tokens_per_s"], 1)
        entry["new_tokens"][str(n)] = {
            "cache": with_cache,
            "no_cache": without,
            "speedup_total": round(without["total_s"] / with_cache["total_s"], 1),
            "speedup_decode": decode_ratio,
            "identical_tokens": True,  # asserted above, for every run and for generate()
            "first_tokens": reference[:12],
        }
        print(
            f"  {name:<8} {n:>4} new tokens: cache {with_cache['total_s']:.3f} s "
            f"({with_cache['tokens_per_s']:,.0f} tok/s, first {with_cache['time_to_first_token_s'] * 1000:.1f} ms)"
            f"  no cache {without['total_s']:.3f} s ({without['tokens_per_s']:,.1f} tok/s, "
            f"first {without['time_to_first_token_s'] * 1000:.1f} ms)"
            f"  → {entry['new_tokens'][str(n)]['speedup_total']}× faster",
            flush=True,
        )
    return entry


def bench_generation(tokens_list: list[int], repeat: int, threads: list[int], seed: int, tmp: Path) -> dict:
    import torch
    from PIL import Image

    from qwenvl_cli.model.checkpoint import load_checkpoint
    from qwenvl_cli.model.presets import init_model
    from qwenvl_cli.model.processor import QwenVLProcessor

    folder = tmp / "tiny"
    written = init_model("tiny", folder, seed=seed)
    t0 = time.perf_counter()
    model, tokenizer = load_checkpoint(folder)
    load_s = time.perf_counter() - t0
    gradient = Image.linear_gradient("L").resize((640, 480))
    bands = (gradient, gradient.rotate(90), gradient.transpose(Image.Transpose.FLIP_TOP_BOTTOM))
    Image.merge("RGB", bands).save(tmp / "picture.png")
    processor = QwenVLProcessor(tokenizer, model.config.image_size, image_root=tmp)
    prompts = {
        "picture": processor.encode_prompt([("user", PICTURE_QUESTION)]),
        "text": processor.encode_prompt([("user", TEXT_QUESTION)]),
    }
    result: dict = {
        "model": {
            "preset": "tiny",
            "parameters": written["parameters"],
            "vocab_size": model.config.vocab_size,
            "hidden_size": model.config.hidden_size,
            "layers": model.config.num_hidden_layers,
            "image_size": model.config.image_size,
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "device": "cpu",
            "load_checkpoint_s": round(load_s, 4),
        },
        "decoding": "greedy (temperature 0), no stop ids",
        "torch_interop_threads": torch.get_num_interop_threads(),
        "by_threads": [],
    }
    default_threads = torch.get_num_threads()
    for count in threads:
        torch.set_num_threads(count)
        print(f"generation: tiny model, CPU, {count} torch thread(s), {repeat} runs each", flush=True)
        block: dict = {"torch_threads": torch.get_num_threads(), "load_average_before": load_average(), "prompts": {}}
        for name, inputs in prompts.items():
            block["prompts"][name] = _measure_prompt(model, name, inputs, tokens_list, repeat)
        block["load_average_after"] = load_average()
        result["by_threads"].append(block)
    torch.set_num_threads(default_threads)
    return result


# --------------------------------------------------------------------------------------------------------------
# Tokenizer: generated text and conversations
# --------------------------------------------------------------------------------------------------------------

EN_SUBJECTS = [
    "The old lighthouse",
    "A delivery van",
    "Our neighbour's cat",
    "The quarterly report",
    "A group of hikers",
    "The city council",
    "My grandmother",
    "The new espresso machine",
    "A flock of pigeons",
    "The football team",
    "This spreadsheet",
    "The night train to Vienna",
]
EN_VERBS = [
    "was repainted",
    "stopped",
    "waited patiently",
    "was published",
    "climbed the ridge",
    "voted",
    "baked bread",
    "broke down",
    "circled the square",
    "trained",
    "crashed",
    "left on time",
]
EN_TAILS = [
    "before the storm arrived",
    "near the harbour",
    "for almost {n} minutes",
    "with {n} pages of appendices",
    "at {n} metres above sea level",
    "after a long debate",
    "every Sunday since {y}",
    "on the third floor",
    "while the market opened",
    "despite the rain",
    "because of a missing formula in row {n}",
    "with {n} passengers on board",
]
ZH_SUBJECTS = [
    "老灯塔",
    "一辆送货车",
    "邻居家的猫",
    "季度报告",
    "一群登山者",
    "市议会",
    "我的奶奶",
    "新咖啡机",
    "足球队",
    "夜班火车",
]
ZH_VERBS = [
    "被重新粉刷了",
    "停了下来",
    "耐心地等待",
    "已经发布",
    "爬上了山脊",
    "投票通过",
    "烤了面包",
    "出了故障",
    "开始训练",
    "准时出发",
]
ZH_TAILS = [
    "在暴风雨来临之前",
    "在港口附近",
    "大约{n}分钟",
    "共有{n}页附录",
    "在海拔{n}米的地方",
    "经过长时间的讨论",
    "自{y}年以来每个星期天",
    "在三楼",
    "尽管下着雨",
    "车上有{n}名乘客",
]


def _fill(template: str, rng: random.Random) -> str:
    return template.format(n=rng.randint(2, 5000), y=rng.randint(1950, 2025))


def _en_sentence(rng: random.Random) -> str:
    return f"{rng.choice(EN_SUBJECTS)} {rng.choice(EN_VERBS)} {_fill(rng.choice(EN_TAILS), rng)}."


def _zh_sentence(rng: random.Random) -> str:
    return f"{_fill(rng.choice(ZH_TAILS), rng)}，{rng.choice(ZH_SUBJECTS)}{rng.choice(ZH_VERBS)}。"


def mixed_paragraphs(target_bytes: int, seed: int) -> list[str]:
    """Paragraphs of 2–8 sentences until `target_bytes` of UTF-8: 65 % English, 30 % Chinese, 5 % both."""
    rng = random.Random(seed)
    paragraphs: list[str] = []
    size = 0
    while size < target_bytes:
        kind = rng.random()
        count = rng.randint(2, 8)
        if kind < 0.65:
            text = " ".join(_en_sentence(rng) for _ in range(count))
        elif kind < 0.95:
            text = "".join(_zh_sentence(rng) for _ in range(count))
        else:
            text = " ".join(_zh_sentence(rng) if k % 2 else _en_sentence(rng) for k in range(count))
        paragraphs.append(text + "\n\n")
        size += len(text.encode("utf-8")) + 2
    return paragraphs


def _box(rng: random.Random) -> str:
    x1, y1 = rng.randrange(0, 800), rng.randrange(0, 800)
    return f"<box>({x1},{y1}),({rng.randrange(x1 + 1, 1000)},{rng.randrange(y1 + 1, 1000)})</box>"


def conversation(i: int, rng: random.Random) -> list[tuple[str, str]]:
    """A sample in the seed's format: one picture + question (55 %), grounding (25 %), or text turns (20 %)."""
    zh = rng.random() < 0.15
    sentence = _zh_sentence if zh else _en_sentence
    picture = f"Picture 1: <img>images/{i:06d}.jpg</img>\n"
    kind = rng.random()
    if kind < 0.55:
        question = "请描述这张图片。" if zh else "What can you see in this photo?"
        turns = [picture + question, ("" if zh else " ").join(sentence(rng) for _ in range(rng.randint(1, 4)))]
    elif kind < 0.80:
        thing = rng.choice(ZH_SUBJECTS if zh else EN_SUBJECTS)
        question = f"框出图中的{thing}。" if zh else f"Where is {thing.lower()}?"
        turns = [picture + question, f"<ref>{thing}</ref>{_box(rng)}"]
    else:
        a, b = rng.randrange(1000), rng.randrange(1000)
        turns = [f"{a}加{b}等于多少？" if zh else f"What is {a} plus {b}?", f"{a + b}。" if zh else f"{a + b}."]
    if rng.random() < 0.3:
        turns += ["还有呢？" if zh else "Anything else?", sentence(rng)]
    return [("user" if k % 2 == 0 else "assistant", value) for k, value in enumerate(turns)]


def _repeat_timed(fn: Callable[[], object], repeat: int) -> tuple[float, list[float], object]:
    times, value = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - t0)
    return _median(times), times, value


def bench_tokenizer(vocab: Path, text_mb: float, conversations: int, repeat: int, seed: int) -> dict:
    from qwenvl_cli.model.template import ChatTemplate
    from qwenvl_cli.model.tokenizer import QwenVLTokenizer, load_ranks

    load_s, load_runs, tokenizer = _repeat_timed(lambda: QwenVLTokenizer.from_file(vocab), repeat)
    read_s, _, _ = _repeat_timed(lambda: load_ranks(vocab), repeat)
    assert tokenizer.num_ranks == OFFICIAL_RANKS, f"{vocab}: {tokenizer.num_ranks} ranks, not the official vocabulary"
    assert tokenizer.img_start_id == OFFICIAL_IMG_START, f"<img> is {tokenizer.img_start_id}"

    paragraphs = mixed_paragraphs(int(text_mb * 1e6), seed)
    text = "".join(paragraphs)
    n_bytes = len(text.encode("utf-8"))
    cjk_chars = sum(1 for ch in text if "\u4e00" <= ch <= "\u9fff")
    tokenizer.encode(paragraphs[0])  # first call compiles tiktoken's regex
    per_paragraph_s, per_paragraph_runs, ids = _repeat_timed(
        lambda: sum(len(tokenizer.encode(p)) for p in paragraphs), repeat
    )
    whole_s, whole_runs, whole = _repeat_timed(lambda: len(tokenizer.encode(text)), repeat)

    rng = random.Random(seed)
    samples = [conversation(i, rng) for i in range(conversations)]
    template = ChatTemplate(tokenizer)
    template_s, template_runs, lengths = _repeat_timed(lambda: [len(template.encode(s)) for s in samples], repeat)
    total_tokens = sum(lengths)
    return {
        "vocab_file": str(vocab),
        "vocab_file_bytes": vocab.stat().st_size,
        "ranks": tokenizer.num_ranks,
        "tokens_with_specials": len(tokenizer),
        "load": {
            "from_file_s": round(load_s, 3),
            "runs_s": [round(x, 3) for x in load_runs],
            "of_which_reading_ranks_s": round(read_s, 3),
        },
        "encode": {
            "text_bytes": n_bytes,
            "text_chars": len(text),
            "cjk_chars": cjk_chars,
            "paragraphs": len(paragraphs),
            "mean_paragraph_bytes": round(n_bytes / len(paragraphs)),
            "tokens": ids,
            "bytes_per_token": round(n_bytes / ids, 2),
            "per_paragraph": {
                "s": round(per_paragraph_s, 3),
                "runs_s": [round(x, 3) for x in per_paragraph_runs],
                "tokens_per_s": round(ids / per_paragraph_s),
                "mb_per_s": round(n_bytes / per_paragraph_s / 1e6, 2),
            },
            "one_string": {
                "s": round(whole_s, 3),
                "runs_s": [round(x, 3) for x in whole_runs],
                "tokens": whole,
                "tokens_per_s": round(whole / whole_s),
                "mb_per_s": round(n_bytes / whole_s / 1e6, 2),
            },
        },
        "chat_template": {
            "conversations": conversations,
            "mix": "55 % picture + question, 25 % grounding (<ref>/<box>), 20 % text; "
            "30 % add a text turn; 15 % Chinese",
            "mean_tokens": round(total_tokens / conversations, 1),
            "note": "token counts include the 258 positions of each picture",
            "s": round(template_s, 3),
            "runs_s": [round(x, 3) for x in template_runs],
            "conversations_per_s": round(conversations / template_s),
            "tokens_per_s": round(total_tokens / template_s),
        },
    }


# --------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[64, 256], help="new tokens to generate")
    parser.add_argument("--repeat", type=int, default=5, help="runs per measurement; the median is reported")
    parser.add_argument(
        "--threads", type=int, nargs="+", default=None, help="torch thread counts to measure (default: torch's)"
    )
    parser.add_argument("--vocab", type=Path, default=DEFAULT_VOCAB, help="the official qwen.tiktoken")
    parser.add_argument("--text-mb", type=float, default=4.0, help="MB of generated text to encode")
    parser.add_argument("--conversations", type=int, default=20_000, help="conversations for ChatTemplate.encode")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the tiny model and the generated text")
    parser.add_argument("--skip-generation", action="store_true", help="tokenizer part only")
    parser.add_argument("--skip-tokenizer", action="store_true", help="generation part only")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the JSON results")
    args = parser.parse_args(argv)
    if args.repeat < 1 or min(args.tokens) < 2 or (args.threads and min(args.threads) < 1):
        parser.error("--repeat and --threads must be ≥ 1, and every --tokens value ≥ 2")

    import torch

    threads = args.threads or [torch.get_num_threads()]
    started = time.perf_counter()
    results: dict = {
        "benchmark": "model",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "machine": machine_info(PACKAGES),
        "parameters": {
            "tokens": args.tokens,
            "repeat": args.repeat,
            "torch_threads": threads,
            "torch_default_threads": torch.get_num_threads(),
            "text_mb": args.text_mb,
            "conversations": args.conversations,
            "seed": args.seed,
            "statistic": "median of the runs in this one process (every run is listed)",
        },
    }
    if args.skip_generation:
        results["generation"] = {"skipped": "--skip-generation"}
    else:
        with tempfile.TemporaryDirectory(prefix="qwenvl-model-bench-") as tmp:
            results["generation"] = bench_generation(args.tokens, args.repeat, threads, args.seed, Path(tmp))
    if args.skip_tokenizer:
        results["tokenizer"] = {"skipped": "--skip-tokenizer"}
    elif not args.vocab.is_file():
        reason = f"official vocabulary not found at {args.vocab}: tokenizer benchmark skipped (pass --vocab PATH)"
        print(reason, file=sys.stderr)
        results["tokenizer"] = {"skipped": reason}
    else:
        print(f"tokenizer: {args.vocab}")
        tok = bench_tokenizer(args.vocab, args.text_mb, args.conversations, args.repeat, args.seed)
        results["tokenizer"] = tok
        enc, chat = tok["encode"], tok["chat_template"]
        print(
            f"  load {tok['load']['from_file_s']:.3f} s · encode per paragraph "
            f"{enc['per_paragraph']['tokens_per_s']:,} tokens/s ({enc['per_paragraph']['mb_per_s']} MB/s), "
            f"one string {enc['one_string']['tokens_per_s']:,} tokens/s ({enc['one_string']['mb_per_s']} MB/s) · "
            f"ChatTemplate.encode {chat['conversations_per_s']:,} conversations/s"
        )
    results["load_average_at_end"] = load_average()
    results["wall_s"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {args.out} ({results['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
