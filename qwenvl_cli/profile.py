"""`qwenvl profile` as a service: memory and speed of training, per method and sample length (no printing).

Every cell (method × length, and × recipe with `baseline="upstream"`) runs real optimizer steps through
`run_training` — the code `qwenvl train` runs — in a fresh process (`python -m qwenvl_cli.profile_worker`),
on synthetic samples of exactly that length with one picture each. Seconds per optimizer step are taken from
the timestamps of the steps after the warmup; peak memory is the CUDA allocator's peak (GPU) or the
process's peak RSS (CPU). A cell that runs out of memory is recorded as OOM, any other failure with its
one-line reason; the grid goes on.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from itertools import pairwise
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from . import __version__
from .errors import QwenvlError
from .families import FAMILIES, family_for, profile_family
from .step_trace import StepTrace

METHODS = ("lora-chat", "lora-base", "qlora", "full")
DEFAULT_LENGTHS = (384, 512, 1024, 2048)
MODEL_PRESETS = tuple(name for family in FAMILIES.values() for name in family.profile_presets)
# Dense bf16 peak FLOP/s (no sparsity) by device name; other devices get no MFU.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}
CellHook = Callable[[str, dict[str, Any]], None]


class ProfileOptions(BaseModel):
    model: Path | None = None
    preset: str | None = None  # one of MODEL_PRESETS
    methods: list[str] = Field(default_factory=lambda: list(METHODS))
    lengths: list[int] = Field(default_factory=lambda: list(DEFAULT_LENGTHS))
    batch_size: int = Field(1, ge=1)
    grad_accum: int = Field(8, ge=1)
    steps: int = Field(3, ge=1)
    warmup: int = Field(1, ge=0)
    baseline: Literal["upstream"] | None = None
    gpu_memory_gib: float | None = None
    threads: int | None = None  # torch threads per cell (CPU)
    gradient_checkpointing: bool = True  # as the upstream scripts train
    compile: bool = False  # train --compile in every cell
    vocab: Path | None = None  # a device preset's vocabulary file (default: the tiny vocabulary in official rows)
    trace: Path | None = None  # a folder: one more step per cell under torch.profiler, written there (step_trace)

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value: str | None) -> str | None:
        if value is not None and value not in MODEL_PRESETS:
            raise ValueError(f"unknown preset {value!r}; use one of {', '.join(MODEL_PRESETS)}")
        return value

    @property
    def on_device(self) -> bool:
        """A preset whose random weights each cell builds on the GPU (nothing written)."""
        return self.preset is not None and self.preset in profile_family(self.preset).device_presets


class ProfileCell(BaseModel):
    method: str
    length: int
    recipe: Literal["qwenvl", "upstream"] = "qwenvl"
    status: Literal["ok", "oom", "failed", "skipped"]
    reason: str | None = None
    seconds_per_step: float | None = None  # s/it: one optimizer step (batch_size × grad_accum samples)
    tokens_per_second: float | None = None
    memory_gib: float | None = None  # peak reserved (GPU) or peak RSS (CPU)
    peak_allocated_gib: float | None = None
    peak_reserved_gib: float | None = None
    peak_rss_gib: float | None = None
    mfu: float | None = None  # 6 × parameters × tokens / time / peak bf16 FLOP/s (GPU with a known peak)
    fits: bool | None = None  # memory_gib ≤ gpu_memory_gib
    step_seconds: list[float] = Field(default_factory=list)  # every measured step
    parameters: int | None = None
    trainable_parameters: int | None = None
    precision: str | None = None
    final_loss: float | None = None
    wall_seconds: float = 0.0  # the whole subprocess: start, model load, data, training
    trace: StepTrace | None = None  # with --trace: one more optimizer step under torch.profiler


class ProfilePicture(BaseModel):
    """The one picture of every synthetic sample, and the tokens it takes in the profiled model."""

    width: int
    height: int
    resized: tuple[int, int] | None = None  # (H′, W′) after smart_resize (families with variable spans)
    min_pixels: int | None = None  # the processor's pixel budget
    max_pixels: int | None = None
    tokens: int  # the picture's tokens in a sample, its markers included
    text_tokens: dict[int, int] = Field(default_factory=dict)  # per length: the rest of the sample

    def line(self) -> str:
        """One line for under the table."""
        size = f"{self.width}×{self.height}"
        if self.resized is not None:
            height, width = self.resized
            size += f" → {width}×{height} after smart_resize (min {self.min_pixels:,} / max {self.max_pixels:,} px)"
        per_length = ", ".join(f"{length} = {self.tokens} + {text}" for length, text in self.text_tokens.items())
        return f"each sample: one {size} picture = {self.tokens} tokens with its markers; picture + text: {per_length}"


class ProfileRatio(BaseModel):
    method: str
    length: int
    seconds_per_step_vs_upstream: float | None = None  # qwenvl ÷ upstream: below 1 is faster
    memory_vs_upstream: float | None = None  # qwenvl ÷ upstream: below 1 is less memory


class ProfileResult(BaseModel):
    tool: str = f"qwenvl {__version__}"
    created: str
    model: str
    device: str  # "cpu" or the CUDA device name
    memory_kind: str  # what memory_gib means on this device
    notes: list[str] = Field(default_factory=list)
    methods: list[str]
    lengths: list[int]
    batch_size: int
    grad_accum: int
    steps: int
    warmup: int
    baseline: str | None = None
    gpu_memory_gib: float | None = None
    gradient_checkpointing: bool = True
    compile: bool = False
    picture: ProfilePicture | None = None
    cells: list[ProfileCell]
    baseline_cells: list[ProfileCell] = Field(default_factory=list)
    ratios: list[ProfileRatio] = Field(default_factory=list)
    total_seconds: float = 0.0

    def cell(self, method: str, length: int, baseline: bool = False) -> ProfileCell | None:
        for cell in self.baseline_cells if baseline else self.cells:
            if cell.method == method and cell.length == length:
                return cell
        return None


# --------------------------------------------------------------------------------------------------------------
# Parsing the flags
# --------------------------------------------------------------------------------------------------------------


def parse_lengths(text: str) -> list[int]:
    try:
        lengths = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise QwenvlError(
            f"--lengths {text!r} is not a comma-separated list of token counts", "For example: --lengths 384,512,1024"
        ) from None
    if not lengths or any(length < 16 for length in lengths):
        raise QwenvlError(
            f"--lengths {text!r}: every length must be at least 16 tokens", "For example: --lengths 384,512"
        )
    return sorted(set(lengths))


def parse_methods(text: str) -> list[str]:
    methods = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [method for method in methods if method not in METHODS]
    if unknown or not methods:
        raise QwenvlError(
            f"unknown method {', '.join(unknown) or text!r} in --methods", f"Choose from {', '.join(METHODS)}"
        )
    return list(dict.fromkeys(methods))


def parse_size_gib(text: str) -> float:
    """'24GB', '24G', '24GiB' or '24' → GiB (GB is read as GiB, as the upstream table's 'G' is)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(gib|gb|g|mib|mb|m)?\s*", text.lower())
    if not match:
        raise QwenvlError(f"--gpu-memory {text!r} is not a size", "For example: --gpu-memory 24GB")
    value = float(match.group(1))
    return value / 1024 if (match.group(2) or "g").startswith("m") else value


def mfu(parameters: int, tokens_per_second: float, device_name: str) -> float | None:
    """Model-FLOPs utilisation: 6 × parameters × tokens/s ÷ the device's peak bf16 FLOP/s (None if unknown)."""
    for name, peak in PEAK_BF16_FLOPS.items():
        if name.lower() in device_name.lower():
            return 6 * parameters * tokens_per_second / peak
    return None


# --------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------


def _gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _models(options: ProfileOptions, scratch: Path) -> dict[str, Path | str]:
    """{"chat": folder or a reason it is missing, "base": the same} for the methods asked."""
    if options.model is not None and options.preset is not None:
        raise QwenvlError("--model and --preset both name the model to profile", "Pass one of them")
    if options.model is not None:
        folder = Path(options.model)
        family = family_for(folder)
        base = family.is_base_model(folder)
        chat_format = family.generation_config(folder).get("chat_format")
        other = (
            f"{folder} is a {'base' if base else 'chat'} model (generation_config chat_format {chat_format!r}); "
            f"profile it with the {'lora-base' if base else 'lora-chat, qlora or full'} methods"
        )
        return {"chat": other if base else folder, "base": folder if base else other}
    preset = options.preset or "tiny"
    family = profile_family(preset)
    if options.vocab is not None and not options.on_device:
        devices = ", ".join(name for f in FAMILIES.values() for name in f.device_presets)
        raise QwenvlError(f"--vocab goes with --preset {devices}", f"Drop --vocab, or profile --preset {devices}")
    if options.on_device and not _gpu():
        tiny = next(name for name in family.profile_presets if name not in family.device_presets)
        raise QwenvlError(
            f"--preset {preset} needs a GPU: a model of the official 7B/8B size trains at seconds per token on a "
            "CPU, and its random weights alone are 16–19 GB",
            f"Profile on a CUDA machine, or use --preset {tiny} here",
        )
    needed = {"chat": any(m != "lora-base" for m in options.methods), "base": "lora-base" in options.methods}
    chat, base = family.profile_presets[preset]
    names = {"chat": chat, "base": base}
    vocab = options.vocab
    if options.on_device and vocab is None:
        vocab = family.tiny_vocabulary(scratch / family.tokenizer_files[0])
    folders: dict[str, Path | str] = {}
    for kind, name in names.items():
        if name is None:
            folders[kind] = f"{family.title} has no base-model preset: lora-base profiles Qwen-VL (v1) base models"
        elif needed[kind]:
            # a device preset: config, vocabulary and generation config only; each cell builds random weights
            family.init_model(name, scratch / name, seed=0, vocab=vocab)
            folders[kind] = scratch / name
    return folders


def picture_statement(folder: Path, lengths: list[int], scratch: Path) -> ProfilePicture:
    """The tokens the samples' picture takes in the model at `folder`: one sample encoded with its template."""
    from PIL import Image

    from .families.base import picture_spans
    from .train.lengths_data import PICTURE_SIZE

    family = family_for(folder)
    path = scratch / "picture.png"
    Image.new("RGB", (PICTURE_SIZE, PICTURE_SIZE), (245, 245, 240)).save(path)
    template = family.template(family.tokenizer(folder), image_root=scratch)
    encoded = template.encode([("user", "Picture 1: <img>picture.png</img>\nDescribe this."), ("assistant", "Red.")])
    tokens = picture_spans(encoded, family.picture_tokens())[0]
    resized = getattr(template, "resized", None)
    return ProfilePicture(
        width=PICTURE_SIZE,
        height=PICTURE_SIZE,
        resized=resized("picture.png") if resized else None,
        min_pixels=getattr(template, "min_pixels", None),
        max_pixels=getattr(template, "max_pixels", None),
        tokens=tokens,
        text_tokens={length: length - tokens for length in lengths},
    )


# --------------------------------------------------------------------------------------------------------------
# Cells
# --------------------------------------------------------------------------------------------------------------


def _bitsandbytes() -> bool:
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


def run_worker(spec: dict) -> tuple[int, str, str]:
    """Run one cell in a fresh Python process: (exit code, stdout, stderr). Tests may replace this."""
    command = [sys.executable, "-m", "qwenvl_cli.profile_worker", json.dumps(spec)]
    done = subprocess.run(command, capture_output=True, text=True, check=False, env={**os.environ})
    return done.returncode, done.stdout, done.stderr


def _last_json(text: str) -> dict | None:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def _one_line(stderr: str) -> str:
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    return (lines[-1] if lines else "the worker exited without a reason")[:300]


def _cell(method: str, length: int, recipe: str, folder: Path | str, options: ProfileOptions) -> ProfileCell:
    base = ProfileCell(method=method, length=length, recipe=recipe, status="skipped")
    if isinstance(folder, str):
        return base.model_copy(update={"reason": folder})
    if method == "qlora" and not _bitsandbytes():
        return base.model_copy(update={"reason": "bitsandbytes is not installed (pip install 'qwenvl[qlora]')"})
    spec = {
        "model": str(folder),
        "method": {"lora-chat": "lora", "lora-base": "lora", "qlora": "qlora", "full": "full"}[method],
        "quant": "nf4" if method == "qlora" else None,
        "length": length,
        "batch_size": options.batch_size,
        "grad_accum": options.grad_accum,
        "steps": options.steps,
        "warmup": options.warmup,
        "recipe": recipe,
        "threads": options.threads,
        "gradient_checkpointing": options.gradient_checkpointing,
        "compile": options.compile,
        "random_weights": options.on_device,
        "trace": str(trace_file(options.trace, method, length, recipe)) if options.trace else None,
    }
    started = time.perf_counter()
    code, out, err = run_worker(spec)
    wall = round(time.perf_counter() - started, 2)
    record = _last_json(out)
    if record is None or record.get("status") != "ok" or code != 0:
        oom = (record or {}).get("status") == "oom" or "out of memory" in err.lower()
        reason = (record or {}).get("reason") or _one_line(err)
        if record is None and code < 0:
            reason = f"the worker was killed by signal {-code} (9: the system's out-of-memory killer, most often)"
        return base.model_copy(update={"status": "oom" if oom else "failed", "reason": reason, "wall_seconds": wall})
    stamps = record["stamps"]
    if len(stamps) < options.warmup + 2:
        return base.model_copy(
            update={
                "status": "failed",
                "reason": f"only {len(stamps) - 1} optimizer steps ran; {options.warmup + options.steps} were asked",
                "wall_seconds": wall,
            }
        )
    measured = [later - earlier for earlier, later in pairwise(stamps[options.warmup :])]
    per_step = sum(measured) / len(measured)
    tokens = options.batch_size * options.grad_accum * length / per_step
    gpu = "peak_reserved_gib" in record
    memory = record["peak_reserved_gib"] if gpu else record["peak_rss_gib"]
    return ProfileCell(
        method=method,
        length=length,
        recipe=recipe,
        status="ok",
        seconds_per_step=round(per_step, 4),
        tokens_per_second=round(tokens, 1),
        memory_gib=round(memory, 3),
        peak_allocated_gib=round(record["peak_allocated_gib"], 3) if gpu else None,
        peak_reserved_gib=round(record["peak_reserved_gib"], 3) if gpu else None,
        peak_rss_gib=round(record["peak_rss_gib"], 3),
        mfu=round(value, 4) if gpu and (value := mfu(record["parameters"], tokens, record["device_name"])) else None,
        fits=None if options.gpu_memory_gib is None else memory <= options.gpu_memory_gib,
        step_seconds=[round(value, 4) for value in measured],
        parameters=record["parameters"],
        trainable_parameters=record["trainable_parameters"],
        precision=record["precision"],
        final_loss=record["losses"][-1] if record["losses"] else None,
        wall_seconds=wall,
        trace=StepTrace.model_validate(record["trace"]) if record.get("trace") else None,
    )


def trace_folder(folder: Path) -> Path:
    """Create `--trace`'s folder before any cell runs, or refuse it with the reason."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise QwenvlError(f"--trace {folder} is a file, not a folder", "Name a folder for the traces; it is created")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise QwenvlError(
            f"--trace {folder}: the folder cannot be created ({error.strerror})", "Name a folder you can write to"
        ) from None
    return folder


def trace_file(folder: Path, method: str, length: int, recipe: str) -> Path:
    """Where `--trace` writes a cell's trace: FOLDER/METHOD-LENGTH[-upstream].json.gz."""
    return Path(folder) / f"{method}-{length}{'-upstream' if recipe == 'upstream' else ''}.json.gz"


def run_profile(
    options: ProfileOptions,
    on_cell: CellHook | None = None,
    on_result: Callable[[ProfileResult], None] | None = None,
) -> ProfileResult:
    """Run the grid; `on_cell(kind, payload)` hears ("start", {"total"}), ("cell", {"label"}) and ("done", {...});
    `on_result` gets the result so far after every cell (the CLI rewrites its JSON: a grid cut short keeps
    what it measured)."""
    emit = on_cell or (lambda kind, payload: None)
    started = time.perf_counter()
    if options.trace is not None:
        trace_folder(options.trace)
    gpu = _gpu()
    recipes = ["qwenvl"] + (["upstream"] if options.baseline == "upstream" else [])
    with tempfile.TemporaryDirectory(prefix="qwenvl-profile-models-") as scratch:
        folders = _models(options, Path(scratch))
        folder = next((f for f in folders.values() if isinstance(f, Path)), None)
        picture = picture_statement(folder, options.lengths, Path(scratch)) if folder is not None else None
        device = "cpu"
        if gpu:
            import torch

            device = torch.cuda.get_device_name(0)
        jobs = [
            (method, length, recipe) for method in options.methods for length in options.lengths for recipe in recipes
        ]
        emit("start", {"total": len(jobs)})
        cells: list[ProfileCell] = []
        for method, length, recipe in jobs:
            emit("cell", {"label": f"{method} {length}" + (" (upstream)" if recipe == "upstream" else "")})
            kind = "base" if method == "lora-base" else "chat"
            cell = _cell(method, length, recipe, folders[kind], options)
            cells.append(cell)
            emit("done", cell.model_dump())
            if on_result is not None:
                on_result(_result(options, cells, device, gpu, started, picture))
    return _result(options, cells, device, gpu, started, picture)


def _result(
    options: ProfileOptions,
    cells: list[ProfileCell],
    device: str,
    gpu: bool,
    started: float,
    picture: ProfilePicture | None = None,
) -> ProfileResult:
    notes = []
    if not gpu:
        notes.append("CPU: every method trains in fp32 (no bf16/fp16 mixed precision); memory is the peak RSS")
    if options.on_device:
        notes.append(
            f"{options.preset}: the official sizes with random weights built on the GPU in each cell (NF4 for qlora); "
            + ("the official vocabulary" if options.vocab else "the built-in vocabulary in the official embedding rows")
        )
    model = str(options.model) if options.model is not None else f"preset {options.preset or 'tiny'}"
    main = [cell for cell in cells if cell.recipe == "qwenvl"]
    if gpu and not options.compile:
        notes += host_bound_notes(main)
    baseline = [cell for cell in cells if cell.recipe == "upstream"]
    ratios = []
    for cell in main:
        other = next((b for b in baseline if b.method == cell.method and b.length == cell.length), None)
        if other is None:
            continue
        ratios.append(
            ProfileRatio(
                method=cell.method,
                length=cell.length,
                seconds_per_step_vs_upstream=_ratio(cell.seconds_per_step, other.seconds_per_step),
                memory_vs_upstream=_ratio(cell.memory_gib, other.memory_gib),
            )
        )
    return ProfileResult(
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        model=model,
        device=device,
        memory_kind="peak reserved by the CUDA allocator during training" if gpu else "peak RSS of the cell's process",
        notes=notes,
        methods=options.methods,
        lengths=options.lengths,
        batch_size=options.batch_size,
        grad_accum=options.grad_accum,
        steps=options.steps,
        warmup=options.warmup,
        baseline=options.baseline,
        gpu_memory_gib=options.gpu_memory_gib,
        gradient_checkpointing=options.gradient_checkpointing,
        compile=options.compile,
        picture=picture,
        cells=main,
        baseline_cells=baseline,
        ratios=ratios,
        total_seconds=round(time.perf_counter() - started, 1),
    )


def host_bound_notes(cells: list[ProfileCell]) -> list[str]:
    """A note per method whose seconds per step hardly grow with the length: from its shortest to its longest
    measured length, the time grew less than a quarter as fast as the tokens (on the H100 the 7B LoRA steps
    took ×0.84 the time for ×5.3 the tokens; arithmetic-bound steps grow about as fast as the tokens). Such
    steps wait on the host launching kernels, and fused kernels (`--compile`) are what shortens them."""
    notes = []
    for method in dict.fromkeys(cell.method for cell in cells):
        done = sorted((c for c in cells if c.method == method and c.seconds_per_step), key=lambda c: c.length)
        if len(done) < 2 or done[-1].length < 2 * done[0].length:
            continue
        tokens = done[-1].length / done[0].length
        time = done[-1].seconds_per_step / done[0].seconds_per_step
        if time < 1 + 0.25 * (tokens - 1):
            notes.append(
                f"{method}: ×{tokens:.1f} the tokens ({done[0].length} → {done[-1].length}) took ×{time:.2f} the "
                "time per step, so the steps wait on the host launching kernels rather than on the GPU's "
                "arithmetic; profile again with --compile (fused kernels per block) to compare"
            )
    return notes


def _ratio(ours: float | None, theirs: float | None) -> float | None:
    return round(ours / theirs, 3) if ours and theirs else None
