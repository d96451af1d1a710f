"""Loading a checkpoint (and a LoRA adapter on it) for answering questions: `qwenvl eval`, `qwenvl chat`,
`qwenvl serve-ui`. The model runs on the GPU when there is one (bf16 where supported, else fp16), else on
the CPU in fp32, in eval mode."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

from .errors import QwenvlError
from .families import ModelFamily, family_for

ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


@dataclass
class LoadedModel:
    model: object  # the family's model, or a peft PeftModel around one
    tokenizer: object  # the family's tokenizer
    generation: dict  # generation_config.json (chat_format, max_window_size, …)
    device: str
    dtype: str
    family: ModelFamily

    @property
    def config(self):
        inner = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return inner.config

    @property
    def chat_format(self) -> str:
        return self.generation.get("chat_format", "chatml")

    @property
    def max_window_size(self) -> int:
        return int(self.generation.get("max_window_size", 6144))


def check_adapter(adapter_dir: Path, leave_out: str = "leave out --adapter to use the model alone") -> None:
    """Refuse a folder that is not a saved adapter (peft would otherwise look for it on the hub)."""
    missing = [] if (adapter_dir / "adapter_config.json").is_file() else ["adapter_config.json"]
    if not any((adapter_dir / name).is_file() for name in ADAPTER_WEIGHTS):
        missing.append(" or ".join(ADAPTER_WEIGHTS))
    if missing:
        what = "does not exist" if not adapter_dir.exists() else f"has no {' and no '.join(missing)}"
        raise QwenvlError(
            f"--adapter {adapter_dir} {what}, so it is not a LoRA adapter folder",
            "Pass the folder a LoRA or Q-LoRA training run saved (it holds adapter_config.json and "
            f"adapter_model.safetensors), or {leave_out}",
        )


def attach_adapter(model, adapter: Path, model_dir: Path):
    """`model` with the LoRA adapter saved in `adapter` applied (a peft PeftModel), or a QwenvlError."""
    from . import quiet_import

    with contextlib.suppress(ImportError):
        quiet_import("gptqmodel")  # peft imports it when present, and its banner would corrupt JSON output
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, str(adapter))
    except Exception as exc:  # peft and safetensors raise their own error types
        raise QwenvlError(
            f"the adapter in {adapter} cannot be applied to the model in {model_dir} "
            f"({type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]})",
            "Pass the base model the adapter was trained on, and check that the adapter's files are complete",
        ) from None


def load_for_inference(model_dir: str | Path, adapter_dir: str | Path | None = None) -> LoadedModel:
    """The checkpoint in `model_dir` (with the adapter in `adapter_dir` applied), ready to answer."""
    import torch

    model_dir = Path(model_dir)
    family = family_for(model_dir)
    adapter = Path(adapter_dir) if adapter_dir is not None else None
    if adapter is not None:
        check_adapter(adapter)
    if torch.cuda.is_available():
        device, dtype = "cuda", "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    else:
        device, dtype = "cpu", "fp32"
    model, tokenizer = family.load(model_dir, dtype, device)
    if adapter is not None:
        model = attach_adapter(model, adapter, model_dir)
    model.eval()
    return LoadedModel(model, tokenizer, family.generation_config(model_dir), device, dtype, family)
