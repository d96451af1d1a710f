"""The model-family seam: everything a command needs that differs between Qwen-VL generations.

Services (train, merge, chat, eval, profile, serve-ui, the data checks) ask a `ModelFamily` — found with
`family_for(folder)` from the folder's config.json — instead of reaching into one generation's modules.
A family owns: loading (model, tokenizer, processor, generation settings), its chat template and picture
markup, picture-token accounting, the method rules that are the model's (LoRA targets, what a base model's
LoRA also trains, what full fine-tuning freezes, which blocks compile/shard), how a finished model is
written, and its built-in presets.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from ..errors import QwenvlError


class ModelFamily(ABC):
    """One generation of Qwen vision-language models; a subclass implements every abstract method."""

    name: ClassVar[str]  # the family's id on the command line, e.g. "qwen-vl"
    title: ClassVar[str]  # for people, e.g. "Qwen-VL"
    model_types: ClassVar[tuple[str, ...]]  # config.json `model_type` values this family loads
    presets: ClassVar[dict[str, str]]  # init-model preset → one line of what it is
    base_presets: ClassVar[tuple[str, ...]] = ()  # the presets that are base (non-chat) models
    # `qwenvl profile --preset P`: P → (the chat model's preset, the base model's preset or None: none exists)
    profile_presets: ClassVar[dict[str, tuple[str, str | None]]] = {}
    # presets too large to write: profile builds their random weights on the GPU in each cell
    device_presets: ClassVar[tuple[str, ...]] = ()
    lora_targets: ClassVar[tuple[str, ...]]  # default LoRA target modules of the language model
    base_modules_to_save: ClassVar[tuple[str, ...]] = ()  # what LoRA on a base model trains in full
    tokenizer_files: ClassVar[tuple[str, ...]]  # files a run folder carries so that it loads alone
    full_summary: ClassVar[str] = ""  # what full fine-tuning trains, for the method table

    # -- reading a folder ------------------------------------------------------------------------------------
    @abstractmethod
    def config(self, folder: Path) -> Any: ...

    @abstractmethod
    def generation_config(self, folder: Path) -> dict[str, Any]: ...

    @abstractmethod
    def default_generation_config(self, tokenizer: Any, chat: bool = True) -> dict[str, Any]:
        """The family's generation settings for a folder that ships none."""
        ...

    @abstractmethod
    def declared_precision(self, config: Any) -> str:
        """The precision ("bf16", "fp16", "fp32") the checkpoint's config declares."""
        ...

    @abstractmethod
    def is_base_model(self, folder: Path) -> bool:
        """A base (pre-trained, not chat) model: no chat template, LoRA also trains `base_modules_to_save`."""
        ...

    @abstractmethod
    def checkpoint_quantisation(self, config: Any) -> str | None:
        """The quantisation a checkpoint was saved with (its `quant_method`, e.g. "gptq"), or None."""
        ...

    @abstractmethod
    def fingerprint(self, folder: Path) -> str: ...

    # -- loading ---------------------------------------------------------------------------------------------
    @abstractmethod
    def tokenizer(self, folder: Path) -> Any: ...

    @abstractmethod
    def load(
        self, folder: Path, dtype: str, device: str, quant: str | None = None, random_weights: bool = False
    ) -> tuple[Any, Any]:
        """(model in eval mode, tokenizer); `quant` "gptq" | "nf4" loads a 4-bit language model."""
        ...

    @abstractmethod
    def empty_model(self, config: Any) -> Any:
        """The model's skeleton on the meta device (for --dry-run): nothing allocated."""
        ...

    # -- text and pictures -----------------------------------------------------------------------------------
    default_system: ClassVar[str] = ""

    @abstractmethod
    def template(self, tokenizer: Any, system: str | None = None, image_root: Path | None = None) -> Any:
        """Conversation turns → `EncodedConversation` (ids, labels, picture starts and paths). Families whose
        picture spans depend on the picture's size open the pictures (relative paths under `image_root`) and
        give each encoded conversation `image_lengths`, the tokens of each picture, markers included."""
        ...

    def picture_pixels(
        self, folder: Path, min_pixels: int | None, max_pixels: int | None, max_length: int
    ) -> tuple[int, int] | None:
        """`qwenvl train --min-pixels/--max-pixels`: the run's (min, max) pixels of a picture, validated and
        rounded, or None for the folder's own. Families that resize every picture to one size refuse them; those
        that take them accept `pixels=` (and `max_length=`) in `template` and `training_dataset`."""
        if min_pixels is None and max_pixels is None:
            return None
        raise QwenvlError(
            f"{self.title} resizes every picture to one fixed size, so --min-pixels/--max-pixels have nothing to "
            "bound (they set the picture sizes of Qwen2-VL, Qwen2.5-VL and Qwen3-VL)",
            "Drop --min-pixels and --max-pixels",
        )

    def record_pixels(self, folder: Path, pixels: tuple[int, int]) -> None:
        """Write a run's picture bounds into the processor files of a trained folder. A family whose
        `picture_pixels` refuses bounds never has any to write: nothing to do here."""
        return None

    @abstractmethod
    def picture_tokens(self) -> int:
        """Tokens one picture takes in a sequence, markers included (families with variable spans: their
        encoded conversations' `image_lengths` count instead)."""
        ...

    @abstractmethod
    def processor(self, tokenizer: Any, config: Any, image_root: Path | None = None, system: str | None = None):
        """Conversations and pictures → model tensors, for asking (chat, eval, merge --verify)."""
        ...

    @abstractmethod
    def chat_session(self, model: Any, processor: Any, generation: dict[str, Any]) -> Any:
        """A multi-turn session with KV-cache decoding over `model`."""
        ...

    # -- training --------------------------------------------------------------------------------------------
    @abstractmethod
    def training_dataset(
        self, samples: Sequence[Any], config: Any, image_root: Path, max_length: int, rows: list | None = None
    ) -> Any:
        """A torch Dataset of encoded samples (packed into `rows` when given)."""
        ...

    @abstractmethod
    def collator(self, tokenizer: Any, pad_to: int | None = None) -> Any: ...

    def training_inputs(self, model: Any, inputs: dict, packed: bool = False) -> dict:
        """A collated batch → the model's keyword arguments (the Trainer calls it before each forward pass;
        `packed`: the run trains with --packing); families whose model takes the batch as it is return it
        unchanged."""
        return inputs

    # where --vision-lr and --merger-lr apply: a parameter name containing `vision_module` is the vision
    # tower's, and the merger's (the vision→LM projection) when it also contains one of `merger_modules`
    vision_module: ClassVar[str] = ".visual."
    merger_modules: ClassVar[tuple[str, ...]] = ()

    def parameter_part(self, name: str) -> str:
        """ "vision", "merger" or "language" (everything else) for a parameter name (PEFT-wrapped names too)."""
        dotted = f".{name}."
        if self.vision_module not in dotted:
            return "language"
        return "merger" if any(f".{module}." in dotted for module in self.merger_modules) else "vision"

    @abstractmethod
    def prepare_full(self, model: Any, train_vision: bool) -> None:
        """Set requires_grad for full fine-tuning."""
        ...

    @abstractmethod
    def block_classes(self) -> tuple[type, ...]:
        """The repeated blocks (language and vision) that --compile compiles and FSDP shards one by one."""
        ...

    @abstractmethod
    def use_upstream_recipe(self, model: Any) -> None:
        """--recipe upstream: the upstream finetune.py's computation, for comparisons."""
        ...

    # -- writing ---------------------------------------------------------------------------------------------
    @abstractmethod
    def save_model(
        self,
        model: Any,
        folder: Path,
        base: Path,
        generation: dict[str, Any],
        dtype: str | None = None,
        state_dict: dict | None = None,
        max_shard_size: str | int = "2GB",
        force: bool = False,
    ) -> Path:
        """Write a standalone model in the family's own layout, atomically, with the files of `base` that its
        consumers need and the model does not change (remote code, tokenizer config, licence, …)."""
        ...

    @abstractmethod
    def carried_files(self, base: Path) -> list[Path]:
        """The files of `base` that `save_model` copies beside the weights unchanged (tokenizer files included)."""
        ...

    @abstractmethod
    def consumers(self, folder: Path) -> dict[str, str | None]:
        """The programs users load a written model with → None where `folder` serves it, else what it lacks."""
        ...

    def copy_tokenizer(self, base: Path, folder: Path) -> None:
        """Put the base model's tokenizer files into `folder` (a run folder, an adapter)."""
        import shutil

        for name in self.tokenizer_files:
            if (base / name).is_file():
                shutil.copyfile(base / name, folder / name)

    # -- presets ---------------------------------------------------------------------------------------------
    @abstractmethod
    def init_model(self, preset: str, output: Path, **options: Any) -> dict[str, Any]: ...

    @abstractmethod
    def tiny_vocabulary(self, path: Path) -> Path | None:
        """Write the built-in tiny vocabulary to `path` for profile's 7B preset without --vocab; None where the
        family's presets write their own vocabulary and `init_model` takes none."""
        ...


def picture_spans(encoded: Any, picture_tokens: int) -> list[int]:
    """The tokens each picture of `encoded` takes: its own `image_lengths` where the family's pictures vary in
    size (Qwen2-VL and later), else the family's fixed `picture_tokens`."""
    lengths = getattr(encoded, "image_lengths", None)
    return list(lengths) if lengths else [picture_tokens] * len(encoded.image_starts)


def read_json_object(path: Path) -> dict[str, Any]:
    """A folder's JSON file as a dict; {} when it is missing, unreadable or not an object (optional files)."""
    import json

    try:
        data = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
