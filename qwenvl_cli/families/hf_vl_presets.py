"""The official-size presets of Qwen2-VL, Qwen2.5-VL and Qwen3-VL: `qwen2-vl-7b`, `qwen2.5-vl-7b`, `qwen3-vl-8b`.

The numbers are those of the official Qwen2-VL-7B-Instruct, Qwen2.5-VL-7B-Instruct and Qwen3-VL-8B-Instruct
config.json and preprocessor_config.json (sources in docs/families.md §9). `init-model` writes such a folder
config-only: the config, the built-in tiny vocabulary (its special ids recorded in the config, the embedding
rows kept at the official vocab_size: memory and speed are the official model's), the chat template and the
processor with the official pixel budget. A GPU builds random weights from it (`qwenvl profile --preset`);
random weights of this size are never built on a CPU here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import QwenvlError

# preset → (model_type, text config, vision config, top-level extras, (min_pixels, max_pixels))
_QWEN2_TEXT = dict(
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    hidden_act="silu",
    rms_norm_eps=1e-6,
    max_window_layers=28,
    use_sliding_window=False,
)
OFFICIAL: dict[str, dict[str, Any]] = {
    "qwen2-vl-7b": {
        "model_type": "qwen2_vl",
        "source": "Qwen/Qwen2-VL-7B-Instruct",
        "text": {
            **_QWEN2_TEXT,
            "max_position_embeddings": 32768,
            "sliding_window": 32768,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
        },
        "vision": dict(
            depth=32,
            embed_dim=1280,
            hidden_size=3584,
            mlp_ratio=4,
            num_heads=16,
            in_channels=3,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            hidden_act="quick_gelu",
        ),
        "pixels": (56 * 56, 28 * 28 * 16384),  # min_pixels 3,136, max_pixels 12,845,056
        "parameters": 8_291_375_616,
    },
    "qwen2.5-vl-7b": {
        "model_type": "qwen2_5_vl",
        "source": "Qwen/Qwen2.5-VL-7B-Instruct",
        "text": {
            **_QWEN2_TEXT,
            "max_position_embeddings": 128000,
            "sliding_window": 32768,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
        },
        "vision": dict(
            depth=32,
            hidden_size=1280,
            intermediate_size=3420,
            num_heads=16,
            in_channels=3,
            out_hidden_size=3584,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[7, 15, 23, 31],
            tokens_per_second=2,
            hidden_act="silu",
        ),
        "pixels": (56 * 56, 28 * 28 * 16384),
        "parameters": 8_292_166_656,
    },
    "qwen3-vl-8b": {
        "model_type": "qwen3_vl",
        "source": "Qwen/Qwen3-VL-8B-Instruct",
        "text": dict(
            vocab_size=151936,
            hidden_size=4096,
            intermediate_size=12288,
            num_hidden_layers=36,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            hidden_act="silu",
            rms_norm_eps=1e-6,
            max_position_embeddings=262144,
            attention_bias=False,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 5e6,
                "mrope_section": [24, 20, 20],
                "mrope_interleaved": True,
            },
        ),
        "vision": dict(
            depth=27,
            hidden_size=1152,
            intermediate_size=4304,
            num_heads=16,
            in_channels=3,
            out_hidden_size=4096,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            num_position_embeddings=2304,
            deepstack_visual_indexes=[8, 16, 24],
            hidden_act="gelu_pytorch_tanh",
        ),
        "pixels": (65536, 16777216),
        "parameters": 8_767_123_696,
    },
}
# the tiny preset whose files (tokenizer, template) a profile of the family's small model uses
TINY_OF = {"qwen2_vl": "tiny-qwen2-vl", "qwen2_5_vl": "tiny-qwen2.5-vl", "qwen3_vl": "tiny-qwen3-vl"}


def presets_of(model_type: str) -> dict[str, str]:
    """init-model presets of one family → their one-line descriptions."""
    return {
        name: f"the official sizes of {spec['source'].split('/')[1]} (config only: random weights are built on a GPU)"
        for name, spec in OFFICIAL.items()
        if spec["model_type"] == model_type
    }


def profile_presets_of(model_type: str) -> dict[str, tuple[str, str | None]]:
    """`qwenvl profile --preset` names of one family → (chat preset, None: the families have no base presets)."""
    tiny = TINY_OF[model_type]
    return {tiny: (tiny, None), **{name: (name, None) for name in presets_of(model_type)}}


def official_config(preset: str, special: dict[str, int]):
    """The transformers config of `preset`, its special ids those of the vocabulary written beside it."""
    from transformers import AutoConfig

    spec = OFFICIAL[preset]
    text = dict(
        spec["text"],
        bos_token_id=special["<|endoftext|>"],
        eos_token_id=special["<|im_end|>"],
        pad_token_id=special["<|endoftext|>"],
    )
    config = AutoConfig.for_model(
        spec["model_type"],
        text_config=text,
        vision_config=dict(spec["vision"]),
        image_token_id=special["<|image_pad|>"],
        video_token_id=special["<|video_pad|>"],
        vision_start_token_id=special["<|vision_start|>"],
        vision_end_token_id=special["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    config.dtype = "bfloat16"
    return config


def write_official(family, processor_class: type, preset: str, output: Path, force: bool = False, weights=None):
    """Write `preset` config-only into `output`: config.json, tokenizer, processor and generation config."""
    from .hf_vl_tiny import (
        BPE_SIZE,
        SPECIALS,
        TEMPLATE_DEFAULT_SYSTEM,
        TEMPLATE_NO_SYSTEM,
        tiny_tokenizer,
        write_folder,
    )

    if weights:
        raise QwenvlError(
            f"--weights with --preset {preset}: qwenvl does not write random weights of the size of "
            f"{OFFICIAL[preset]['source']} (about 17 GB in bf16)",
            f"Drop --weights (config only), and profile it on a GPU: qwenvl profile --preset {preset}",
        )
    if output.exists() and any(output.iterdir()) and not force:
        raise QwenvlError(f"{output} is not empty", "Choose another --output, or pass --force to replace it")
    generation = family.generation
    template = TEMPLATE_DEFAULT_SYSTEM if generation.default_system else TEMPLATE_NO_SYSTEM
    tokenizer = tiny_tokenizer(template)
    special = {token: BPE_SIZE + i for i, token in enumerate(SPECIALS)}
    config = official_config(preset, special)
    config.architectures = [generation.model_class]
    processor = processor_class(
        image_processor=official_image_processor(preset, generation), tokenizer=tokenizer, chat_template=template
    )
    write_folder(family, processor, processor_class, output, lambda staging: config.save_pretrained(str(staging)))
    return {
        "preset": preset,
        "output": str(output),
        "parameters": OFFICIAL[preset]["parameters"],
        "weights_written": False,
        "vocab_ranks": BPE_SIZE,
        "vocab_size": OFFICIAL[preset]["text"]["vocab_size"],
        "weights_note": f"a GPU builds the random weights: qwenvl profile --preset {preset}",
    }


def official_image_processor(preset: str, generation):
    from .hf_vl_tiny import image_processor_for

    return image_processor_for(generation, *OFFICIAL[preset]["pixels"])
