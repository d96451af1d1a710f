"""Model presets for `qwenvl init-model`: the built-in tiny models and the official 7B sizes.

`tiny` is the default model of the whole tool: every architectural part of Qwen-VL is there (two LM
blocks, two ViT blocks, the 256-query resampler, output_dim a multiple of 128), but a CPU training step
takes tens of milliseconds. Its vocabulary is a byte-level BPE learned here, deterministically, from a
small corpus in the language of the demo data.
"""

from __future__ import annotations

import itertools
import json
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from ..errors import QwenvlError
from .checkpoint import default_generation_config, save_checkpoint
from .config import OFFICIAL_VISUAL, QwenVLConfig
from .tokenizer import IMG_START, SPECIAL_TOKENS, VOCAB_FILE, QwenVLTokenizer, train_bpe_ranks, write_ranks

TINY_RANKS = 1024
PRESETS = ("tiny", "tiny-base", "qwen-vl-7b", "qwen-vl-7b-base")
BASE_PRESETS = ("tiny-base", "qwen-vl-7b-base")  # chat_format "raw": no ChatML template
OFFICIAL_VOCAB_SIZE = 151936  # rows of wte and lm_head in every official Qwen-VL checkpoint
_COLOURS = ("red", "green", "blue", "yellow", "black", "white", "orange", "purple")
_SHAPES = ("square", "circle", "triangle", "shape", "dog", "cat", "shirt", "car")
_NUMBERS = ("one", "two", "three", "four", "no", "1", "2", "3", "4", "5", "6", "7", "8", "9", "0")


_PROSE = """
A vision-language model reads a picture and a question, then writes an answer. It learns from
conversations: a person asks about an image, and the assistant replies with words, numbers, or the
location of an object drawn as a box. Training data comes from many places: photographs of streets,
kitchens, parks and offices; scanned documents with tables and handwriting; charts, maps and diagrams;
screenshots of phones and web pages. Each sample must be checked before training, because a single
broken file, a missing image or a box outside the frame can waste hours of computation.
The sun was setting behind the mountains when the train arrived at the small station. Children were
playing football on the grass while their parents talked near the fountain. A woman carried a basket
of apples, oranges and bananas; a man on a bicycle rang his bell twice and turned left at the corner.
Inside the library, students were reading books about history, science, music and mathematics.
Please describe what you see, count the people, read the text on the sign, and explain why the sky
looks orange. Could you tell me which animal is sleeping under the table, and whether it is a puppy?
Yesterday morning we visited the museum, bought tickets, watched a short film about ancient ships,
and had lunch with friends from another city. The weather forecast says it will rain tomorrow, so
bring an umbrella, a warm jacket and comfortable shoes.
"""


def tiny_corpus() -> str:
    """The fixed text the tiny vocabulary is learned from."""
    lines = ["You are a helpful assistant.", "system", "user", "assistant", "Picture 1: ", "Picture 2: "]
    for colour, shape in itertools.product(_COLOURS, _SHAPES):
        lines.append(f"What colour is the {shape}? The {shape} is {colour}.")
        lines.append(f"Where is the {colour} {shape}? <ref>the {colour} {shape}</ref><box>(120,45),(380,700)</box>")
    for number, shape in itertools.product(_NUMBERS, _SHAPES):
        lines.append(f"How many {shape}s are in the picture? There are {number}.")
    places = ("top left", "top right", "bottom left", "bottom right", "middle", "left", "right", "centre")
    for i, (colour, place) in enumerate(itertools.product(_COLOURS, places)):
        lines.append(f"The {colour} one is in the {place} of the picture, at ({i * 37 % 1000},{i * 91 % 1000}).")
    lines += [
        "Describe the image in detail. Which picture has more shapes? They have the same number.",
        "The quick brown fox jumps over the lazy dog. A Labrador is a dog.",
        "图中是什么？这是一只狗。图中有几个人？",
        "(0,0),(999,999) (12,34),(560,780) 0123456789",
        _PROSE,
    ]
    return "\n".join(lines)


@lru_cache(maxsize=1)
def tiny_ranks() -> dict[bytes, int]:
    return train_bpe_ranks(tiny_corpus(), TINY_RANKS)


