"""`QwenVLConfig`: the official Qwen-VL `config.json`, read and written field for field.

Official checkpoints carry `auto_map` (pointing at remote code); it is dropped on load and never
written, since nothing in a checkpoint folder is executed here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import PreTrainedConfig
from transformers import __version__ as transformers_version

from ..errors import QwenvlError

# The official Qwen-VL / Qwen-VL-Chat vision tower.
OFFICIAL_VISUAL: dict[str, Any] = {
    "heads": 16,
    "image_size": 448,
    "image_start_id": 151857,
    "layers": 48,
    "mlp_ratio": 4.9231,
    "output_dim": 4096,
    "patch_size": 14,
    "width": 1664,
}
DROPPED_KEYS = ("auto_map",)  # remote-code pointers: never followed, never written


class QwenVLConfig(PreTrainedConfig):
    """Defaults are the official Qwen-VL-7B sizes."""

    model_type = "qwen"

    vocab_size: int = 151936
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    intermediate_size: int = 22016
    kv_channels: int = 128
    emb_dropout_prob: float = 0.0
    attn_dropout_prob: float = 0.0
    layer_norm_epsilon: float = 1e-6
    initializer_range: float = 0.02
    max_position_embeddings: int = 8192
    scale_attn_weights: bool = True
    use_cache: bool = True
    bf16: bool = False
    fp16: bool = False
    fp32: bool = False
    rotary_pct: float = 1.0
    rotary_emb_base: float = 10000
    use_dynamic_ntk: bool = True
    use_logn_attn: bool = True
    use_flash_attn: bool | str = "auto"
    no_bias: bool = True
    seq_length: int = 2048
    tie_word_embeddings: bool = False
    tokenizer_type: str = "QWenTokenizer"
    visual: dict | None = None
    quantization_config: dict | None = None

    def __post_init__(self, **kwargs):
        for key in DROPPED_KEYS:
            kwargs.pop(key, None)
        if self.visual is None:
            self.visual = dict(OFFICIAL_VISUAL)
        super().__post_init__(**kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def image_start_id(self) -> int:
        return int(self.visual["image_start_id"])

    @property
    def image_size(self) -> int:
        return int(self.visual["image_size"])

    @property
    def precision(self) -> str:
        """The dtype the checkpoint declares: bf16, fp16 or fp32 (flags first, then torch_dtype)."""
        if self.bf16:
            return "bf16"
        if self.fp16:
            return "fp16"
        if self.fp32:
            return "fp32"
        declared = str(getattr(self, "dtype", None) or getattr(self, "torch_dtype", None) or "float32")
        return {"torch.bfloat16": "bf16", "bfloat16": "bf16", "torch.float16": "fp16", "float16": "fp16"}.get(
            declared, "fp32"
        )

    def check(self) -> None:
        """Raise QwenvlError for sizes that cannot build a model."""
        problems = []
        if self.hidden_size % self.num_attention_heads:
            problems.append("hidden_size must be a multiple of num_attention_heads")
        if self.kv_channels * self.num_attention_heads != self.hidden_size:
            problems.append("kv_channels × num_attention_heads must equal hidden_size")
        visual = self.visual or {}
        missing = [
            k
            for k in (
                "image_size",
                "patch_size",
                "width",
                "layers",
                "heads",
                "mlp_ratio",
                "output_dim",
                "image_start_id",
            )
            if k not in visual
        ]
        if missing:
            problems.append(f"visual lacks {', '.join(missing)}")
        elif visual["output_dim"] != self.hidden_size or visual["output_dim"] % 128:
            problems.append("visual.output_dim must equal hidden_size and be a multiple of 128")
        if problems:
            raise QwenvlError(
                "this config.json cannot build a Qwen-VL model: " + "; ".join(problems),
                "Use the config.json that came with the checkpoint",
            )

    @classmethod
    def from_folder(cls, folder: str | Path) -> QwenVLConfig:
        """Read `folder/config.json`, with a clear error when it is missing or not a Qwen-VL config."""
        path = Path(folder) / "config.json"
        if not Path(folder).is_dir():
            raise QwenvlError(f"model folder {folder} does not exist", "Pass the folder of a Qwen-VL checkpoint")
        if not path.is_file():
            raise QwenvlError(f"{folder} has no config.json", "Pass a Qwen-VL checkpoint folder")
        try:
            data = json.loads(path.read_text("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise QwenvlError(f"{path} is not valid JSON ({exc})", "Restore the checkpoint's config.json") from None
        if data.get("model_type") != "qwen" or "visual" not in data:
            raise QwenvlError(
                f"{path} is not a Qwen-VL config (model_type {data.get('model_type')!r})",
                "qwenvl works with Qwen-VL, Qwen-VL-Chat and Qwen-VL-Chat-Int4 checkpoints",
            )
        data.pop("model_type", None)
        config = cls(**data)
        config.check()
        return config

    def to_official_dict(self) -> dict[str, Any]:
        """The fields of the official config.json, nothing else (no auto_map, no generic HF fields)."""
        data: dict[str, Any] = {"architectures": ["QWenLMHeadModel"], "model_type": "qwen"}
        for name in self.__class__.__annotations__:
            value = getattr(self, name, None)
            if name == "quantization_config" and not value:
                continue
            data[name] = value
        data["torch_dtype"] = {"bf16": "bfloat16", "fp16": "float16"}.get(self.precision, "float32")
        data["transformers_version"] = transformers_version
        return dict(sorted(data.items()))
