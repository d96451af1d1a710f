"""4-bit base models for Q-LoRA: the LM's Linear layers quantised, everything else as loaded.

The same five Linear layers of every LM block are quantised in both formats (`QUANTISED_LAYERS`:
`attn.c_attn`, `attn.c_proj`, `mlp.w1`, `mlp.w2`, `mlp.c_proj`); `wte`, the RMSNorms, `lm_head` and
the whole vision tower (`transformer.visual`) never are.

- **bitsandbytes NF4**, quantised while loading a bf16/fp16/fp32 checkpoint (`load_nf4`).
- **GPTQ Int4 in the official Qwen-VL-Chat-Int4 layout** (`quantize_gptq` writes one, `load_gptq`
  reads it). `config.json` carries `quantization_config` (`GPTQ_DEFAULTS` plus bits and group_size),
  and each quantised layer is stored as

  ```
  <name>.qweight  int32 [in * bits / 32, out]  codes packed along in_features, low bits first
  <name>.qzeros   int32 [groups, out * bits / 32]  zero point minus one (the AutoGPTQ "v1" convention)
  <name>.scales   fp16  [groups, out]
  <name>.g_idx    int32 [in]  group of each input channel (i // group_size without act-order)
  <name>.bias     fp16  [out]  (c_attn only)
  ```
  so that `w[i, o] = scales[g_idx[i], o] * (code[i, o] - (zero[g_idx[i], o] + 1))`. The other tensors
  keep their official names, in fp16.

Both need the `qlora` extra (`pip install 'qwenvl[qlora]'`); the libraries are imported only when a
function here runs. GPTQ layers run on gptqmodel's pure-PyTorch kernel (`TorchLinear`, backend
`gptq_torch`): it works on CPU and keeps the autograd path through its input in train and eval mode
alike, which LoRA needs (the fused CPU kernels that `auto` may choose do not).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import QwenvlError
from .checkpoint import (
    DTYPES,
    assign_weights,
    load_checkpoint,
    read_generation_config,
    save_checkpoint,
)
from .config import QwenVLConfig
from .tokenizer import VOCAB_FILE, QwenVLTokenizer

QUANTISED_LAYERS = ("attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj")
# True-sequential order inside a block: each group is quantised on the outputs of the groups before it,
# already quantised (w1 and w2 read the same input, so they share one pass).
SEQUENTIAL_GROUPS = (("attn.c_attn",), ("attn.c_proj",), ("mlp.w1", "mlp.w2"), ("mlp.c_proj",))
# The official Qwen-VL-Chat-Int4 quantization_config, less bits and group_size.
GPTQ_DEFAULTS: dict[str, Any] = {
    "damp_percent": 0.01,
    "desc_act": False,
    "static_groups": False,
    "sym": True,
    "true_sequential": True,
    "model_name_or_path": None,
    "model_file_base_name": "model",
    "quant_method": "gptq",
}
GPTQ_BITS = (2, 3, 4, 8)
EXTRA_FIX = "Install the Q-LoRA extra: pip install 'qwenvl[qlora]'"
# Calibration text used when quantize_gptq gets none: pass token ids from the training data for real use.
CALIBRATION_TEXT = """\
A vision-language model reads a picture and a question, then writes an answer. Where is the red square?
The red square is in the top left of the picture. How many shapes are in the picture? There are three.
Describe the image in detail: a green circle lies below a blue triangle, and a yellow car stands on the
right. The sun was setting behind the mountains when the train arrived at the small station. Children
were playing football on the grass while their parents talked near the fountain. Please read the text
on the sign, count the people, and explain why the sky looks orange. Yesterday we visited the museum,
bought tickets, watched a short film about ancient ships and had lunch with friends from another city.
"""


def quantised_layer_names(config: QwenVLConfig) -> list[str]:
    """Full module names of the quantised Linear layers, block by block."""
    return [f"transformer.h.{i}.{name}" for i in range(config.num_hidden_layers) for name in QUANTISED_LAYERS]


def gptq_quantization_config(bits: int = 4, group_size: int = 128) -> dict[str, Any]:
    """The `quantization_config` of an official-layout GPTQ checkpoint."""
    return {"bits": bits, "group_size": group_size, **GPTQ_DEFAULTS}


def _import_bitsandbytes():
    try:
        import bitsandbytes
    except ImportError as exc:
        raise QwenvlError(f"NF4 quantisation needs bitsandbytes, which does not import ({exc})", EXTRA_FIX) from None
    return bitsandbytes


def _import_gptqmodel():
    from .. import quiet_import

    try:
        quiet_import("gptqmodel")  # fails early, with the extra named, when it is missing
    except Exception as exc:
        raise QwenvlError(f"GPTQ checkpoints need gptqmodel, which does not import ({exc})", EXTRA_FIX) from None


# --- bitsandbytes NF4 ----------------------------------------------------------------------------------


def load_nf4(
    folder: str | Path,
    compute_dtype: torch.dtype = torch.float32,
    double_quant: bool = True,
    device: str | torch.device = "cpu",
) -> tuple[Any, QwenVLTokenizer]:
    """Load a bf16/fp16/fp32 checkpoint with the LM's Linear layers as bitsandbytes NF4 `Linear4bit`.

    The checkpoint is read by `load_checkpoint` (same layout checks), in `compute_dtype`, and each
    layer in `QUANTISED_LAYERS` is then swapped for a `Linear4bit` whose weight is quantised as it moves
    to `device` (blocks of 64, with the block scales quantised again when `double_quant`). Everything
    else stays in `compute_dtype`. Returns (model in eval mode, tokenizer); `model.is_loaded_in_4bit`
    is set, which is how peft knows to wrap these layers with its bnb LoRA layers.
    """
    model, tokenizer = load_checkpoint(folder, dtype=compute_dtype, device="cpu")
    swap_in_nf4(model, compute_dtype, double_quant, device)
    return model, tokenizer


def swap_in_nf4(
    model,
    compute_dtype: torch.dtype,
    double_quant: bool = True,
    device: str | torch.device = "cpu",
    names: Sequence[str] | None = None,
) -> None:
    """Replace each layer of `QUANTISED_LAYERS` (or the `nn.Linear` modules `names`, for another model) by a
    bitsandbytes NF4 `Linear4bit`, one layer at a time (its weight is quantised as it moves to `device`), then
    move the rest of the model to `device`."""
    bnb = _import_bitsandbytes()
    for name in quantised_layer_names(model.config) if names is None else names:
        linear = model.get_submodule(name)
        quantised = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=compute_dtype,
            compress_statistics=double_quant,
            quant_type="nf4",
            device="meta",
        )
        quantised.weight = bnb.nn.Params4bit(
            linear.weight.data, requires_grad=False, compress_statistics=double_quant, quant_type="nf4"
        )
        if linear.bias is not None:
            quantised.bias = nn.Parameter(linear.bias.data, requires_grad=linear.bias.requires_grad)
        model.set_submodule(name, quantised.to(device))  # Params4bit quantises on this move
        del linear
    model.to(device)
    model.is_loaded_in_4bit = True
    model.eval()


# --- GPTQ Int4 -----------------------------------------------------------------------------------------


def _quantize_config(bits: int, group_size: int):
    from gptqmodel import QuantizeConfig

    # act_group_aware off: with desc_act off, the official layout keeps every input channel in its own
    # group (g_idx = i // group_size). No fallback to round-to-nearest, no offload of layers to disk.
    return QuantizeConfig(
        bits=bits,
        group_size=group_size,
        desc_act=False,
        sym=True,
        damp_percent=GPTQ_DEFAULTS["damp_percent"],
        act_group_aware=False,
        fallback=None,
        offload_to_disk=False,
    )


def _quant_linear_class(bits: int, group_size: int, desc_act: bool, sym: bool, device: torch.device):
    from gptqmodel.utils.importer import hf_select_quant_linear_v2

    return hf_select_quant_linear_v2(
        bits=bits,
        group_size=group_size,
        desc_act=desc_act,
        sym=sym,
        format="gptq",
        quant_method="gptq",
        backend="gptq_torch",
        device_map={"": str(device)},
        pack=False,
    )


def default_calibration(tokenizer: QwenVLTokenizer, length: int = 64) -> list[list[int]]:
    """`CALIBRATION_TEXT` as token ids, cut into samples of `length` tokens."""
    ids = tokenizer.encode_plain(CALIBRATION_TEXT)
    return [ids[i : i + length] for i in range(0, len(ids), length) if len(ids[i : i + length]) > 1]


class _StopForward(Exception):
    pass


def _first_block_inputs(model, samples: Sequence[Sequence[int]]) -> list[tuple]:
    """The positional arguments the first LM block receives for each sample, caught by a pre-hook."""
    captured: list[tuple] = []

    def catch(_module, args):
        captured.append(args)
        raise _StopForward

    handle = model.transformer.h[0].register_forward_pre_hook(catch)
    try:
        for ids in samples:
            with contextlib.suppress(_StopForward):
                model(input_ids=torch.tensor([list(ids)]), use_cache=False)
    finally:
        handle.remove()
    return captured


@torch.no_grad()
def quantize_gptq(
    src_folder: str | Path,
    dst_folder: str | Path,
    calibration: list[list[int]] | None = None,
    bits: int = 4,
    group_size: int = 128,
    dtype: str = "fp16",
    force: bool = False,
) -> Path:
    """Quantise a bf16/fp16/fp32 checkpoint with GPTQ into the official Int4 layout, on CPU.

    `calibration` holds token-id sequences (text only); None uses `default_calibration`. The algorithm
    is the GPTQ paper's, block by block and true-sequential (`SEQUENTIAL_GROUPS`): each block sees the
    outputs of the blocks before it, already quantised. The unquantised tensors are written in `dtype`
    (fp16, as the official checkpoint).

    gptqmodel pieces used (its layer-level API, as optimum drives it): `gptqmodel.quantization.GPTQ`
    per layer (`add_batch` on the layer's inputs, `hf_quantize` for scales, zero points and g_idx, which
    also leaves the quantised-dequantised weight in the layer); the `gptq_torch` QuantLinear
    (`TorchLinear`, chosen by `utils.importer.hf_select_quant_linear_v2`) and its `pack_original`; then
    `utils.model.convert_gptq_v2_to_v1_format_module`, because the packer writes zero points as they are
    while the checkpoint format stores them minus one, exactly as gptqmodel's own `pack_module` does
    before saving a `gptq` (v1) checkpoint.
    """
    _import_gptqmodel()
    from gptqmodel.quantization import GPTQ
    from gptqmodel.utils.model import convert_gptq_v2_to_v1_format_module

    if bits not in GPTQ_BITS:
        raise QwenvlError(f"GPTQ cannot quantise to {bits} bits", f"Choose one of {', '.join(map(str, GPTQ_BITS))}")
    if dtype not in DTYPES:
        raise QwenvlError(f"unknown dtype {dtype!r}", f"Choose one of {', '.join(DTYPES)}")
    src_folder, dst_folder = Path(src_folder), Path(dst_folder)
    if dst_folder.exists() and any(dst_folder.iterdir()) and not force:
        raise QwenvlError(f"{dst_folder} is not empty", "Choose a new folder, or pass --force to replace it")
    model, tokenizer = load_checkpoint(src_folder, dtype="fp32")
    config = model.config
    for width in (config.hidden_size, config.intermediate_size // 2):
        if group_size != -1 and (group_size <= 0 or width % group_size):
            raise QwenvlError(
                f"group_size {group_size} does not divide the layer width {width}",
                "Choose a group size that divides hidden_size and intermediate_size / 2 (or -1 for one group)",
            )
    samples = calibration if calibration is not None else default_calibration(tokenizer)
    samples = [list(ids) for ids in samples if len(ids) > 0]
    if not samples:
        raise QwenvlError("the calibration set is empty", "Pass at least one non-empty list of token ids")
    top = max(max(ids) for ids in samples)
    if top >= config.vocab_size or min(min(ids) for ids in samples) < 0:
        raise QwenvlError(
            f"calibration token id {top} is outside the vocabulary (size {config.vocab_size})",
            "Encode the calibration text with this checkpoint's tokenizer",
        )
    if config.image_start_id in {i for ids in samples for i in ids}:
        raise QwenvlError("the calibration set holds <img> tokens", "Calibrate on text only")

    qcfg = _quantize_config(bits, group_size)
    inputs = _first_block_inputs(model, samples)
    results: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    for index, block in enumerate(model.transformer.h):
        for group in SEQUENTIAL_GROUPS:
            gptq = {}
            handles = []
            for name in group:
                layer = block.get_submodule(name)
                gptq[name] = GPTQ(layer, qcfg=qcfg)
                gptq[name].quantizer.configure(bits=bits, sym=True, perchannel=True)

                def add_batch(_module, args, output, worker=gptq[name]):
                    worker.add_batch(args[0].data, output.data)

                handles.append(layer.register_forward_hook(add_batch))
            try:
                for args in inputs:
                    block(*args)
            finally:
                for handle in handles:
                    handle.remove()
            for name, worker in gptq.items():
                scale, zero, g_idx = worker.hf_quantize(
                    percdamp=qcfg.damp_percent, group_size=group_size, actorder=False, act_group_aware=False
                )[:3]
                worker.free()
                results[f"transformer.h.{index}.{name}"] = (scale.cpu(), zero.cpu(), g_idx.cpu())
        inputs = [(block(*args), *args[1:]) for args in inputs]

    quant_linear = _quant_linear_class(bits, group_size, False, True, torch.device("cpu"))
    for name, (scale, zero, g_idx) in results.items():
        linear = model.get_submodule(name)
        packed = quant_linear(
            bits=bits,
            group_size=group_size,
            desc_act=False,
            sym=True,
            in_features=linear.in_features,
            out_features=linear.out_features,
            bias=linear.bias is not None,
        )
        packed.pack_original(linear, scale, zero, g_idx)
        convert_gptq_v2_to_v1_format_module(packed, qcfg)
        model.set_submodule(name, packed)

    config.quantization_config = gptq_quantization_config(bits, group_size)
    generation = read_generation_config(src_folder) or None
    return save_checkpoint(model, dst_folder, src_folder / VOCAB_FILE, generation, dtype=dtype, force=force)


def _check_gptq_config(folder: Path, quant: dict[str, Any]) -> tuple[int, int, bool, bool]:
    method = quant.get("quant_method")
    if method != "gptq":
        raise QwenvlError(
            f"{folder} is quantised with {method!r}, not GPTQ",
            "Load a GPTQ checkpoint (such as Qwen-VL-Chat-Int4), or the bf16/fp16 model with NF4",
        )
    checkpoint_format = quant.get("checkpoint_format", quant.get("format", "gptq"))
    if checkpoint_format != "gptq":
        raise QwenvlError(
            f"{folder} holds GPTQ weights in the {checkpoint_format!r} format",
            "Only the official (AutoGPTQ, 'gptq') format is read; convert the checkpoint with gptqmodel",
        )
    bits, group_size = quant.get("bits"), quant.get("group_size", 128)
    if bits not in GPTQ_BITS or not isinstance(group_size, int) or (group_size <= 0 and group_size != -1):
        raise QwenvlError(
            f"{folder} has an unusable quantization_config (bits {bits!r}, group_size {group_size!r})",
            "Use the config.json that came with the checkpoint",
        )
    return bits, group_size, bool(quant.get("desc_act", False)), bool(quant.get("sym", True))


def load_gptq(
    folder: str | Path,
    dtype: str | torch.dtype = "fp32",
    device: str | torch.device = "cpu",
    compile: bool = False,
) -> tuple[Any, QwenVLTokenizer]:
    """Load an official-layout GPTQ checkpoint (Qwen-VL-Chat-Int4, or one from `quantize_gptq`).

    The model is built on the meta device with gptqmodel's `TorchLinear` (backend `gptq_torch`) in place
    of each layer in `QUANTISED_LAYERS`; every tensor is assigned as it is read. Quantised tensors keep
    their stored dtypes (int32 codes, fp16 scales and bias); the others are cast to `dtype`. The stored
    zero points are converted to the convention the kernel computes with (+1, gptqmodel's v1 → v2).
    `compile=True` lets the kernel `torch.compile` its dequantisation (worth it on a GPU; on CPU the
    first forward then spends tens of seconds compiling). Returns (model in eval mode, tokenizer).
    """
    _import_gptqmodel()
    from gptqmodel.utils.model import convert_gptq_v1_to_v2_format_module

    from .modeling import QwenVLForCausalLM

    folder = Path(folder)
    device = torch.device(device)
    config = QwenVLConfig.from_folder(folder)
    if not config.quantization_config:
        raise QwenvlError(
            f"{folder} is not quantised (config.json has no quantization_config)",
            "Load it with NF4 (Q-LoRA quantises at load time), or quantise it first with GPTQ",
        )
    bits, group_size, desc_act, sym = _check_gptq_config(folder, config.quantization_config)
    tokenizer = QwenVLTokenizer.from_pretrained(folder)
    target = DTYPES[dtype] if isinstance(dtype, str) else dtype
    quant_linear = _quant_linear_class(bits, group_size, desc_act, sym, device)
    names = quantised_layer_names(config)
    with torch.device("meta"):
        model = QwenVLForCausalLM(config)
        for name in names:
            linear = model.get_submodule(name)
            model.set_submodule(
                name,
                quant_linear(
                    bits=bits,
                    group_size=group_size,
                    desc_act=desc_act,
                    sym=sym,
                    in_features=linear.in_features,
                    out_features=linear.out_features,
                    bias=linear.bias is not None,
                ),
            )
    quantised_prefixes = tuple(f"{name}." for name in names)

    def convert(key: str, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.is_floating_point() and not key.startswith(quantised_prefixes):
            tensor = tensor.to(dtype=target)
        return tensor.to(device)

    assign_weights(
        model,
        folder,
        convert,
        "the Qwen-VL GPTQ layout",
        "The LM's c_attn, attn.c_proj, w1, w2 and mlp.c_proj must be quantised and nothing else",
    )
    for name in names:
        layer = model.get_submodule(name)
        convert_gptq_v1_to_v2_format_module(layer, bits=bits, pack_dtype=layer.pack_dtype)
        if not compile:
            layer.optimized = True  # post_init skips its torch.compile of the dequantisation
        layer.post_init()
    model.transformer.visual.attn_pool.pos_embed.requires_grad_(False)
    model.eval()
    return model, tokenizer
