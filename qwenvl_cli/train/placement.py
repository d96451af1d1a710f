"""Where weights live on one GPU and how blocks run: frozen originals and embeddings in CPU memory,
regional torch.compile of the family's blocks."""

from __future__ import annotations

import torch

from ..families import ModelFamily
from .engines import world_size
from .options import TrainOptions


def one_cuda_process(options: TrainOptions) -> bool:
    """One CUDA process without DeepSpeed or FSDP (they shard and place the parameters themselves; DDP wants
    a module on one device): where frozen weights that training does not need on the GPU wait in CPU memory."""
    return torch.cuda.is_available() and options.engine == "ddp" and world_size() == 1


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


def compile_blocks(model, family: ModelFamily) -> int:
    """torch.compile every language and vision block in place (regional compilation: the blocks of one kind
    share their compiled code); returns how many. The first steps pay for compiling."""
    kinds = family.block_classes()
    blocks = [module for module in model.modules() if isinstance(module, kinds)]
    for block in blocks:
        block.compile(dynamic=None)
    return len(blocks)
