"""The tiny init-model presets of Qwen2-VL, Qwen2.5-VL and Qwen3-VL: random weights (hidden 64, 2 layers, vision
depth 2), a small byte-level BPE with the family's special tokens and Qwen2Tokenizer's own normaliser and
pre-tokeniser, the chat template, and an image processor with a small pixel budget (4–16 picture tokens), so
that plain transformers loads the folder (`AutoModelForImageTextToText`; the processor through the image-only
subclass without torchvision, `AutoProcessor` with it: the official processor class is recorded)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from ..errors import QwenvlError

BPE_SIZE = 900  # learned symbols (256 bytes + merges); the special tokens follow
SPECIALS = (  # in the official order: official id = 151643 + index
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
VOCAB_SIZE = 1024  # embedding rows, above BPE_SIZE + len(SPECIALS)

_CORPUS = (
    "You are a helpful assistant.",
    "Picture 1: How many shapes are in the picture? There are 2. There is 1. There are 3.",
    "Where is the green circle? Where is the red square? Where is the blue triangle? yellow purple orange",
    "What colour is the shape? It is red. It is green. It is blue. the circle the square the triangle",
    '{"bbox_2d": [120, 233, 560, 780], "label": "the red circle"} (120,233),(560,780)',
    "system user assistant picture image label a an of in on with and is are what where which how many",
    "0 1 2 3 4 5 6 7 8 9 0123456789 , . : ; ! ? ( ) [ ] { } \" '",
)

# Chat templates that render the official ChatML layout (docs/families.md §2) for text and picture turns.
_CONTENT = (
    "{%- if m.content is string -%}{{ m.content }}"
    "{%- else -%}{%- for c in m.content -%}"
    "{%- if c.type == 'image' or 'image' in c or 'image_url' in c -%}"
    "{%- set ns.img = ns.img + 1 -%}{%- if add_vision_id %}{{ 'Picture ' ~ ns.img ~ ': ' }}{% endif -%}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif 'text' in c -%}{{ c.text }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
)
_TURNS = "{{ '<|im_start|>' + m.role + '\\n' }}" + _CONTENT + "{{ '<|im_end|>\\n' }}{%- endfor -%}"
_PROMPT = "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif -%}"
TEMPLATE_DEFAULT_SYSTEM = (
    "{%- set ns = namespace(img=0) -%}{%- for m in messages -%}"
    "{%- if loop.first and m.role != 'system' -%}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif -%}" + _TURNS + _PROMPT
)
TEMPLATE_NO_SYSTEM = "{%- set ns = namespace(img=0) -%}{%- for m in messages -%}" + _TURNS + _PROMPT


def tiny_tokenizer(chat_template: str):
    """A transformers Qwen2Tokenizer over a BPE trained here on a few sentences, special ids after the BPE."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    reference = transformers.Qwen2Tokenizer()  # for its normaliser and pre-tokeniser only
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = reference.backend_tokenizer.normalizer
    bpe.pre_tokenizer = reference.backend_tokenizer.pre_tokenizer
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_SIZE, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(list(_CORPUS) * 8, trainer=trainer)
    learned = json.loads(bpe.to_str())["model"]
    vocab = dict(learned["vocab"])
    for index in range(len(vocab), BPE_SIZE):  # a corpus too small for BPE_SIZE symbols: unused fillers
        vocab[f"<|unused_{index}|>"] = index
    vocab.update({token: BPE_SIZE + i for i, token in enumerate(SPECIALS)})
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]
    tokenizer = transformers.Qwen2Tokenizer(
        vocab=vocab, merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIALS)})
    tokenizer.chat_template = chat_template
    return tokenizer


