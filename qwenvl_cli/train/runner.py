"""`qwenvl train` as a service: rules → data → model (+LoRA) → transformers Trainer → run folder.

Run folder (`--output`):
```
checkpoints/checkpoint-N/   Trainer checkpoints (model/adapter, optimizer, scheduler, RNG, data position)
checkpoints/run.json        the run's identity, compared on --resume
adapter_config.json, adapter_model.safetensors   (lora, qlora)  |  config.json, model.safetensors (full)
qwen.tiktoken, generation_config.json, loss.png
qwenvl_run.json             written last: a folder without it is not a finished run
```
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field

from .. import __version__
from ..errors import QwenvlError
from ..model.checkpoint import model_fingerprint, read_generation_config, save_checkpoint
from ..model.config import QwenVLConfig
from ..model.processor import PaddingCollator
from ..model.template import ChatTemplate
from ..model.tokenizer import VOCAB_FILE, QwenVLTokenizer
from ..schemas import RunManifest
from .data import ConversationDataset, PackedDataset, file_sha256, pack_rows, prepare_samples
from .presets import LORA_TARGETS, PRESETS, ResolvedRules, resolve_rules

RUN_MANIFEST = "qwenvl_run.json"
RUN_IDENTITY = "run.json"
EventHook = Callable[[str, dict[str, Any]], None]


class TrainOptions(BaseModel):
    method: Literal["full", "lora", "qlora"] = "lora"
    model: Path | None = None  # default: the built-in tiny model
    data: Path | None = None  # default: the bundled demo data
    output: Path | None = None  # default: runs/<method>-<date>-<time>
    image_root: Path | None = None
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    quant: Literal["gptq", "nf4"] | None = None
    max_length: int = Field(2048, ge=16)
    batch_size: int = Field(1, ge=1)
    grad_accum: int = Field(8, ge=1)
    epochs: float = Field(1.0, gt=0)
    max_steps: int = -1
    lr: float | None = None
    weight_decay: float = 0.1
    warmup_steps: int = 0
    lr_scheduler: str = "cosine"
    lora_r: int = Field(64, ge=1)
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: list[str] = Field(default_factory=lambda: list(LORA_TARGETS))
    train_vit: bool = False
    gradient_checkpointing: bool = False
    # torch.compile each LM and ViT block (regional compilation): fewer, fused kernels per step
    compile: bool = False
    packing: bool = False  # several samples per row of --max-length tokens, each in its own attention span
    # upstream: finetune.py's way, for comparisons: every sample padded to --max-length, eager attention,
    # logits of every position
    recipe: Literal["qwenvl", "upstream"] = "qwenvl"
    resume: str | None = None  # "auto" or a checkpoint folder
    seed: int = 42
    save_steps: int = 100
    save_total_limit: int = 3
    skip_invalid: bool = False
    workers: int = 0
    eval_data: Path | None = None
    eval_every: int = Field(100, ge=1)  # optimizer steps between evaluations
    eval_samples: int = Field(32, ge=1)  # samples of --eval-data asked by generation (all are in the loss)
    report_to: Literal["none", "tensorboard"] = "none"  # tensorboard: event files in <output>/tensorboard
    engine: Literal["ddp", "deepspeed", "fsdp"] = "ddp"
    zero: Literal[2, 3] = 2
    offload: bool = False
    dry_run: bool = False
    # profile only: random weights built on the device from config.json (no weight files are read)
    random_weights: bool = False


class TrainResult(BaseModel):
    output: str
    model: str = ""
    data: str = ""
    method: str
    precision: str
    engine: str = "ddp"
    notes: list[str]
    samples: int
    dropped_samples: int
    skipped_invalid: int
    trainable_parameters: int
    total_parameters: int
    global_step: int = 0
    final_loss: float | None = None
    seconds: float = 0.0
    train_seconds: float = 0.0  # wall time of the training loop (data loading included, model loading not)
    samples_seen: int = 0
    samples_per_second: float | None = None
    tokens_per_second: float | None = None  # real tokens per second of forward + backward + step
    padding_share: float | None = None  # share of computed positions that were padding
    resumed_from: str | None = None
    dry_run: bool = False
    loss_curve: str | None = None
    weights_gib: float = 0.0  # weights + gradients + AdamW states, activations not included
    processes: int = 1
    evaluations: list[dict] = Field(default_factory=list)  # step, eval_loss, accuracy, acc_at_50


def builtin_model_dir() -> Path:
    """The tiny model, built once into the cache (seeded: the same on every machine)."""
    from ..data.images import default_cache_dir
    from ..model.presets import init_model

    folder = default_cache_dir() / "models" / "tiny"
    if not (folder / "model.safetensors").is_file():
        init_model("tiny", folder, seed=0, force=True)
    return folder


def _packages() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "accelerate", "deepspeed", "bitsandbytes", "gptqmodel"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def _latest_checkpoint(checkpoints: Path) -> Path | None:
    """The newest checkpoint that finished saving (the Trainer writes trainer_state.json last)."""
    complete = [p for p in checkpoints.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    return max(complete, key=lambda p: int(p.name.split("-")[-1]), default=None)


def _identity(options: TrainOptions, model_dir: Path, rules: ResolvedRules, data_sha: str, quant: str | None) -> dict:
    return {
        "method": rules.method,
        "base_model": str(model_dir.resolve()),
        "base_fingerprint": model_fingerprint(model_dir),
        "quantisation": quant,
        "data_file": str(options.data.resolve()),
        "data_sha256": data_sha,
        "max_length": options.max_length,
        "packing": options.packing,
        "lora_r": options.lora_r if PRESETS[rules.method].lora else None,
        "lora_targets": options.lora_targets if PRESETS[rules.method].lora else None,
    }


def _resume_point(options: TrainOptions, checkpoints: Path, identity: dict) -> Path | None:
    if options.resume is None:
        return None
    if options.resume == "auto":
        target = _latest_checkpoint(checkpoints)
        if target is None:
            return None  # nothing to resume: a fresh start
    else:
        target = Path(options.resume)
        if not (target / "trainer_state.json").is_file():
            raise QwenvlError(
                f"{target} is not a complete checkpoint (no trainer_state.json)",
                "Pass a checkpoints/checkpoint-N folder of a run, or --resume auto",
            )
    recorded_path = checkpoints / RUN_IDENTITY
    if recorded_path.is_file():
        recorded = json.loads(recorded_path.read_text("utf-8"))
        changed = [
            f"{key}: {recorded.get(key)!r} → {identity[key]!r}"
            for key in identity
            if key != "data_file" and recorded.get(key) != identity[key]
        ]
        if changed:
            raise QwenvlError(
                "cannot resume: the run changed since its checkpoints were written (" + "; ".join(changed) + ")",
                "Resume with the same method, model and data, or start a new run with another --output",
            )
    return target


def _apply_method(model, options: TrainOptions, rules: ResolvedRules):
    preset = PRESETS[rules.method]
    if preset.lora:
        import contextlib

        from .. import quiet_import

        with contextlib.suppress(ImportError):
            quiet_import("gptqmodel")  # peft imports it when present; its banner is not for our users
        from peft import LoraConfig, get_peft_model

        if preset.quantised:
            # Everything frozen stays in its 16-bit dtype; the adapters are made in fp32 (peft's
            # autocast_adapter_dtype). peft's prepare_model_for_kbit_training would also upcast every frozen
            # fp16 weight (the ViT, wte, lm_head: 3.2 B values on the 7B model) to fp32, about 6 GiB more.
            model.requires_grad_(False)
        lora = LoraConfig(
            r=options.lora_r,
            lora_alpha=options.lora_alpha,
            lora_dropout=options.lora_dropout,
            target_modules=options.lora_targets,
            modules_to_save=list(rules.modules_to_save) or None,
            task_type="CAUSAL_LM",
        )
        return get_peft_model(model, lora)
    # full: the LM and the resampler train; the ViT stays frozen unless --train-vit.
    model.requires_grad_(True)
    visual = model.transformer.visual
    if not options.train_vit:
        visual.requires_grad_(False)
        visual.attn_pool.requires_grad_(True)
    visual.attn_pool.pos_embed.requires_grad_(False)
    return model


def _load_model(model_dir: Path, rules: ResolvedRules, quant: str | None, random_weights: bool = False):
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[rules.precision]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if random_weights:
        from ..model.presets import build_random

        return build_random(model_dir, dtype, device, quant)
    if quant == "gptq":
        from ..model.quant import load_gptq

        return load_gptq(model_dir, dtype=dtype, device=device)
    if quant == "nf4":  # the Trainer leaves a 4-bit model where it is: it is put on the GPU here
        from ..model.quant import load_nf4

        return load_nf4(model_dir, compute_dtype=dtype, device=device)
    from ..model.checkpoint import load_checkpoint

    return load_checkpoint(model_dir, dtype=dtype, device=device)


def _one_cuda_process(options: TrainOptions) -> bool:
    """One CUDA process without DeepSpeed or FSDP (they shard and place the parameters themselves; DDP wants
    a module on one device): where frozen weights that training does not need on the GPU wait in CPU memory."""
    return torch.cuda.is_available() and options.engine == "ddp" and _world_size() == 1


def park_frozen_originals(model, device: str | torch.device) -> int:
    """peft's modules_to_save keeps each wrapped module's frozen original (a base-model LoRA's wte and lm_head:
    2.3 GiB in bf16 on the 7B sizes) beside the trainable copy that training runs and the adapter saves; the
    original is called only with the adapter disabled. Move the originals to `device`; returns the values
    moved."""
    from peft.utils import ModulesToSaveWrapper

    moved = 0
    for module in model.modules():
        if isinstance(module, ModulesToSaveWrapper):
            module.original_module.to(device)
            moved += sum(parameter.numel() for parameter in module.original_module.parameters())
    return moved


def embeddings_in_host_memory(model, device: str | torch.device = "cpu") -> int:
    """Keep frozen token embeddings in `device` (CPU) memory: each forward pass looks its rows up there and
    sends them to the device the model computes on (1.16 GiB of GPU memory freed at 7B in bf16 or fp16, for
    a 16 MiB copy per 2,048-token row). Returns the values moved; 0, and nothing changed, when the embeddings
    train (full fine-tuning, LoRA on a base model)."""
    embedding = model.get_input_embeddings()
    if any(parameter.requires_grad for parameter in embedding.parameters()):
        return 0
    compute = model.compute_device
    embedding.to(device)

    def ids_to_table(module, args):
        return (args[0].to(device), *args[1:])

    def rows_to_compute_device(module, args, output):
        return output.to(compute, non_blocking=True)

    # Before any other hook (transformers' enable_input_require_grads marks the rows it returns).
    embedding.register_forward_pre_hook(ids_to_table, prepend=True)
    embedding.register_forward_hook(rows_to_compute_device, prepend=True)
    return sum(parameter.numel() for parameter in embedding.parameters())


def compile_blocks(model) -> int:
    """torch.compile every LM block and ViT block in place (regional compilation: the blocks of one kind share
    their compiled code); returns how many. The first steps pay for compiling."""
    from ..model.modeling import QwenBlock
    from ..model.vision import VisionBlock

    blocks = [module for module in model.modules() if isinstance(module, (QwenBlock, VisionBlock))]
    for block in blocks:
        block.compile(dynamic=None)
    return len(blocks)


def _weights_gib(trainable: int, total: int, precision: str, quant: str | None) -> float:
    """Weights + gradients + AdamW states in GiB (activations excluded): a floor for the memory a run needs."""
    size = {"fp32": 4, "bf16": 2, "fp16": 2}[precision]
    frozen = total - trainable
    frozen_bytes = frozen * (0.56 if quant else size)  # 4-bit codes plus their scales, roughly
    mixed = 4 if precision != "fp32" else 0  # an fp32 master copy under mixed precision
    trainable_bytes = trainable * (size + size + 8 + mixed)  # weight, gradient, Adam m and v
    return round((frozen_bytes + trainable_bytes) / 2**30, 3)


def _count(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


# `qwenvl train` with neither --model nor --data runs the built-in demo: full fine-tuning of the tiny model on
# synthetic one-shape pictures with colour questions, asked on held-out pictures every 100 steps — settings
# under which a random model visibly learns in a minute or two of CPU. Options given explicitly win.
DEMO_SETTINGS: dict[str, Any] = {
    "method": "full",
    "max_steps": 300,
    "batch_size": 8,
    "grad_accum": 1,
    "lr": 2e-3,
    "warmup_steps": 5,
    "save_steps": 100,
    "eval_every": 100,
    "eval_samples": 40,
}
DEMO_DATA_SETTINGS = {"n": 840, "seed": 0, "image_size": 56, "eval_fraction": 40 / 840, "max_shapes": 1}


def builtin_data_dir() -> Path:
    """The built-in training data (train.json, eval.json, images/), synthesised once into the cache."""
    from ..data.images import default_cache_dir
    from ..data.synth import synthesize

    folder = default_cache_dir() / "data" / "colours-v1"
    if not (folder / "eval.json").is_file():
        synthesize(folder, questions=["colour"], force=True, **DEMO_DATA_SETTINGS)
    return folder


def demo_options(options: TrainOptions, given: set[str]) -> TrainOptions:
    """The built-in demo's settings (DEMO_SETTINGS, the built-in data with its held-out half) under the
    options in `given`, which were set explicitly."""
    folder = builtin_data_dir()
    update: dict[str, Any] = {key: value for key, value in DEMO_SETTINGS.items() if key not in given}
    update["data"] = folder / "train.json"
    if "eval_data" not in given:
        update["eval_data"] = folder / "eval.json"
    return options.model_copy(update=update)


def resolve_defaults(options: TrainOptions) -> TrainOptions:
    """Fill in the built-in model, the built-in data and a fresh run folder where they were not given."""
    update: dict[str, Any] = {}
    if options.data is None:
        update["data"] = builtin_data_dir() / "train.json"
    if options.model is None:
        update["model"] = builtin_model_dir()
    if options.output is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        update["output"] = Path("runs") / f"{options.method}-{stamp}"
    return options.model_copy(update=update) if update else options


def run_training(options: TrainOptions, on_event: EventHook | None = None) -> TrainResult:
    """Train as `options` say; `on_event(kind, payload)` hears start, steps, log, eval, save and done."""
    deepspeed = options.engine == "deepspeed" and not options.dry_run
    environment = dict(os.environ)
    if deepspeed:
        _single_process_group()
    try:
        return _run_training(options, on_event)
    finally:
        if deepspeed:
            _forget_deepspeed(environment)


def _forget_deepspeed(environment: dict[str, str]) -> None:
    """End what a DeepSpeed run leaves process-wide: the process group of one described for it, the variables
    TrainingArguments sets (ACCELERATE_USE_DEEPSPEED, …) and accelerate's and transformers' DeepSpeed state,
    so that a later run in the same process trains as if none had happened."""
    from accelerate.state import AcceleratorState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    for name in set(os.environ) - set(environment):
        del os.environ[name]
    for name, value in environment.items():
        if os.environ.get(name) != value:
            os.environ[name] = value
    unset_hf_deepspeed_config()
    AcceleratorState._reset_state(reset_partial_state=True)


def _run_training(options: TrainOptions, on_event: EventHook | None) -> TrainResult:
    from .launch import world

    rank, world_size = world()
    emit = (on_event or (lambda kind, payload: None)) if rank == 0 else (lambda kind, payload: None)
    started = time.perf_counter()
    options = resolve_defaults(options)
    model_dir = Path(options.model)
    config = QwenVLConfig.from_folder(model_dir)
    generation = read_generation_config(model_dir)
    base_model = generation.get("chat_format") == "raw"
    quant = _quantisation(options, config)
    gpu = torch.cuda.is_available()
    rules = resolve_rules(
        options.method,
        options.precision,
        engine=options.engine,
        zero=options.zero,
        base_model=base_model,
        train_vit=options.train_vit,
        gpu=gpu,
    )
    if options.recipe == "upstream" and options.packing:
        raise QwenvlError(
            "--recipe upstream reproduces finetune.py, which pads every sample to --max-length and never packs",
            "Drop --packing, or train with the default --recipe qwenvl",
        )
    if options.engine == "fsdp" and not gpu and not options.dry_run:
        raise QwenvlError(
            "--engine fsdp needs GPUs: accelerate shards with FSDP over CUDA devices only, and would quietly run "
            "CPU processes as plain DDP",
            "On this machine use --engine ddp, or --engine deepspeed --zero 3 to shard (it runs on CPUs too)",
        )
    tokenizer = QwenVLTokenizer.from_pretrained(model_dir)
    template = ChatTemplate(tokenizer)
    image_root = options.image_root or Path(options.data).resolve().parent
    prepared = prepare_samples(options.data, template, options.max_length, image_root, options.skip_invalid)
    evaluation = None
    if options.eval_data is not None:
        eval_root = options.image_root or Path(options.eval_data).resolve().parent
        evaluation = (
            prepare_samples(options.eval_data, template, options.max_length, eval_root, options.skip_invalid),
            eval_root,
        )
    data_sha = file_sha256(options.data)
    output = Path(options.output)
    checkpoints = output / "checkpoints"
    identity = _identity(options, model_dir, rules, data_sha, quant)
    resume_from = _resume_point(options, checkpoints, identity)
    if resume_from is None and (output / RUN_MANIFEST).exists():
        raise QwenvlError(
            f"{output} already holds a finished run", "Choose another --output, or delete that folder to train again"
        )

    from transformers import set_seed

    set_seed(options.seed)  # before the adapters are created: their initial values come from this seed
    model, _ = _load_model(model_dir, rules, quant, options.random_weights) if not options.dry_run else (None, None)
    if options.dry_run:
        from ..model.modeling import QwenVLForCausalLM

        with torch.device("meta"):
            model = QwenVLForCausalLM(config)
    if options.recipe == "upstream":
        model.use_upstream_path()
    model = _apply_method(model, options, rules)
    trainable, total = _count(model)
    result = TrainResult(
        output=str(output),
        model=str(model_dir),
        data=str(options.data),
        method=rules.method,
        precision=rules.precision,
        engine=_engine_text(options),
        notes=rules.notes,
        samples=len(prepared.samples),
        dropped_samples=prepared.dropped_too_long,
        skipped_invalid=prepared.skipped_invalid,
        trainable_parameters=trainable,
        total_parameters=total,
        resumed_from=str(resume_from) if resume_from else None,
        dry_run=options.dry_run,
        weights_gib=_weights_gib(trainable, total, rules.precision, quant),
    )
    if options.dry_run:
        return result

    if rank == 0:
        checkpoints.mkdir(parents=True, exist_ok=True)
        (checkpoints / RUN_IDENTITY).write_text(json.dumps(identity, indent=2) + "\n", "utf-8")
        engine_config = {"deepspeed": lambda: deepspeed_config(options, rules), "fsdp": lambda: fsdp_config(options)}
        if options.engine in engine_config:  # the generated config, for the record ("auto": the Trainer's values)
            config_file = output / f"{options.engine}_config.json"
            config_file.write_text(json.dumps(engine_config[options.engine](), indent=2) + "\n", "utf-8")
    if options.gradient_checkpointing and options.engine != "fsdp":  # FSDP checkpoints its own wrapped blocks
        # Reentrant checkpointing runs each block's first forward pass without building its autograd graph:
        # 20 % less host time per micro-batch than the non-reentrant kind on the 7B depth (host_ops_bench),
        # and 7B steps are host-bound. It needs an input that requires grad (below) and .backward(), which
        # the Trainer uses; upstream's scripts checkpointed the same way (transformers' default then).
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    if options.compile:
        compile_blocks(model)
    trainer = _trainer(
        model, options, rules, prepared.samples, config, tokenizer, image_root, checkpoints, emit, evaluation, result
    )
    emit(
        "start",
        {
            "samples": len(prepared.samples),
            "dropped": prepared.dropped_too_long,
            "notes": result.notes,
            "trainable": trainable,
            "total": total,
            "resume": str(resume_from) if resume_from else None,
        },
    )
    train_started = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except KeyboardInterrupt:
        raise QwenvlError(
            "training interrupted",
            f"Continue where it stopped with --resume auto (checkpoints in {checkpoints})",
            exit_code=130,
        ) from None
    train_wall = time.perf_counter() - train_started
    losses = [(entry["step"], entry["loss"]) for entry in trainer.state.log_history if "loss" in entry]
    result.global_step = trainer.state.global_step
    result.final_loss = losses[-1][1] if losses else None
    result.seconds = round(time.perf_counter() - started, 2)
    train_seconds = max(trainer.qwenvl_seconds, 1e-9)
    result.tokens_per_second = round(trainer.qwenvl_tokens * world_size / train_seconds, 1)
    result.train_seconds = round(train_wall, 3)
    result.samples_seen = trainer.qwenvl_samples * world_size
    result.samples_per_second = round(result.samples_seen / max(train_wall, 1e-9), 3)
    result.padding_share = round(1 - trainer.qwenvl_tokens / max(trainer.qwenvl_padded_tokens, 1), 4)
    result.processes = world_size
    state_dict = None
    if options.engine == "deepspeed":
        # Under ZeRO-3 every rank holds a shard: gather the whole state (a collective, so on every rank).
        state_dict = trainer.accelerator.get_state_dict(trainer.deepspeed)
    elif options.engine == "fsdp":
        state_dict = trainer.accelerator.get_state_dict(trainer.model)  # gathered the same way
    if rank == 0:  # rank 0 writes the run folder
        result.loss_curve = _finish(
            model, output, model_dir, rules, quant, options, prepared, identity, result, losses, generation, state_dict
        )
    _leave_process_group()
    emit("done", result.model_dump())
    return result


def _engine_text(options: TrainOptions) -> str:
    if options.engine == "deepspeed":
        return f"DeepSpeed ZeRO-{options.zero}" + (" + CPU offload" if options.offload else "")
    if options.engine == "fsdp":
        return "FSDP full shard" + (" + CPU offload" if options.offload else "")
    return "DDP"


def _leave_process_group() -> None:
    """All ranks wait for rank 0's writing, then close the group together (a rank that simply exits while
    the others still communicate can abort the launch)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _quantisation(options: TrainOptions, config: QwenVLConfig) -> str | None:
    gptq = bool(config.quantization_config) and config.quantization_config.get("quant_method") == "gptq"
    if options.method == "qlora":
        if gptq:
            if options.quant == "nf4":
                raise QwenvlError(
                    "--quant nf4 needs a bf16/fp16/fp32 checkpoint, and this one is GPTQ Int4",
                    "Drop --quant (the GPTQ weights are used as they are)",
                )
            return "gptq"
        return options.quant or "nf4"
    if gptq:
        raise QwenvlError(
            f"{options.model} is a GPTQ Int4 checkpoint, which only --method qlora can train",
            "Use --method qlora, or train full/LoRA on the bf16 model",
        )
    if options.quant is not None:
        raise QwenvlError("--quant goes with --method qlora", "Drop --quant, or use --method qlora")
    return None


