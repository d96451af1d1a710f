"""Applying a method to a model: loading it in the method's precision (4-bit for Q-LoRA), LoRA adapters or
the full fine-tuning's trainable set, and what that costs in parameters and memory."""

from __future__ import annotations

from pathlib import Path

from ..errors import QwenvlError
from ..families import ModelFamily
from .options import TrainOptions
from .presets import PRESETS, ResolvedRules


def quantisation(options: TrainOptions, family: ModelFamily, config) -> str | None:
    """The 4-bit format the run's model is in: the checkpoint's own (GPTQ) or NF4 quantised at load."""
    gptq = family.checkpoint_quantisation(config) == "gptq"
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


def load_model(family: ModelFamily, model_dir: Path, rules: ResolvedRules, quant: str | None, random_weights=False):
    """(model, tokenizer) in the rules' precision, on the GPU when there is one."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return family.load(model_dir, rules.precision, device, quant, random_weights)


def apply_method(model, options: TrainOptions, rules: ResolvedRules, family: ModelFamily):
    """LoRA adapters (on `options.lora_targets`, or the family's), or the full method's trainable set."""
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
            target_modules=lora_target_modules(list(options.lora_targets or family.lora_targets)),
            modules_to_save=list(rules.modules_to_save) or None,
            task_type="CAUSAL_LM",
        )
        return get_peft_model(model, lora)
    family.prepare_full(model, train_vision=options.train_vit)
    return model


def check_part_rates(model, options: TrainOptions, family: ModelFamily) -> None:
    """--vision-lr/--merger-lr need trainable parameters in their part (under LoRA: adapters placed there)."""
    for part, flag, value in (
        ("vision", "--vision-lr", options.vision_lr),
        ("merger", "--merger-lr", options.merger_lr),
    ):
        if value is None:
            continue
        if not any(p.requires_grad and family.parameter_part(n) == part for n, p in model.named_parameters()):
            what = "the vision tower" if part == "vision" else "the merger"
            fix = (
                "Drop the flag, or put LoRA adapters there with --lora-targets"
                if PRESETS[options.method].lora
                else "Drop the flag"
            )
            raise QwenvlError(
                f"{flag} sets the learning rate of {what}'s trainable parameters, and with --method "
                f"{options.method} none of {what} trains ({family.title}'s LoRA adapters are where --lora-targets "
                "puts them; full fine-tuning trains the merger, and the vision tower with --train-vit or --vision-lr)",
                fix,
            )


def parameter_groups(model, family: ModelFamily, options: TrainOptions, lr: float, decay_names) -> list[dict]:
    """AdamW's parameter groups: the trainable parameters by part (language, vision, merger: --vision-lr and
    --merger-lr, else `lr`) and by weight decay (`decay_names` decay, the rest not), empty groups left out."""
    rates = {"language": lr, "vision": options.vision_lr, "merger": options.merger_lr}
    groups: dict[tuple[str, bool], dict] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        part = family.parameter_part(name)
        decay = name in decay_names
        group = groups.setdefault(
            (part, decay),
            {
                "params": [],
                "weight_decay": options.weight_decay if decay else 0.0,
                "lr": lr if rates[part] is None else rates[part],
                "part": part,
            },
        )
        group["params"].append(parameter)
    return list(groups.values())


REGEX_CHARACTERS = set("*()|\\^$[]+?")


def lora_target_modules(targets: list[str]) -> list[str] | str:
    """peft's `target_modules`: a list matches module-name suffixes, a string is a regular expression matched
    against the whole name. One target with regex characters (module names have none), such as the newer
    families' LM-only default, is passed as the string."""
    if len(targets) == 1 and REGEX_CHARACTERS & set(targets[0]):
        return targets[0]
    return targets


def weights_gib(trainable: int, total: int, precision: str, quant: str | None) -> float:
    """Weights + gradients + AdamW states in GiB (activations excluded): a floor for the memory a run needs."""
    size = {"fp32": 4, "bf16": 2, "fp16": 2}[precision]
    frozen = total - trainable
    frozen_bytes = frozen * (0.56 if quant else size)  # 4-bit codes plus their scales, roughly
    mixed = 4 if precision != "fp32" else 0  # an fp32 master copy under mixed precision
    trainable_bytes = trainable * (size + size + 8 + mixed)  # weight, gradient, Adam m and v
    return round((frozen_bytes + trainable_bytes) / 2**30, 3)


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
