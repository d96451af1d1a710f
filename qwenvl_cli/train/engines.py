"""Distributed engines: the DeepSpeed and FSDP configs generated from the method, and the process group's
life (a one-process group for DeepSpeed outside a launcher, the barrier at the end)."""

from __future__ import annotations

import os
from typing import Any

import torch

from ..families import ModelFamily
from .launch import free_port, is_launched, world
from .options import TrainOptions
from .presets import ResolvedRules


def engine_text(options: TrainOptions) -> str:
    if options.engine == "deepspeed":
        return f"DeepSpeed ZeRO-{options.zero}" + (" + CPU offload" if options.offload else "")
    if options.engine == "fsdp":
        return "FSDP full shard" + (" + CPU offload" if options.offload else "")
    return "DDP"


def fsdp_config(options: TrainOptions, family: ModelFamily) -> dict:
    """FSDP (version 2) settings for the Trainer: every language and vision block its own shard unit, a
    full (gathered) state dict for saving, CPU offload with --offload, activation checkpointing per block
    with --gradient-checkpointing (FSDP's own, which avoids a second all-gather in the backward pass)."""
    return {
        "version": 2,
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "transformer_layer_cls_to_wrap": [block.__name__ for block in family.block_classes()],
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


def single_process_group() -> None:
    """DeepSpeed wants a process group even for one process (without one it goes looking for MPI): outside
    torchrun, describe a group of one on this machine, as torchrun would (`forget_deepspeed` removes it)."""
    if is_launched() or "WORLD_SIZE" in os.environ:
        return
    wanted = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    wanted["MASTER_PORT"] = os.environ.get("MASTER_PORT") or str(free_port())
    for name, value in wanted.items():
        os.environ.setdefault(name, value)


def forget_deepspeed(environment: dict[str, str]) -> None:
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


def leave_process_group() -> None:
    """All ranks wait for rank 0's writing, then close the group together (a rank that simply exits while
    the others still communicate can abort the launch)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def world_size() -> int:
    return world()[1]