def _trainer(model, options, rules, samples, config, tokenizer, image_root, checkpoints, emit, evaluation, result):
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # its "Writing model shards" bars; progress is ours

    rows = None
    if options.packing:
        lengths = [len(sample.input_ids) for sample in samples]
        rows = pack_rows(lengths, options.max_length)
        fill = sum(lengths) / (len(rows) * options.max_length)
        result.notes.append(
            f"packing: {len(samples):,} samples in {len(rows):,} rows of up to {options.max_length} tokens "
            f"({fill:.0%} full); --batch-size counts rows"
        )
    if options.report_to == "tensorboard":
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(Path(options.output) / "tensorboard")

    preset = PRESETS[rules.method]

    class QwenVLTrainer(Trainer):
        qwenvl_tokens = 0  # real tokens (padding not counted)
        qwenvl_padded_tokens = 0  # positions computed, padding included
        qwenvl_samples = 0
        qwenvl_seconds = 0.0

        def training_step(self, model, inputs, *args, **kwargs):
            tick = time.perf_counter()
            loss = super().training_step(model, inputs, *args, **kwargs)
            self.qwenvl_seconds += time.perf_counter() - tick
            mask = inputs["attention_mask"]
            self.qwenvl_tokens += int((mask > 0).sum())
            self.qwenvl_padded_tokens += mask.numel()
            self.qwenvl_samples += int(mask.amax(dim=1).sum())  # a packed row's samples are numbered 1..k
            return loss

    class Events(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if rules.modules_to_save and _one_cuda_process(options):
                moved = park_frozen_originals(kwargs["model"], "cpu")
                result.notes.append(
                    f"the frozen originals of {', '.join(rules.modules_to_save)} ({moved / 1e6:,.1f} M values) wait in "
                    "CPU memory: training uses their trainable copies only"
                )
            if options.recipe != "upstream" and _one_cuda_process(options):
                moved = embeddings_in_host_memory(kwargs["model"])
                if moved:
                    result.notes.append(
                        f"the frozen token embeddings ({moved / 1e6:,.1f} M values) are looked up in CPU memory "
                        "and only the rows of each batch go to the GPU"
                    )
            emit("steps", {"total": state.max_steps, "done": state.global_step})

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                emit(
                    "log",
                    {
                        "step": state.global_step,
                        "total": state.max_steps,
                        "loss": logs["loss"],
                        "lr": logs.get("learning_rate"),
                        "tokens_per_s": trainer_ref[0].qwenvl_tokens
                        * args.world_size
                        / max(trainer_ref[0].qwenvl_seconds, 1e-9),
                        "memory": _memory(),
                    },
                )

        def on_save(self, args, state, control, **kwargs):
            emit("save", {"step": state.global_step})

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            if evaluation is None or not state.is_world_process_zero:
                return
            record = {"step": state.global_step, "eval_loss": (metrics or {}).get("eval_loss")}
            record.update(_generation_metrics(kwargs["model"], tokenizer, config, evaluation, options))
            result.evaluations.append(record)
            emit("eval", record)

    arguments = TrainingArguments(
        output_dir=str(checkpoints),
        per_device_train_batch_size=options.batch_size,
        gradient_accumulation_steps=options.grad_accum,
        num_train_epochs=options.epochs,
        max_steps=options.max_steps,
        learning_rate=options.lr if options.lr is not None else preset.learning_rate,
        weight_decay=options.weight_decay,
        adam_beta2=0.95,
        warmup_steps=options.warmup_steps,
        lr_scheduler_type=options.lr_scheduler,
        logging_steps=1,
        save_strategy="steps",
        save_steps=options.save_steps,
        save_total_limit=options.save_total_limit,
        bf16=rules.precision == "bf16",
        fp16=rules.precision == "fp16",
        use_cpu=not torch.cuda.is_available(),
        ddp_backend="gloo" if not torch.cuda.is_available() and _world_size() > 1 else None,
        ddp_find_unused_parameters=False,  # every trainable parameter is used (text-only batches touch the ViT)
        report_to=options.report_to,
        deepspeed=deepspeed_config(options, rules) if options.engine == "deepspeed" else None,
        fsdp=options.engine == "fsdp",
        fsdp_config=fsdp_config(options) if options.engine == "fsdp" else None,
        seed=options.seed,
        dataloader_num_workers=options.workers,
        remove_unused_columns=False,
        disable_tqdm=True,
        eval_strategy="steps" if evaluation is not None else "no",
        eval_on_start=evaluation is not None,  # the "before" numbers: step 0
        eval_steps=options.eval_every,
        per_device_eval_batch_size=options.batch_size,
    )
    collator = PaddingCollator(tokenizer.eod_id, pad_to=options.max_length if options.recipe == "upstream" else None)
    trainer = QwenVLTrainer(
        model=model,
        args=arguments,
        train_dataset=PackedDataset(samples, options.max_length, config.image_size, image_root, rows)
        if options.packing
        else ConversationDataset(samples, config.image_size, image_root),
        eval_dataset=ConversationDataset(evaluation[0].samples, config.image_size, evaluation[1])
        if evaluation is not None
        else None,
        data_collator=collator,
        callbacks=[Events()],
    )
    trainer_ref = [trainer]
    trainer.remove_callback(PrinterCallback)  # progress is reported through `emit`
    return trainer


# The blocks FSDP shards and gathers one at a time: the language model's and the vision tower's.
FSDP_WRAPPED = ["QwenBlock", "VisionBlock"]


def fsdp_config(options: TrainOptions) -> dict:
    """FSDP (version 2) settings for the Trainer: every language and vision block its own shard unit, a
    full (gathered) state dict for saving, CPU offload with --offload, activation checkpointing per block
    with --gradient-checkpointing (FSDP's own, which avoids a second all-gather in the backward pass)."""
    return {
        "version": 2,
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "transformer_layer_cls_to_wrap": list(FSDP_WRAPPED),
        "reshard_after_forward": True,
        "state_dict_type": "FULL_STATE_DICT",
        "cpu_offload": options.offload,
        "activation_checkpointing": options.gradient_checkpointing,
    }


def deepspeed_config(options: TrainOptions, rules: ResolvedRules) -> dict:
    """A DeepSpeed config for the run ("auto" values are filled in by the Trainer from its arguments)."""
    zero: dict[str, Any] = {"stage": options.zero, "overlap_comm": True, "contiguous_gradients": True}
    if options.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        if options.zero == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if options.zero == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True  # complete weights/adapters on save
        zero["stage3_param_persistence_threshold"] = "auto"  # the Trainer's hidden_size-based value
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": rules.precision == "bf16"},
        "fp16": {"enabled": rules.precision == "fp16"},
        "zero_optimization": zero,
    }


