"""Qwen-VL and Qwen-VL-Chat (2023, `model_type` "qwen"): the native model in `qwenvl_cli.model`.

Conventions: ChatML template (a base model, generation config `chat_format: "raw"`, has none); each picture
is `<img>` + 256 positions + `</img>` (258 tokens) at 448 px; grounding as `<ref>…</ref><box>(x1,y1),(x2,y2)</box>`
in [0,1000). LoRA targets `c_attn`, `attn.c_proj`, `w1`, `w2`; LoRA on a base model also trains `wte` and
`lm_head` in full. Full fine-tuning trains the LM and the resampler (the ViT with --train-vit)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from .base import ModelFamily, read_json_object


class QwenVLFamily(ModelFamily):
    name: ClassVar[str] = "qwen-vl"
    title: ClassVar[str] = "Qwen-VL"
    model_types: ClassVar[tuple[str, ...]] = ("qwen",)
    presets: ClassVar[dict[str, str]] = {
        "tiny": "chat model for tests and demos",
        "tiny-base": "the same as a base model (chat_format raw)",
        "qwen-vl-7b": "the official sizes (Qwen-VL-Chat)",
        "qwen-vl-7b-base": "the same as a base model (Qwen-VL)",
    }
    base_presets: ClassVar[tuple[str, ...]] = ("tiny-base", "qwen-vl-7b-base")
    profile_presets: ClassVar[dict[str, tuple[str, str]]] = {
        "tiny": ("tiny", "tiny-base"),
        "tiny-base": ("tiny", "tiny-base"),
        "qwen-vl-7b": ("qwen-vl-7b", "qwen-vl-7b-base"),
    }
    device_presets: ClassVar[tuple[str, ...]] = ("qwen-vl-7b",)
    lora_targets: ClassVar[tuple[str, ...]] = ("c_attn", "attn.c_proj", "w1", "w2")
    base_modules_to_save: ClassVar[tuple[str, ...]] = ("wte", "lm_head")
    tokenizer_files: ClassVar[tuple[str, ...]] = ("qwen.tiktoken",)
    full_summary: ClassVar[str] = (
        "all LM weights and the resampler (attn_pool); the ViT stays frozen unless --train-vit"
    )
    default_system: ClassVar[str] = "You are a helpful assistant."

    # -- reading a folder ------------------------------------------------------------------------------------
    def config(self, folder: Path):
        from ..model.config import QwenVLConfig

        return QwenVLConfig.from_folder(folder)

    def generation_config(self, folder: Path) -> dict[str, Any]:
        from ..model.checkpoint import read_generation_config

        return read_generation_config(folder)

    def default_generation_config(self, tokenizer, chat: bool = True) -> dict[str, Any]:
        from ..model.checkpoint import default_generation_config

        return default_generation_config(tokenizer, chat=chat)

    def is_base_model(self, folder: Path) -> bool:
        return self.generation_config(folder).get("chat_format") == "raw"

    def declared_precision(self, config) -> str:
        return config.precision

    def checkpoint_quantisation(self, config) -> str | None:
        if not config.quantization_config:
            return None
        return config.quantization_config.get("quant_method", "4-bit")

    def fingerprint(self, folder: Path) -> str:
        from ..model.checkpoint import model_fingerprint

        return model_fingerprint(folder)

    # -- loading ---------------------------------------------------------------------------------------------
    def tokenizer(self, folder: Path):
        from ..model.tokenizer import QwenVLTokenizer

        return QwenVLTokenizer.from_pretrained(folder)

    def load(self, folder: Path, dtype: str, device: str, quant: str | None = None, random_weights: bool = False):
        model, tokenizer = self._load(folder, dtype, device, quant, random_weights)
        # What transformers sets from from_pretrained's argument: PEFT records it in adapter_config.json as
        # base_model_name_or_path, where AutoPeftModelForCausalLM finds the base again.
        model.name_or_path = model.config._name_or_path = str(Path(folder).resolve())
        return model, tokenizer

    def _load(self, folder: Path, dtype: str, device: str, quant: str | None, random_weights: bool):
        import torch

        torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        if random_weights:
            from ..model.presets import build_random

            return build_random(folder, torch_dtype, device, quant)
        if quant == "gptq":
            from ..model.quant import load_gptq

            return load_gptq(folder, dtype=torch_dtype, device=device)
        if quant == "nf4":  # the Trainer leaves a 4-bit model where it is: it is put on the device here
            from ..model.quant import load_nf4

            return load_nf4(folder, compute_dtype=torch_dtype, device=device)
        from ..model.checkpoint import load_checkpoint

        return load_checkpoint(folder, dtype=torch_dtype, device=device)

    def empty_model(self, config):
        import torch

        from ..model.modeling import QwenVLForCausalLM

        with torch.device("meta"):
            return QwenVLForCausalLM(config)

    # -- text and pictures -----------------------------------------------------------------------------------
    def template(self, tokenizer, system: str | None = None, image_root: Path | None = None):
        from ..model.template import ChatTemplate

        return ChatTemplate(tokenizer, self.default_system if system is None else system)

    def picture_tokens(self) -> int:
        from ..model.template import IMAGE_TOKENS

        return IMAGE_TOKENS

    def processor(self, tokenizer, config, image_root: Path | None = None, system: str | None = None):
        from ..model.processor import QwenVLProcessor

        return QwenVLProcessor(
            tokenizer, config.image_size, image_root, self.default_system if system is None else system
        )

    def chat_session(self, model, processor, generation: dict[str, Any]):
        from ..model.generation import ChatSession

        return ChatSession(
            model,
            processor,
            chat_format=generation.get("chat_format", "chatml"),
            max_window_size=int(generation.get("max_window_size", 6144)),
        )

    # -- training --------------------------------------------------------------------------------------------
    def training_dataset(
        self, samples: Sequence[Any], config, image_root: Path, max_length: int, rows: list | None = None
    ):
        from ..model.datasets import ConversationDataset, PackedDataset

        if rows is not None:
            return PackedDataset(list(samples), rows, config.image_size, image_root)
        return ConversationDataset(list(samples), config.image_size, image_root)

    def collator(self, tokenizer, pad_to: int | None = None):
        from ..model.processor import PaddingCollator

        return PaddingCollator(tokenizer.eod_id, pad_to=pad_to)

    merger_modules: ClassVar[tuple[str, ...]] = ("attn_pool",)  # the resampler: 256 queries over the ViT

    def prepare_full(self, model, train_vision: bool) -> None:
        model.requires_grad_(True)
        visual = model.transformer.visual
        if not train_vision:
            visual.requires_grad_(False)
            visual.attn_pool.requires_grad_(True)
        visual.attn_pool.pos_embed.requires_grad_(False)  # the fixed sin-cos table

    def block_classes(self) -> tuple[type, ...]:
        from ..model.modeling import QwenBlock
        from ..model.vision import VisionBlock

        return (QwenBlock, VisionBlock)

    def use_upstream_recipe(self, model) -> None:
        model.use_upstream_path()

    # -- writing ---------------------------------------------------------------------------------------------
    def save_model(
        self,
        model,
        folder: Path,
        base: Path,
        generation: dict[str, Any],
        dtype: str | None = None,
        state_dict: dict | None = None,
        max_shard_size: str | int = "2GB",
        force: bool = False,
    ) -> Path:
        from ..model.checkpoint import save_checkpoint
        from ..model.tokenizer import VOCAB_FILE

        return save_checkpoint(
            model,
            folder,
            base / VOCAB_FILE,
            generation,
            max_shard_size=max_shard_size,
            dtype=dtype,
            force=force,
            state_dict=state_dict,
            extra_config=_kept_config(base),
            carry=_carried(base),
        )

    def carried_files(self, base: Path) -> list[Path]:
        return sorted([*_carried(base), *(base / name for name in self.tokenizer_files if (base / name).is_file())])

    def consumers(self, folder: Path) -> dict[str, str | None]:
        config = read_json_object(folder / "config.json")
        auto_map = config.get("auto_map") or {}
        named = sorted({f"{reference.split('.')[0]}.py" for reference in auto_map.values() if "." in reference})
        tokenizer_map = read_json_object(folder / "tokenizer_config.json").get("auto_map") or {}
        tokenizer_files = sorted({f"{ref.split('.')[0]}.py" for ref in _flat(tokenizer_map.values()) if "." in ref})
        lacking = []
        if not auto_map:
            lacking.append("config.json has no auto_map")
        if not (folder / "tokenizer_config.json").is_file():
            lacking.append("tokenizer_config.json")
        lacking += [name for name in [*named, *tokenizer_files] if not (folder / name).is_file()]
        if not named:
            lacking.append("the remote-code files (configuration_qwen.py, modeling_qwen.py, visual.py, …)")
        remote = None if not lacking else "lacks " + ", ".join(dict.fromkeys(lacking))
        architectures = config.get("architectures") or []
        vllm = remote
        if "QWenLMHeadModel" not in architectures:
            vllm = f"config.json's architectures {architectures} do not name QWenLMHeadModel"
        return {
            "qwenvl (chat, eval, serve-ui, merge --verify, load_checkpoint)": None,
            "transformers AutoModelForCausalLM with trust_remote_code=True (the official Qwen-VL code)": remote,
            "vLLM (QWenLMHeadModel, with --trust-remote-code)": vllm,
        }

    # -- presets ---------------------------------------------------------------------------------------------
    def init_model(self, preset: str, output: Path, **options: Any) -> dict[str, Any]:
        from ..model.presets import init_model

        return init_model(preset, output, **options)

    def tiny_vocabulary(self, path: Path) -> Path:
        from ..model.presets import tiny_ranks
        from ..model.tokenizer import write_ranks

        write_ranks(tiny_ranks(), path)
        return path


# Files of a base folder that a written model carries over unchanged: what the official remote code, its
# tokenizer and people need beside the weights. Weights, config.json, generation_config.json and qwen.tiktoken
# are written anew; run records (qwenvl_*.json, loss.png) and hidden files are not the model's.
CARRIED_PATTERNS = ("*.py", "tokenizer_config.json", "special_tokens_map.json", "*.ttf", "*.otf", "*.md", "README*")
CARRIED_PREFIXES = ("license", "licence", "notice")
# config.json fields the written model sets itself (its precision, its quantisation, the writer's version)
OWN_CONFIG_FIELDS = ("dtype", "torch_dtype", "bf16", "fp16", "fp32", "quantization_config", "transformers_version")


def _carried(base: Path) -> list[Path]:
    """The top-level files of `base` to copy beside a written model (see CARRIED_PATTERNS)."""
    if not base.is_dir():
        return []
    found = {path for pattern in CARRIED_PATTERNS for path in base.glob(pattern) if path.is_file()}
    found |= {p for p in base.iterdir() if p.is_file() and p.name.lower().startswith(CARRIED_PREFIXES)}
    return sorted(path for path in found if not path.name.startswith("."))


def _kept_config(base: Path) -> dict[str, Any]:
    """The base config.json's fields that a written model keeps as they are (`auto_map` and anything else the
    native config does not model), without the precision and quantisation fields the writer sets."""
    return {key: value for key, value in read_json_object(base / "config.json").items() if key not in OWN_CONFIG_FIELDS}


def _flat(values) -> list[str]:
    """auto_map values may be a string or a [slow, fast] pair (None for a missing fast tokenizer)."""
    out: list[str] = []
    for value in values:
        out += [v for v in value if isinstance(v, str)] if isinstance(value, list | tuple) else [value]
    return [v for v in out if isinstance(v, str)]
