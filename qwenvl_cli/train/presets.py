"""The one table of method rules (full, LoRA, Q-LoRA), checked before anything is loaded. What a rule means
for one model (which modules LoRA targets, what a base model's LoRA also trains) is the family's
(`qwenvl_cli.families`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel

from ..errors import QwenvlError

Method = Literal["full", "lora", "qlora"]
Precision = Literal["bf16", "fp16", "fp32"]
Engine = Literal["ddp", "deepspeed", "fsdp"]


class MethodPreset(BaseModel):
    method: Method
    summary: str
    gpu_precision: Precision  # the default on a GPU; every method runs in fp32 on a CPU
    precisions: tuple[Precision, ...]
    lora: bool
    quantised: bool
    learning_rate: float
    zero3: bool  # allowed with DeepSpeed ZeRO-3
    fsdp: bool
    refusal_reasons: dict[str, str] = {}


PRESETS: dict[str, MethodPreset] = {
    "full": MethodPreset(
        method="full",
        summary="the language model and the vision-language adapter; the vision tower stays frozen unless --train-vit",
        gpu_precision="bf16",
        precisions=("bf16", "fp16", "fp32"),
        lora=False,
        quantised=False,
        learning_rate=1e-5,
        zero3=True,
        fsdp=True,
    ),
    "lora": MethodPreset(
        method="lora",
        summary="LoRA on the language model's projections; on a base model also its embeddings and output layer",
        gpu_precision="bf16",
        precisions=("bf16", "fp16", "fp32"),
        lora=True,
        quantised=False,
        learning_rate=1e-4,
        zero3=True,
        fsdp=True,
    ),
    "qlora": MethodPreset(
        method="qlora",
        summary="LoRA over a 4-bit LM (GPTQ Int4 checkpoint, or NF4 quantised at load)",
        gpu_precision="fp16",
        precisions=("fp16",),
        lora=True,
        quantised=True,
        learning_rate=1e-4,
        zero3=False,
        fsdp=False,
        refusal_reasons={
            "bf16": "Q-LoRA trains in fp16 only: the 4-bit kernels dequantise to fp16 and the upstream "
            "recipe is validated in fp16",
            "zero3": "ZeRO-3 shards parameters, and 4-bit quantised layers cannot be sharded",
            "fsdp": "FSDP shards parameters, and 4-bit quantised layers cannot be sharded",
        },
    ),
}


class ResolvedRules(BaseModel):
    method: Method
    precision: Precision
    modules_to_save: tuple[str, ...]
    notes: list[str]


def resolve_rules(
    method: str,
    precision: str = "auto",
    engine: str = "ddp",
    zero: int | None = None,
    base_model: bool = False,
    base_modules: Sequence[str] = (),
    train_vit: bool = False,
    gpu: bool = False,
) -> ResolvedRules:
    """Apply the table: the precision to use, what LoRA also trains (on a base model: `base_modules`, the
    family's), and refusals with their reasons."""
    if method not in PRESETS:
        raise QwenvlError(f"unknown method {method!r}", "Use --method full, lora or qlora")
    preset = PRESETS[method]
    notes: list[str] = []
    wanted = preset.gpu_precision if precision == "auto" else precision
    if wanted not in preset.precisions and (gpu or wanted != "fp32"):
        reason = preset.refusal_reasons.get(wanted, f"{method} does not support {wanted}")
        raise QwenvlError(
            f"--precision {wanted} is refused for {method}: {reason}",
            f"Use --precision {preset.gpu_precision} (or auto)",
        )
    if engine == "deepspeed" and zero == 3 and not preset.zero3:
        raise QwenvlError(
            f"{method} with DeepSpeed ZeRO-3 is refused: {preset.refusal_reasons['zero3']}",
            "Use --zero 2, or plain DDP",
        )
    if engine == "fsdp" and not preset.fsdp:
        raise QwenvlError(
            f"{method} with FSDP is refused: {preset.refusal_reasons['fsdp']}",
            "Use --engine ddp or --engine deepspeed --zero 2",
        )
    if train_vit and method != "full":
        raise QwenvlError("--train-vit goes with --method full", "Drop --train-vit, or train with --method full")
    modules_to_save: tuple[str, ...] = ()
    if preset.lora and base_model:
        if preset.quantised:
            raise QwenvlError(
                "Q-LoRA on a base model is refused: the base model has not learned the ChatML tokens, so "
                "wte and lm_head would have to train, and the 4-bit model's layers cannot",
                "Train Q-LoRA on a chat model (e.g. Qwen-VL-Chat-Int4), or use --method lora on the base model",
            )
        modules_to_save = tuple(base_modules)
        notes.append(
            f"base model (chat_format raw): {' and '.join(modules_to_save)} train in full beside the LoRA adapters"
        )
    if not gpu:
        if wanted != "fp32":
            notes.append(f"no GPU: running in fp32 (the {wanted} rule was checked and holds on a GPU)")
        wanted = "fp32"
    return ResolvedRules(method=method, precision=wanted, modules_to_save=modules_to_save, notes=notes)
