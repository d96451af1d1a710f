"""`qwenvl train` as a service: rules → data → model (+ method) → Trainer → run folder. This module only
orders the steps; each concern has its own module in this package (see docs/architecture.md).

Run folder (`--output`):
```
checkpoints/checkpoint-N/   Trainer checkpoints (model/adapter, optimizer, scheduler, RNG, data position)
checkpoints/run.json        the run's identity, compared on --resume
adapter_config.json, adapter_model.safetensors   (lora, qlora)  |  the family's model files (full)
tokenizer files, generation_config.json, loss.png
qwenvl_run.json             written last: a folder without it is not a finished run
```
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from ..errors import QwenvlError
from ..families import family_for
from .data import file_sha256, prepare_samples
from .defaults import resolve_defaults
from .engines import (
    deepspeed_config,
    engine_text,
    forget_deepspeed,
    fsdp_config,
    leave_process_group,
    single_process_group,
)
from .launch import world
from .method import apply_method, check_part_rates, count_parameters, load_model, quantisation, weights_gib
from .options import EventHook, RunSetup, TrainOptions, TrainResult
from .placement import compile_blocks
from .presets import resolve_rules
from .resume import RUN_IDENTITY, resume_point, run_identity
from .summary import RUN_MANIFEST, write_run_folder
from .trackers import check_trackers, tracker_environment
from .trainer import build_trainer


def run_training(options: TrainOptions, on_event: EventHook | None = None) -> TrainResult:
    """Train as `options` say; `on_event(kind, payload)` hears start, steps, log, eval, save and done."""
    deepspeed = options.engine == "deepspeed" and not options.dry_run
    environment = dict(os.environ)
    if deepspeed:
        single_process_group()
    try:
        return _run_training(options, on_event)
    finally:
        if deepspeed:
            forget_deepspeed(environment)


def _run_training(options: TrainOptions, on_event: EventHook | None) -> TrainResult:
    rank, processes = world()
    emit = (on_event or (lambda kind, payload: None)) if rank == 0 else (lambda kind, payload: None)
    started = time.perf_counter()
    options = resolve_defaults(options)
    model_dir = Path(options.model)
    family = family_for(model_dir)
    if options.lora_targets is None:
        options = options.model_copy(update={"lora_targets": list(family.lora_targets)})
    vit_implied = options.vision_lr is not None and options.method == "full" and not options.train_vit
    if vit_implied:  # a learning rate for the vision tower means training it
        options = options.model_copy(update={"train_vit": True})
    config = family.config(model_dir)
    generation = family.generation_config(model_dir)
    base_model = family.is_base_model(model_dir)
    quant = quantisation(options, family, config)
    gpu = torch.cuda.is_available()
    rules = resolve_rules(
        options.method,
        options.precision,
        engine=options.engine,
        zero=options.zero,
        base_model=base_model,
        base_modules=family.base_modules_to_save,
        train_vit=options.train_vit,
        gpu=gpu,
    )
    if vit_implied:
        rules.notes.append("--vision-lr: the vision tower trains (as with --train-vit)")
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
    check_trackers(options.report_to)
    tokenizer = family.tokenizer(model_dir)
    image_root = options.image_root or Path(options.data).resolve().parent
    pixels = family.picture_pixels(model_dir, options.min_pixels, options.max_pixels, options.max_length)
    # the picture bounds go to the families that take them (v1 refuses them in picture_pixels)
    sized = {"pixels": pixels, "max_length": options.max_length} if pixels else {}
    template = family.template(tokenizer, image_root=image_root, **sized)
    picture_tokens = family.picture_tokens()
    prepared = prepare_samples(
        options.data,
        template,
        options.max_length,
        picture_tokens,
        image_root,
        options.skip_invalid,
        options.boxes,
        model_dir,
    )
    evaluation = None
    if options.eval_data is not None:
        eval_root = options.image_root or Path(options.eval_data).resolve().parent
        evaluation = (
            prepare_samples(
                options.eval_data,
                family.template(tokenizer, image_root=eval_root, **sized),
                options.max_length,
                picture_tokens,
                eval_root,
                options.skip_invalid,
                options.boxes,
                model_dir,
            ),
            eval_root,
        )
    data_sha = file_sha256(options.data)
    output = Path(options.output)
    checkpoints = output / "checkpoints"
    identity = run_identity(options, model_dir, family.fingerprint(model_dir), rules, data_sha, quant)
    resume_from = resume_point(options, checkpoints, identity)
    if resume_from is None and (output / RUN_MANIFEST).exists():
        raise QwenvlError(
            f"{output} already holds a finished run", "Choose another --output, or delete that folder to train again"
        )

    from transformers import set_seed

    set_seed(options.seed)  # before the adapters are created: their initial values come from this seed
    if options.dry_run:
        model = family.empty_model(config)
    else:
        model, _ = load_model(family, model_dir, rules, quant, options.random_weights)
    if options.recipe == "upstream":
        family.use_upstream_recipe(model)
    model = apply_method(model, options, rules, family)
    check_part_rates(model, options, family)
    trainable, total = count_parameters(model)
    result = TrainResult(
        output=str(output),
        model=str(model_dir),
        data=str(options.data),
        method=rules.method,
        precision=rules.precision,
        engine=engine_text(options),
        notes=rules.notes,
        samples=len(prepared.samples),
        dropped_samples=prepared.dropped_too_long,
        skipped_invalid=prepared.skipped_invalid,
        trainable_parameters=trainable,
        total_parameters=total,
        resumed_from=str(resume_from) if resume_from else None,
        dry_run=options.dry_run,
        weights_gib=weights_gib(trainable, total, rules.precision, quant),
    )
    if options.dry_run:
        return result

    if rank == 0:
        checkpoints.mkdir(parents=True, exist_ok=True)
        (checkpoints / RUN_IDENTITY).write_text(json.dumps(identity, indent=2) + "\n", "utf-8")
        engine_config = {
            "deepspeed": lambda: deepspeed_config(options, rules),
            "fsdp": lambda: fsdp_config(options, family),
        }
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
        compile_blocks(model, family)
    setup = RunSetup(options, family, rules, model_dir, config, tokenizer, generation, quant, pixels)
    # the trackers read their settings when the Trainer makes its callbacks and when training starts
    with tracker_environment(options.report_to, output):
        trainer = build_trainer(model, setup, prepared.samples, image_root, emit, evaluation, result)
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
    result.tokens_per_second = round(trainer.qwenvl_tokens * processes / train_seconds, 1)
    result.train_seconds = round(train_wall, 3)
    result.samples_seen = trainer.qwenvl_samples * processes
    result.samples_per_second = round(result.samples_seen / max(train_wall, 1e-9), 3)
    result.padding_share = round(1 - trainer.qwenvl_tokens / max(trainer.qwenvl_padded_tokens, 1), 4)
    result.processes = processes
    state_dict = None
    if options.engine == "deepspeed":
        # Under ZeRO-3 every rank holds a shard: gather the whole state (a collective, so on every rank).
        state_dict = trainer.accelerator.get_state_dict(trainer.deepspeed)
    elif options.engine == "fsdp":
        state_dict = trainer.accelerator.get_state_dict(trainer.model)  # gathered the same way
    if rank == 0:  # rank 0 writes the run folder
        result.loss_curve = write_run_folder(model, setup, prepared, identity, result, losses, state_dict)
    leave_process_group()
    emit("done", result.model_dump())
    return result
