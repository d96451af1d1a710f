"""The transformers Trainer wired for a run: arguments from the options and rules, the family's dataset and
collator, token/sample counters, events for the progress display, evaluation by generation."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from . import placement
from .data import pack_rows
from .engines import deepspeed_config, fsdp_config, world_size
from .method import parameter_groups
from .options import RunSetup
from .presets import PRESETS
from .trackers import record_settings


def build_trainer(model, setup: RunSetup, samples, image_root: Path, emit, evaluation, result):
    """A Trainer over `model` that reports through `emit(kind, payload)` and fills `result`'s counters;
    `evaluation` is (prepared eval data, its image root) or None."""
    options, rules, family = setup.options, setup.rules, setup.family
    config, tokenizer = setup.config, setup.tokenizer
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
    preset = PRESETS[rules.method]

    class QwenVLTrainer(Trainer):
        qwenvl_tokens = 0  # real tokens (padding not counted)
        qwenvl_padded_tokens = 0  # positions computed, padding included
        qwenvl_samples = 0
        qwenvl_seconds = 0.0

        def create_optimizer(self, model=None):
            if self.optimizer is None and (options.vision_lr is not None or options.merger_lr is not None):
                opt_model = self.model if model is None else model
                groups = parameter_groups(
                    opt_model, family, options, self.args.learning_rate, self.get_decay_parameter_names(opt_model)
                )
                optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
                self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
            return super().create_optimizer(model)

        def compute_loss(self, model, inputs, *args, **kwargs):
            inputs = family.training_inputs(model, inputs, packed=options.packing)
            return super().compute_loss(model, inputs, *args, **kwargs)

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
            if rules.modules_to_save and placement.one_cuda_process(options):
                moved = placement.park_frozen_originals(kwargs["model"], "cpu")
                result.notes.append(
                    f"the frozen originals of {', '.join(rules.modules_to_save)} ({moved / 1e6:,.1f} M values) wait in "
                    "CPU memory: training uses their trainable copies only"
                )
            if options.recipe != "upstream" and placement.one_cuda_process(options):
                moved = placement.embeddings_in_host_memory(kwargs["model"])
                if moved:
                    result.notes.append(
                        f"the frozen token embeddings ({moved / 1e6:,.1f} M values) are looked up in CPU memory "
                        "and only the rows of each batch go to the GPU"
                    )
            if options.report_to:
                settings = json.loads(options.model_dump_json()) | {"rules": rules.model_dump()}
                record_settings(options.report_to, settings, trainer_ref[0].callback_handler.callbacks)
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
                        "memory": memory_text(),
                    },
                )

        def on_save(self, args, state, control, **kwargs):
            emit("save", {"step": state.global_step})

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            if evaluation is None or not state.is_world_process_zero:
                return
            record = {"step": state.global_step, "eval_loss": (metrics or {}).get("eval_loss")}
            record.update(generation_metrics(kwargs["model"], setup, evaluation))
            result.evaluations.append(record)
            emit("eval", record)

    arguments = TrainingArguments(
        output_dir=str(setup.checkpoints),
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
        # A NaN or inf loss is logged as it is. transformers' filter would hide it from the log, and it reads the
        # loss of every micro-batch on the host, making the host wait for the GPU after each one.
        logging_nan_inf_filter=False,
        save_strategy="steps",
        save_steps=options.save_steps,
        save_total_limit=options.save_total_limit,
        bf16=rules.precision == "bf16",
        fp16=rules.precision == "fp16",
        use_cpu=not torch.cuda.is_available(),
        ddp_backend="gloo" if not torch.cuda.is_available() and world_size() > 1 else None,
        ddp_find_unused_parameters=False,  # every trainable parameter is used (text-only batches touch the ViT)
        report_to=list(options.report_to) or "none",
        run_name=Path(options.output).name,
        deepspeed=deepspeed_config(options, rules) if options.engine == "deepspeed" else None,
        fsdp=options.engine == "fsdp",
        fsdp_config=fsdp_config(options, family) if options.engine == "fsdp" else None,
        seed=options.seed,
        dataloader_num_workers=options.workers,
        remove_unused_columns=False,
        disable_tqdm=True,
        eval_strategy="steps" if evaluation is not None else "no",
        eval_on_start=evaluation is not None,  # the "before" numbers: step 0
        eval_steps=options.eval_every,
        per_device_eval_batch_size=options.batch_size,
    )
    sized = {"pixels": setup.pixels} if setup.pixels else {}  # --min-pixels/--max-pixels (Qwen2-VL and later)
    collator = family.collator(tokenizer, pad_to=options.max_length if options.recipe == "upstream" else None)
    trainer = QwenVLTrainer(
        model=model,
        args=arguments,
        train_dataset=family.training_dataset(samples, config, image_root, options.max_length, rows, **sized),
        eval_dataset=family.training_dataset(evaluation[0].samples, config, evaluation[1], options.max_length, **sized)
        if evaluation is not None
        else None,
        data_collator=collator,
        callbacks=[Events()],
        compute_loss_func=token_mean_loss if getattr(model, "accepts_loss_kwargs", True) is False else None,
    )
    trainer_ref = [trainer]
    trainer.remove_callback(PrinterCallback)  # progress is reported through `emit`
    return trainer


def token_mean_loss(outputs, labels, num_items_in_batch=None):
    """The loss of models whose forward takes no `num_items_in_batch` (transformers' Qwen2/2.5/3-VL set
    `accepts_loss_kwargs = False`): summed over the supervised tokens and divided by the Trainer's count of
    them across the step's micro-batches and processes, so that gradient accumulation and several processes
    average over tokens exactly as one large batch would (without it each process averaged its own tokens)."""
    import torch.nn.functional as F

    logits = outputs.logits
    predictions = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    targets = labels[:, 1:].reshape(-1).to(logits.device)
    if num_items_in_batch is None:
        return F.cross_entropy(predictions, targets, ignore_index=-100)
    total = F.cross_entropy(predictions, targets, ignore_index=-100, reduction="sum")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def generation_metrics(model, setup: RunSetup, evaluation) -> dict:
    """Ask the model the first --eval-samples samples of --eval-data: exact match and Acc@0.5."""
    options, family = setup.options, setup.family
    from ..evaluate import evaluate
    from ..schemas import GenerationSettings

    prepared, root = evaluation
    samples = []
    bad = {f.sample_index for f in prepared.report.findings if f.severity.value == "error"}
    for record in prepared.data.records():
        if record.index not in bad and record.problem is None:
            samples.append(record.value)
        if len(samples) >= options.eval_samples:
            break
    processor = family.processor(setup.tokenizer, setup.config, image_root=root)
    was_training = model.training
    model.eval()
    try:
        report = evaluate(
            model, processor, samples, GenerationSettings(max_new_tokens=64), family=family, generation={}
        )
    finally:
        model.train(was_training)
    return {
        "accuracy": report.accuracy,
        "exact_match": report.exact_match,
        "acc_at_50": report.acc_at_50,
        "questions": report.questions,
    }


def memory_text() -> str:
    """Peak memory so far: the CUDA allocator's, or the process's RSS on a CPU."""
    if torch.cuda.is_available():
        return f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
    try:
        import resource

        return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB RSS"
    except ImportError:
        return "?"