def _generation_metrics(model, tokenizer, config, evaluation, options) -> dict:
    """Ask the model the first --eval-samples samples of --eval-data: exact match and Acc@0.5."""
    from ..data.reader import DataFile
    from ..evaluate import evaluate
    from ..model.generation import GenerationSettings
    from ..model.processor import QwenVLProcessor

    prepared, root = evaluation
    samples = []
    bad = {f.sample_index for f in prepared.report.findings if f.severity.value == "error"}
    for record in DataFile.open(options.eval_data).records():
        if record.index not in bad and record.problem is None:
            samples.append(record.value)
        if len(samples) >= options.eval_samples:
            break
    processor = QwenVLProcessor(tokenizer, config.image_size, image_root=root)
    was_training = model.training
    model.eval()
    try:
        report = evaluate(model, processor, samples, GenerationSettings(max_new_tokens=64))
    finally:
        model.train(was_training)
    return {
        "accuracy": report.accuracy,
        "exact_match": report.exact_match,
        "acc_at_50": report.acc_at_50,
        "questions": report.questions,
    }


def _single_process_group() -> None:
    """DeepSpeed wants a process group even for one process (without one it goes looking for MPI): outside
    torchrun, describe a group of one on this machine, as torchrun would (`_forget_deepspeed` removes it)."""
    from .launch import free_port, is_launched

    if is_launched() or "WORLD_SIZE" in os.environ:
        return
    wanted = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    wanted["MASTER_PORT"] = os.environ.get("MASTER_PORT") or str(free_port())
    for name, value in wanted.items():
        os.environ.setdefault(name, value)