def tiny_config(model_type: str):
    from transformers import AutoConfig

    special = {token: BPE_SIZE + i for i, token in enumerate(SPECIALS)}
    text = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=special["<|endoftext|>"],
        eos_token_id=special["<|im_end|>"],
        pad_token_id=special["<|endoftext|>"],
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
    )
    vision: dict[str, Any] = dict(depth=2, num_heads=2, patch_size=14, temporal_patch_size=2, spatial_merge_size=2)
    if model_type == "qwen2_vl":
        vision.update(embed_dim=32, hidden_size=64, mlp_ratio=2)
    elif model_type == "qwen2_5_vl":
        vision.update(
            hidden_size=32, intermediate_size=64, out_hidden_size=64, window_size=56, fullatt_block_indexes=[1]
        )
    else:  # qwen3_vl
        text.update(
            head_dim=16,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 5e6,
                "mrope_section": [4, 2, 2],
                "mrope_interleaved": True,
            },
        )
        vision.update(
            hidden_size=32,
            intermediate_size=64,
            out_hidden_size=64,
            patch_size=16,
            num_position_embeddings=64,
            deepstack_visual_indexes=[0],
        )
    return AutoConfig.for_model(
        model_type,
        text_config=text,
        vision_config=vision,
        image_token_id=special["<|image_pad|>"],
        video_token_id=special["<|video_pad|>"],
        vision_start_token_id=special["<|vision_start|>"],
        vision_end_token_id=special["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def tiny_image_processor(generation):
    """The tiny presets' image processor: 4–16 picture tokens."""
    factor = generation.patch_size * 2
    return image_processor_for(generation, 4 * factor * factor, 16 * factor * factor)


def image_processor_for(generation, min_pixels: int, max_pixels: int):
    """A Qwen2-VL-kind image processor (the PIL backend) of `generation` with these picture bounds."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
        patch_size=generation.patch_size,
        temporal_patch_size=2,
        merge_size=2,
        image_mean=list(generation.image_mean),
        image_std=list(generation.image_std),
    )


def write_folder(family, processor, processor_class: type, output: Path, save_model) -> None:
    """Write a preset folder atomically: `save_model(staging)` (weights or config), the processor and tokenizer
    files naming the official processor class, and the family's generation config."""
    generation = family.generation
    staging = output.parent / f".{output.name}.init"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        save_model(staging)
        processor.save_pretrained(str(staging))
        processor.image_processor.save_pretrained(str(staging))  # preprocessor_config.json, as the Hub's
        for name in ("processor_config.json", "tokenizer_config.json", "preprocessor_config.json"):
            path = staging / name
            if path.is_file():  # the official class, so that AutoProcessor loads it where torchvision is
                path.write_text(path.read_text("utf-8").replace(processor_class.__name__, generation.processor_class))
        generation_config = family.default_generation_config(processor.tokenizer)
        (staging / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n", "utf-8")
        if output.exists():
            shutil.rmtree(output)
        output.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_tiny(
    family, processor_class: type, preset: str, output: Path, seed: int = 0, force: bool = False, weights=None
) -> dict:
    """Write `preset` of `family` into `output` (replaced with `force`); `processor_class` is the image-only
    subclass of the family's processor."""
    import torch
    from transformers import AutoModelForImageTextToText

    if output.exists() and any(output.iterdir()) and not force:
        raise QwenvlError(f"{output} is not empty", "Choose another --output, or pass --force to replace it")
    generation = family.generation
    template = TEMPLATE_DEFAULT_SYSTEM if generation.default_system else TEMPLATE_NO_SYSTEM
    tokenizer = tiny_tokenizer(template)
    processor = processor_class(
        image_processor=tiny_image_processor(generation), tokenizer=tokenizer, chat_template=template
    )
    config = tiny_config(generation.model_type)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    write_weights = weights is None or weights

    def save_model(staging: Path) -> None:
        if write_weights:
            model.save_pretrained(str(staging))
        else:
            config.architectures = [generation.model_class]
            config.save_pretrained(str(staging))

    write_folder(family, processor, processor_class, output, save_model)
    return {
        "preset": preset,
        "output": str(output),
        "parameters": sum(p.numel() for p in model.parameters()),
        "weights_written": write_weights,
        "vocab_ranks": BPE_SIZE,
        "vocab_size": VOCAB_SIZE,
    }