def _padded_vocab(n_tokens: int, multiple: int = 64) -> int:
    return -(-n_tokens // multiple) * multiple


def preset_config(preset: str, num_ranks: int) -> QwenVLConfig:
    image_start = num_ranks + SPECIAL_TOKENS.index(IMG_START)
    if preset in ("tiny", "tiny-base"):
        return QwenVLConfig(
            vocab_size=_padded_vocab(num_ranks + len(SPECIAL_TOKENS)),
            hidden_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            kv_channels=32,
            intermediate_size=256,
            seq_length=2048,
            max_position_embeddings=8192,
            fp32=True,
            visual={
                "heads": 4,
                "image_size": 56,
                "image_start_id": image_start,
                "layers": 2,
                "mlp_ratio": 2.0,
                "output_dim": 128,
                "patch_size": 14,
                "width": 64,
            },
        )
    if preset in ("qwen-vl-7b", "qwen-vl-7b-base"):
        # The official embedding size whatever the vocabulary (the official one fills it; a smaller one, as
        # `qwenvl profile` uses, leaves rows unused): memory and speed are the official model's.
        if num_ranks + len(SPECIAL_TOKENS) > OFFICIAL_VOCAB_SIZE:
            raise QwenvlError(
                f"a vocabulary of {num_ranks} ranks does not fit Qwen-VL's {OFFICIAL_VOCAB_SIZE} embedding rows",
                "Pass the official qwen.tiktoken with --vocab",
            )
        visual = dict(OFFICIAL_VISUAL, image_start_id=image_start)
        return QwenVLConfig(vocab_size=OFFICIAL_VOCAB_SIZE, bf16=True, visual=visual)
    raise QwenvlError(f"unknown preset {preset!r}", f"Choose one of {', '.join(PRESETS)}")


def build_model(
    config: QwenVLConfig, seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
):
    """A randomly initialised model (deterministic for a seed). In fp32 the values are drawn in fp32; in a
    16-bit dtype they are drawn in it directly, so a 7B model never exists in fp32 (38 GB) on the way."""
    from .modeling import QwenVLForCausalLM

    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    try:
        if dtype != torch.float32:
            torch.set_default_dtype(dtype)
        with torch.device(device):
            model = QwenVLForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model.to(dtype)


def build_random(
    folder: str | Path,
    dtype: torch.dtype,
    device: str | torch.device,
    quant: str | None = None,
    seed: int = 0,
) -> tuple[Any, QwenVLTokenizer]:
    """(model in eval mode, tokenizer) with random weights for a folder's config.json and vocabulary, built
    directly on `device`: what `qwenvl profile --preset qwen-vl-7b` trains, where the values do not matter
    for speed and memory and a 19 GB file would. `quant="nf4"` swaps the LM's Linear layers for 4-bit ones
    (the layers the Int4 checkpoint quantises), one at a time."""
    folder = Path(folder)
    config = QwenVLConfig.from_folder(folder)
    tokenizer = QwenVLTokenizer.from_pretrained(folder)
    if quant not in (None, "nf4"):
        raise QwenvlError(
            f"random weights are built in bf16/fp16 or NF4, not {quant}",
            "Profile Q-LoRA with NF4 (the same layers in 4 bits), or pass --model with a GPTQ checkpoint",
        )
    model = build_model(config, seed, device=device, dtype=dtype)
    if quant == "nf4":
        from .quant import swap_in_nf4

        swap_in_nf4(model, compute_dtype=dtype, device=device)
    model.transformer.visual.attn_pool.pos_embed.requires_grad_(False)
    model.eval()
    return model, tokenizer


def init_model(
    preset: str,
    output: str | Path,
    seed: int = 0,
    vocab: str | Path | None = None,
    weights: bool | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Write a random checkpoint in the official layout. For qwen-vl-7b only config, tokenizer and
    generation config are written unless `weights=True` (about 19 GB)."""
    output = Path(output)
    if preset not in PRESETS:
        raise QwenvlError(f"unknown preset {preset!r}", f"Choose one of {', '.join(PRESETS)}")
    if vocab is not None:
        tokenizer = QwenVLTokenizer.from_file(vocab)
        vocab_path = Path(vocab)
    else:
        if preset.startswith("qwen-vl-7b"):
            raise QwenvlError(
                f"the {preset} preset needs the official vocabulary",
                "Pass --vocab path/to/qwen.tiktoken (from any Qwen-VL checkpoint)",
            )
        tokenizer = QwenVLTokenizer(tiny_ranks(), name="tiny")
        vocab_path = None
    config = preset_config(preset, tokenizer.num_ranks)
    generation = default_generation_config(tokenizer, chat=preset not in BASE_PRESETS)
    write_weights = not preset.startswith("qwen-vl-7b") if weights is None else weights
    with tempfile.TemporaryDirectory() as scratch:
        if vocab_path is None:
            vocab_path = Path(scratch) / VOCAB_FILE
            write_ranks(tiny_ranks(), vocab_path)
        if write_weights:
            model = build_model(config, seed)
            dtype = "bf16" if config.bf16 else "fp32"
            save_checkpoint(model, output, vocab_path, generation, dtype=dtype, force=force)
            parameters = sum(p.numel() for p in model.parameters())
        else:
            if output.exists() and any(output.iterdir()) and not force:
                raise QwenvlError(f"{output} is not empty", "Choose a new folder, or pass --force to replace it")
            output.mkdir(parents=True, exist_ok=True)
            (output / "config.json").write_text(json.dumps(config.to_official_dict(), indent=2) + "\n", "utf-8")
            (output / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", "utf-8")
            shutil.copyfile(vocab_path, output / VOCAB_FILE)
            parameters = None
    return {
        "preset": preset,
        "output": str(output),
        "vocab_ranks": tokenizer.num_ranks,
        "vocab_size": config.vocab_size,
        "parameters": parameters,
        "weights_written": write_weights,
    }