def _world_size() -> int:
    from .launch import world

    return world()[1]


def _memory() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
    try:
        import resource

        return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB RSS"
    except ImportError:
        return "?"


def _finish(
    model, output, model_dir, rules, quant, options, prepared, identity, result, losses, generation, state_dict=None
):
    """Write the final model and the manifest (last) into the run folder; each file lands atomically.
    `state_dict` is the gathered state of a DeepSpeed run (the model's own parameters may be shards)."""
    staging = output / f".final-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        if PRESETS[rules.method].lora:
            model.save_pretrained(staging, state_dict=state_dict)
            shutil.copyfile(model_dir / VOCAB_FILE, staging / VOCAB_FILE)
            (staging / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", "utf-8")
        else:
            save_checkpoint(
                model, staging, model_dir / VOCAB_FILE, generation, dtype=rules.precision, state_dict=state_dict
            )
        curve = None
        if losses:
            from ..charts import loss_curve_png

            loss_curve_png(losses, staging / "loss.png", title=f"{rules.method} · {Path(options.data).name}")
            curve = str(output / "loss.png")
        for path in staging.iterdir():
            os.replace(path, output / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    manifest = RunManifest(
        qwenvl_version=__version__,
        method=rules.method,
        precision=rules.precision,
        base_model=identity["base_model"],
        base_fingerprint=identity["base_fingerprint"],
        chat_format=generation.get("chat_format", "chatml"),
        quantisation=quant,
        modules_to_save=list(rules.modules_to_save),
        data_file=identity["data_file"],
        data_sha256=identity["data_sha256"],
        samples=len(prepared.samples),
        dropped_samples=prepared.dropped_too_long,
        arguments=json.loads(options.model_dump_json()),
        packages=_packages(),
        global_step=result.global_step,
        final_loss=result.final_loss,
        processes=result.processes,
        evaluations=result.evaluations,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    tmp = output / f".{RUN_MANIFEST}.tmp"
    tmp.write_text(manifest.model_dump_json(indent=2) + "\n", "utf-8")
    os.replace(tmp, output / RUN_MANIFEST)
    return curve
