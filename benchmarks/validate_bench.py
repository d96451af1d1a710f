#!/usr/bin/env python
"""Benchmark `validate_data`: the structural pass (JSON list and JSONL) and local image checks.

    python benchmarks/validate_bench.py                       # defaults: 1,000,000 samples, 2,000 JPEGs, 300 PNGs
    python benchmarks/validate_bench.py --samples 100000 --images 500 --pngs 100 --keep
    python benchmarks/validate_bench.py --profile 200000      # cProfile of the structural pass, in-process

Every measured run happens in a fresh subprocess (`--child`), so that peak RSS belongs to that run alone; each
measurement is repeated (`--repeat`, default 3) and the median run is reported. Peak RSS is the child's VmHWM:
its ru_maxrss is also recorded, but on Linux exec() carries the parent's peak into it.
Data is generated deterministically (seeded) in the seed format: a JSON list indented by 2 (as `json.dump(...,
indent=2, ensure_ascii=False)` writes it) and the same samples as JSONL. Image files are freshly written, so
they are read from the page cache (a warm-cache measurement). Results go to benchmarks/results/validate.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from json.encoder import encode_basestring as _enc  # C-accelerated, ensure_ascii=False
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "validate.json"

# Targets from the issue.
TARGET_SAMPLES_PER_S = 50_000
TARGET_PEAK_OVER_FILE = 3.0
TARGET_IMAGES_PER_S = 300

# --------------------------------------------------------------------------------------------------------------
# Sample generation
# --------------------------------------------------------------------------------------------------------------

EN_QUESTIONS = [
    "What is happening in this picture?",
    "Describe the image in detail.",
    "How many people can you see in the photo?",
    "What color is the car parked near the building?",
    "Is there anything unusual about this scene? Explain briefly.",
    "What time of day do you think this photo was taken, and why?",
    "Read the text on the sign and tell me what it says.",
    "What is the main object in the image and what is it used for?",
    "Could you write a short caption for this photo?",
    "What kind of weather is shown here?",
]
ZH_QUESTIONS = [
    "这张图片里有什么？",
    "请详细描述这张图片。",
    "图中有几个人？",
    "图片中的天气怎么样？",
    "这张照片是在什么地方拍的？请说明理由。",
    "请为这张图片写一句简短的标题。",
]
EN_SENTENCES = [
    "The image shows a busy street with several pedestrians crossing at the intersection.",
    "A red bicycle is leaning against a brick wall on the left side of the frame.",
    "In the background there is a tall glass building reflecting the afternoon sun.",
    "Two children are playing with a ball on the grass near a wooden bench.",
    "The sky is mostly clear, with a few thin clouds near the horizon.",
    "A small brown dog is sitting next to its owner, looking at the camera.",
    "The table is covered with plates of food, cups of coffee and a vase of flowers.",
    "It appears to be early evening, since the street lights have just been switched on.",
    "The sign above the door reads 'Open 9am to 6pm' in white letters.",
    "There are three cars parked along the curb, and one of them is a blue hatchback.",
    "The photo was likely taken in autumn, as the trees have yellow and orange leaves.",
    "Nothing seems unusual, although the umbrella on the right is open despite the sunshine.",
]
ZH_SENTENCES = [
    "图片中是一条繁忙的街道，几位行人正在路口过马路。",
    "画面左侧有一辆红色自行车靠在砖墙上。",
    "背景中有一栋高大的玻璃建筑，反射着午后的阳光。",
    "两个孩子在长椅旁的草地上踢球。",
    "天空大部分是晴朗的，地平线附近有几朵薄云。",
    "一只棕色的小狗坐在主人身边，看着镜头。",
    "桌子上摆满了食物、咖啡和一瓶鲜花。",
    "看起来是傍晚时分，因为路灯刚刚亮起。",
]
EN_OBJECTS = [
    "red car",
    "dog",
    "man in the blue shirt",
    "traffic light",
    "wooden bench",
    "woman holding an umbrella",
    "bicycle",
    "white cup",
    "laptop",
    "street sign",
    "tree on the left",
    "cat",
]
ZH_OBJECTS = ["红色的汽车", "小狗", "穿蓝色衬衫的男人", "红绿灯", "木质长椅", "自行车", "白色杯子", "猫"]
EN_FOLLOWUPS = [
    "Why do you think so?",
    "What else can you tell me about it?",
    "Is it safe to cross the street here?",
    "What would you suggest doing next?",
]
ZH_FOLLOWUPS = ["为什么这么说？", "还能告诉我更多细节吗？", "你有什么建议？"]


def _box(rng: random.Random) -> str:
    x1 = rng.randrange(0, 900)
    y1 = rng.randrange(0, 900)
    x2 = rng.randrange(x1 + 1, min(1000, x1 + 600))
    y2 = rng.randrange(y1 + 1, min(1000, y1 + 600))
    return f"<box>({x1},{y1}),({x2},{y2})</box>"


def _answer(rng: random.Random, zh: bool) -> str:
    bank = ZH_SENTENCES if zh else EN_SENTENCES
    return ("" if zh else " ").join(rng.sample(bank, rng.randint(1, 4)))


def make_sample(i: int, rng: random.Random) -> tuple[str, list[str]]:
    """One valid sample: (id, turn values); turns alternate user / assistant, starting with user."""
    kind = rng.random()
    zh = rng.random() < 0.15
    picture = f"Picture 1: <img>images/x_{i}.jpg</img>\n"
    if kind < 0.60:  # one picture + question, plain answer; sometimes a text follow-up
        sid = f"vqa_{i:07d}"
        turns = [picture + rng.choice(ZH_QUESTIONS if zh else EN_QUESTIONS), _answer(rng, zh)]
        if rng.random() < 0.35:
            turns += [rng.choice(ZH_FOLLOWUPS if zh else EN_FOLLOWUPS), _answer(rng, zh)]
    elif kind < 0.85:  # grounding
        sid = f"ground_{i:07d}"
        objects = ZH_OBJECTS if zh else EN_OBJECTS
        obj = rng.choice(objects)
        if zh:
            question = f"框出图中的{obj}。"
            answer = f"<ref>{obj}</ref>{_box(rng)}"
        else:
            question = rng.choice(["Where is the {}?", "Find the {} in the image.", "Locate the {}."]).format(obj)
            style = rng.random()
            if style < 0.6:
                answer = f"<ref>the {obj}</ref>{_box(rng)}"
            elif style < 0.8:
                answer = f"<ref>the {obj}s</ref>{_box(rng)}{_box(rng)}"
            else:
                answer = f"The <ref>{obj}</ref>{_box(rng)} is near the center of the picture."
        turns = [picture + question, answer]
        if rng.random() < 0.3:
            other = rng.choice(objects)
            question = f"那{other}呢？" if zh else f"And where is the {other}?"
            turns += [question, f"<ref>{other}</ref>{_box(rng)}"]
    else:  # multi-turn, text only
        sid = f"chat_{i:07d}"
        a, b = i, rng.randrange(1, 10_000)
        if zh:
            turns = [f"{a}加{b}等于多少？", f"{a}加{b}等于{a + b}。"]
        else:
            turns = [f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."]
        if rng.random() < 0.5:
            turns += [rng.choice(ZH_FOLLOWUPS if zh else EN_FOLLOWUPS), _answer(rng, zh)]
    return sid, turns


def _json_entry(sid: str, turns: list[str]) -> str:
    """The sample exactly as json.dumps(list, indent=2, ensure_ascii=False) writes it inside the list."""
    body = ",\n".join(
        f'      {{\n        "from": "{"assistant" if t % 2 else "user"}",\n        "value": {_enc(v)}\n      }}'
        for t, v in enumerate(turns)
    )
    return f'  {{\n    "id": {_enc(sid)},\n    "conversations": [\n{body}\n    ]\n  }}'


def _jsonl_line(sid: str, turns: list[str]) -> str:
    body = ", ".join(
        f'{{"from": "{"assistant" if t % 2 else "user"}", "value": {_enc(v)}}}' for t, v in enumerate(turns)
    )
    return f'{{"id": {_enc(sid)}, "conversations": [{body}]}}\n'


def write_data(samples: int, json_path: Path, jsonl_path: Path | None, seed: int) -> None:
    """Write `samples` generated samples to a JSON list file (and the same samples to a JSONL file)."""
    rng = random.Random(seed)
    chunk = 20_000
    with open(json_path, "w", encoding="utf-8") as fj:
        fl = open(jsonl_path, "w", encoding="utf-8") if jsonl_path is not None else None  # noqa: SIM115
        try:
            fj.write("[\n")
            for lo in range(0, samples, chunk):
                batch = [make_sample(i, rng) for i in range(lo, min(samples, lo + chunk))]
                if lo:
                    fj.write(",\n")
                fj.write(",\n".join(_json_entry(s, t) for s, t in batch))
                if fl is not None:
                    fl.write("".join(_jsonl_line(s, t) for s, t in batch))
            fj.write("\n]\n")
        finally:
            if fl is not None:
                fl.close()


def write_image_data(path: Path, names: list[str]) -> None:
    """A JSON list referencing each image once."""
    entries = [
        _json_entry(f"img_{k:05d}", [f"Picture 1: <img>images/{name}</img>\nDescribe this image.", "A test image."])
        for k, name in enumerate(names)
    ]
    path.write_text("[\n" + ",\n".join(entries) + "\n]\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------------------------
# Image generation
# --------------------------------------------------------------------------------------------------------------

W, H = 640, 480


def write_images(folder: Path, count: int, fmt: str, seed: int) -> tuple[list[str], int]:
    """Write `count` distinct W×H images (gradient + waves + noise). Returns (names, total bytes)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    ext = "jpg" if fmt == "JPEG" else "png"
    names, total = [], 0
    try:
        import numpy as np
    except ImportError:
        np = None
    if np is not None:
        yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
        xx /= W
        yy /= H
    for k in range(count):
        name = f"{ext}_{k:05d}.{ext}"
        if np is not None:
            rng = np.random.default_rng(seed * 1_000_003 + k)
            a, b, c = (rng.uniform(-120, 120, 3).astype(np.float32) for _ in range(3))
            fx, fy, phase = rng.uniform(2, 25), rng.uniform(2, 25), rng.uniform(0, 6.3)
            wave = (40 * np.sin(fx * xx + fy * yy + phase)).astype(np.float32)
            base = 128 + a * xx[..., None] + b * yy[..., None] + c * 0.3 + wave[..., None]
            noise = rng.integers(-14, 15, size=(H, W, 3), dtype=np.int16)
            pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
            image = Image.fromarray(pixels, "RGB")
        else:
            r = random.Random(seed * 1_000_003 + k)
            grad = Image.linear_gradient("L").resize((W, H)).rotate(r.uniform(0, 360))
            bands = [
                Image.blend(grad, Image.effect_noise((W, H), r.uniform(10, 40)), r.uniform(0.1, 0.5)) for _ in "RGB"
            ]
            image = Image.merge("RGB", bands)
        target = folder / name
        if fmt == "JPEG":
            image.save(target, "JPEG", quality=90)
        else:
            image.save(target, "PNG")
        total += target.stat().st_size
        names.append(name)
    return names, total


# --------------------------------------------------------------------------------------------------------------
# Child: one measured run of validate_data in a fresh process
# --------------------------------------------------------------------------------------------------------------


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def child(path: str, check_images: bool, reference_decodes: int) -> None:
    from qwenvl_cli.data.validate import ValidateOptions, validate_data

    options = ValidateOptions(check_images=check_images)
    baseline_rss = _proc_status_kib("VmRSS")
    baseline_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    baseline_hwm = _proc_status_kib("VmHWM")
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    report = validate_data([path], options)
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    hwm = _proc_status_kib("VmHWM")
    result = {
        "wall_s": wall,
        "cpu_s": cpu,
        "report_elapsed_s": report.elapsed_s,
        "samples": report.samples,
        "valid_samples": report.valid_samples,
        "errors": report.errors,
        "warnings": report.warnings,
        "counts": report.counts,
        "images_checked": report.images_checked,
        "baseline_rss_kib": baseline_rss,
        "baseline_maxrss_kib": baseline_maxrss,
        "baseline_hwm_kib": baseline_hwm,
        "ru_maxrss_kib": maxrss,
        "vm_hwm_kib": hwm,
        # VmHWM is this process's own high-water mark. ru_maxrss is not: on Linux exec() carries the peak RSS of
        # the process that was replaced (the parent's, since subprocess uses vfork) into it.
        "peak_rss_kib": hwm if hwm is not None else maxrss,
        "rss_after_kib": _proc_status_kib("VmRSS"),
    }
    if reference_decodes and check_images:
        # Single-threaded decode time of the same check on the same (cached) files, for comparison.
        from qwenvl_cli.data.images import check_local_image

        folder = Path(path).parent / "images"
        files = sorted(folder.iterdir())[:reference_decodes]
        t0 = time.perf_counter()
        for f in files:
            check_local_image(f)
        result["reference_single_thread_ms_per_image"] = (time.perf_counter() - t0) / len(files) * 1000
        result["reference_images"] = len(files)
    print("BENCH_RESULT " + json.dumps(result))


def run_child(path: Path, check_images: bool, reference_decodes: int = 0) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(path)]
    if check_images:
        cmd += ["--check-images", "--reference-decodes", str(reference_decodes)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    total = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"child failed ({proc.returncode}): {shlex.join(cmd)}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_RESULT "))
    result = json.loads(line[len("BENCH_RESULT ") :])
    result["child_process_wall_s"] = total
    return result


def run_children(path: Path, check_images: bool, repeat: int, reference_decodes: int = 0) -> dict:
    """Run the child `repeat` times; return the run with the median wall time, with every run's wall time and
    the highest peak RSS added."""
    runs = [run_child(path, check_images, reference_decodes if k == 0 else 0) for k in range(max(1, repeat))]
    median = dict(sorted(runs, key=lambda r: r["wall_s"])[len(runs) // 2])
    for key in ("reference_single_thread_ms_per_image", "reference_images"):
        if key in runs[0]:
            median[key] = runs[0][key]
    median["runs_wall_s"] = [round(r["wall_s"], 3) for r in runs]
    median["peak_rss_kib"] = max(r["peak_rss_kib"] for r in runs)
    return median


# --------------------------------------------------------------------------------------------------------------
# Machine info, profile, main
# --------------------------------------------------------------------------------------------------------------


def machine_info() -> dict:
    cpu_model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        nproc = int(subprocess.run(["nproc"], capture_output=True, text=True, check=True).stdout)
    except (OSError, subprocess.CalledProcessError, ValueError):
        nproc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    mem_total = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_total = int(line.split()[1]) * 1024
    except OSError:
        pass
    import PIL

    from qwenvl_cli import __version__

    try:
        import numpy

        numpy_version = numpy.__version__
    except ImportError:
        numpy_version = None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=HERE
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "nproc": nproc,
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model,
        "mem_total_bytes": mem_total,
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "pillow": PIL.__version__,
        "numpy": numpy_version,
        "qwenvl": __version__,
        "git_commit": commit,
    }


def profile(samples: int, seed: int, tmp: Path, top: int = 15) -> None:
    import cProfile
    import pstats

    from qwenvl_cli.data.validate import ValidateOptions, validate_data

    write_data(samples, tmp / "profile.json", tmp / "profile.jsonl", seed)
    for fmt in ("json", "jsonl"):
        path = tmp / f"profile.{fmt}"
        options = ValidateOptions(check_images=False)
        t0 = time.perf_counter()
        report = validate_data([path], options)
        plain = time.perf_counter() - t0
        profiler = cProfile.Profile()
        t0 = time.perf_counter()
        profiler.runcall(validate_data, [path], options)
        profiled = time.perf_counter() - t0
        print(
            f"\n=== {fmt}: {samples:,} samples, {path.stat().st_size:,} bytes, errors={report.errors}; "
            f"unprofiled {plain:.2f} s ({samples / plain:,.0f} samples/s), under cProfile {profiled:.2f} s ==="
        )
        pstats.Stats(profiler).sort_stats("tottime").print_stats(top)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{n:,.0f} B"
        n /= 1024
    return str(n)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=1_000_000, help="samples for the structural benchmark")
    parser.add_argument("--images", type=int, default=2_000, help="JPEG images for the image benchmark")
    parser.add_argument("--pngs", type=int, default=300, help="PNG images for the image benchmark")
    parser.add_argument("--keep", action="store_true", help="keep the temporary files (their folder is printed)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the JSON results")
    parser.add_argument(
        "--repeat", type=int, default=3, help="fresh-process runs per measurement; the median is reported"
    )
    parser.add_argument("--seed", type=int, default=1234, help="seed of the generated data")
    parser.add_argument("--tmpdir", type=Path, default=None, help="parent folder of the temporary files")
    parser.add_argument(
        "--profile", type=int, metavar="N", default=None, help="only cProfile the structural pass on N samples"
    )
    parser.add_argument("--child", metavar="FILE", help=argparse.SUPPRESS)
    parser.add_argument("--check-images", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--reference-decodes", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        child(args.child, args.check_images, args.reference_decodes)
        return 0

    tmp = Path(tempfile.mkdtemp(prefix="qwenvl-validate-bench-", dir=args.tmpdir))
    try:
        if args.profile:
            profile(args.profile, args.seed, tmp)
            return 0
        return _benchmark(args, tmp)
    finally:
        if args.keep:
            print(f"temporary files kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def _benchmark(args: argparse.Namespace, tmp: Path) -> int:
    info = machine_info()
    results: dict = {
        "benchmark": "validate_data",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "machine": info,
        "parameters": {
            "samples": args.samples,
            "images": args.images,
            "pngs": args.pngs,
            "seed": args.seed,
            "repeat": args.repeat,
            "statistic": "median of the fresh-process runs (every run's wall time is listed)",
        },
        "targets": {
            "structural_samples_per_s": TARGET_SAMPLES_PER_S,
            "peak_memory_over_file_size": TARGET_PEAK_OVER_FILE,
            "local_images_per_s": TARGET_IMAGES_PER_S,
        },
        "structural": {},
        "images": {},
    }

    # 1. Structural ------------------------------------------------------------------------------------------
    if args.samples > 0:
        json_path, jsonl_path = tmp / "data.json", tmp / "data.jsonl"
        t0 = time.perf_counter()
        write_data(args.samples, json_path, jsonl_path, args.seed)
        print(f"generated {args.samples:,} samples in {time.perf_counter() - t0:.1f} s")
        for fmt, path in (("json", json_path), ("jsonl", jsonl_path)):
            size = path.stat().st_size
            r = run_children(path, False, args.repeat)
            assert r["errors"] == 0, f"{fmt}: generated data has errors: {r['counts']}"
            assert r["samples"] == args.samples, f"{fmt}: counted {r['samples']} samples, expected {args.samples}"
            if r["warnings"]:
                print(f"warning: {fmt}: generated data has warnings: {r['counts']}", file=sys.stderr)
            peak, base = r["peak_rss_kib"] * 1024, r["baseline_rss_kib"] * 1024
            rate = args.samples / r["wall_s"]
            results["structural"][fmt] = {
                "file_bytes": size,
                "samples": r["samples"],
                "errors": r["errors"],
                "warnings": r["warnings"],
                "wall_s": round(r["wall_s"], 3),
                "wall_s_runs": r["runs_wall_s"],
                "samples_per_s_best": round(args.samples / min(r["runs_wall_s"])),
                "cpu_s": round(r["cpu_s"], 3),
                "report_elapsed_s": r["report_elapsed_s"],
                "child_process_wall_s": round(r["child_process_wall_s"], 3),
                "samples_per_s": round(rate),
                "mb_per_s": round(size / r["wall_s"] / 1e6, 1),
                "baseline_rss_bytes": base,
                "peak_rss_bytes": peak,
                "rss_after_bytes": (r["rss_after_kib"] or 0) * 1024,
                "peak_source": "VmHWM" if r["vm_hwm_kib"] is not None else "ru_maxrss",
                "ru_maxrss_bytes": r["ru_maxrss_kib"] * 1024,
                "baseline_ru_maxrss_bytes": r["baseline_maxrss_kib"] * 1024,
                "peak_over_file_size": round(peak / size, 3),
                "peak_minus_baseline_over_file_size": round((peak - base) / size, 3),
                "pass_samples_per_s": rate >= TARGET_SAMPLES_PER_S,
                "pass_peak_memory": peak < TARGET_PEAK_OVER_FILE * size,
                "pass_peak_minus_baseline_memory": (peak - base) < TARGET_PEAK_OVER_FILE * size,
            }
        if not args.keep:
            json_path.unlink()
            jsonl_path.unlink()

    # 2. Images -----------------------------------------------------------------------------------------------
    for fmt, count in (("JPEG", args.images), ("PNG", args.pngs)):
        if count <= 0:
            continue
        folder = tmp / fmt.lower()
        t0 = time.perf_counter()
        names, total = write_images(folder / "images", count, fmt, args.seed)
        print(f"generated {count:,} {fmt} images ({_fmt_bytes(total)}) in {time.perf_counter() - t0:.1f} s")
        data = folder / "data.json"
        write_image_data(data, names)
        r = run_children(data, True, args.repeat, reference_decodes=min(count, 200))
        assert r["errors"] == 0, f"{fmt}: image check found errors: {r['counts']}"
        assert r["images_checked"] == count, f"{fmt}: checked {r['images_checked']} images, expected {count}"
        rate = count / r["wall_s"]
        results["images"][fmt.lower()] = {
            "images": count,
            "size": f"{W}x{H}",
            "encoding": "JPEG quality 90" if fmt == "JPEG" else "PNG (Pillow default)",
            "total_image_bytes": total,
            "mean_image_bytes": round(total / count),
            "data_file_bytes": data.stat().st_size,
            "errors": r["errors"],
            "wall_s": round(r["wall_s"], 3),
            "wall_s_runs": r["runs_wall_s"],
            "cpu_s": round(r["cpu_s"], 3),
            "images_per_s": round(rate, 1),
            "images_per_s_best": round(count / min(r["runs_wall_s"]), 1),
            "peak_rss_bytes": r["peak_rss_kib"] * 1024,
            "page_cache": "warm (files just written)",
            "default_workers": min(32, (os.cpu_count() or 1) * 2),
            "reference_single_thread_ms_per_image": round(r["reference_single_thread_ms_per_image"], 3),
            "reference_images": r["reference_images"],
            "pass_images_per_s": rate >= TARGET_IMAGES_PER_S,
        }

    s, im = results["structural"], results["images"]
    results["pass"] = {
        "structural_samples_per_s": all(v["pass_samples_per_s"] for v in s.values()) if s else None,
        "peak_memory": all(v["pass_peak_memory"] for v in s.values()) if s else None,
        "peak_minus_baseline_memory": all(v["pass_peak_minus_baseline_memory"] for v in s.values()) if s else None,
        "local_images_per_s": im["jpeg"]["pass_images_per_s"] if "jpeg" in im else None,
    }

    _print_table(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"\nwrote {args.out}")
    return 0


def _print_table(results: dict) -> None:
    m = results["machine"]
    print(f"\n{m['cpu_model']} · nproc {m['nproc']} · Python {m['python']} · Pillow {m['pillow']}")

    def ok(flag: bool) -> str:
        return "PASS" if flag else "FAIL"

    if results["structural"]:
        print(
            f"\n{'structural':<11}{'file':>12}{'wall s':>9}{'samples/s':>12}{'MB/s':>8}"
            f"{'base RSS':>12}{'peak RSS':>12}{'peak/file':>11}{'(pk-base)/file':>16}"
        )
        for fmt, v in results["structural"].items():
            print(
                f"{fmt:<11}{_fmt_bytes(v['file_bytes']):>12}{v['wall_s']:>9.2f}{v['samples_per_s']:>12,}"
                f"{v['mb_per_s']:>8.1f}{_fmt_bytes(v['baseline_rss_bytes']):>12}{_fmt_bytes(v['peak_rss_bytes']):>12}"
                f"{v['peak_over_file_size']:>11.2f}{v['peak_minus_baseline_over_file_size']:>16.2f}"
                f"   speed {ok(v['pass_samples_per_s'])} (≥{TARGET_SAMPLES_PER_S:,}/s),"
                f" memory {ok(v['pass_peak_memory'])} / {ok(v['pass_peak_minus_baseline_memory'])}"
                f" (peak / peak−base <{TARGET_PEAK_OVER_FILE:g}× file)"
            )
    if results["images"]:
        print(f"\n{'images':<11}{'count':>8}{'mean size':>12}{'wall s':>9}{'images/s':>10}{'1-thread ms':>13}")
        for fmt, v in results["images"].items():
            print(
                f"{fmt:<11}{v['images']:>8,}{_fmt_bytes(v['mean_image_bytes']):>12}{v['wall_s']:>9.2f}"
                f"{v['images_per_s']:>10.1f}{v['reference_single_thread_ms_per_image']:>13.2f}"
                + (f"   {ok(v['pass_images_per_s'])} (≥{TARGET_IMAGES_PER_S}/s)" if fmt == "jpeg" else "")
            )


if __name__ == "__main__":
    sys.exit(main())
