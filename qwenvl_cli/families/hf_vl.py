"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL through transformers' own classes: one `HFVisionFamily` parameterised by a
`Generation` (docs/families.md holds every convention used here, with its source).

- Loading: `AutoConfig`, `AutoModelForImageTextToText`, and the family's processor as an image-only subclass
  (the official processors cannot be built without torchvision, docs/families.md §7.1).
- Template: ChatML (a default system prompt for Qwen2/2.5-VL, none for Qwen3-VL); each `<img>PATH</img>` becomes
  `<|vision_start|>` + N × `<|image_pad|>` + `<|vision_end|>`, N from the picture's size through transformers'
  `smart_resize` and the folder's min/max pixels; labels on the assistant's content, `<|im_end|>` and `\\n`.
- Boxes (`<ref>…</ref><box>(x1,y1),(x2,y2)</box>`, relative [0,1000)) are written in the family's convention
  (`qwenvl_cli.grounding`): Qwen2-VL's special tokens, Qwen2.5-VL's JSON in absolute pixels of the resized
  picture, Qwen3-VL's JSON in relative numbers.
- Training: LM + merger in full fine-tuning (the vision tower with --train-vit), LoRA on the LM's Linears only.
- Asking (chat, eval, serve-ui, merge --verify): `processor` and `chat_session` in `hf_vl_chat.py`.
- Not yet: Q-LoRA, --packing, --recipe upstream.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ..errors import QwenvlError
from .base import ModelFamily, read_json_object

IGNORE_INDEX = -100
# The files of a folder that make its processor (tokenizer, chat template, image processor settings)
PROCESSOR_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
)
CARRIED_EXTRA = ("README.md", "LICENSE", "LICENSE.txt", "NOTICE")
LM_LORA_REGEX = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


@dataclass(frozen=True)
class Generation:
    """What differs between the three generations (docs/families.md §1–§6)."""

    name: str  # family id, e.g. "qwen2.5-vl"
    title: str
    model_type: str
    model_class: str  # the architectures name in config.json
    processor_class: str  # the official processor class (transformers)
    modeling: str  # transformers.models.<modeling> holds the block classes
    decoder_layer: str
    vision_block: str
    default_system: str
    box_style: str  # "tokens" (Qwen2-VL) | "absolute" (Qwen2.5-VL) | "relative" (Qwen3-VL)
    patch_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    preset: str  # the tiny init-model preset


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
GENERATIONS = {
    "qwen2_vl": Generation(
        "qwen2-vl",
        "Qwen2-VL",
        "qwen2_vl",
        "Qwen2VLForConditionalGeneration",
        "Qwen2VLProcessor",
        "qwen2_vl.modeling_qwen2_vl",
        "Qwen2VLDecoderLayer",
        "Qwen2VLVisionBlock",
        "You are a helpful assistant.",
        "tokens",
        14,
        CLIP_MEAN,
        CLIP_STD,
        "tiny-qwen2-vl",
    ),
    "qwen2_5_vl": Generation(
        "qwen2.5-vl",
        "Qwen2.5-VL",
        "qwen2_5_vl",
        "Qwen2_5_VLForConditionalGeneration",
        "Qwen2_5_VLProcessor",
        "qwen2_5_vl.modeling_qwen2_5_vl",
        "Qwen2_5_VLDecoderLayer",
        "Qwen2_5_VLVisionBlock",
        "You are a helpful assistant.",
        "absolute",
        14,
        CLIP_MEAN,
        CLIP_STD,
        "tiny-qwen2.5-vl",
    ),
    "qwen3_vl": Generation(
        "qwen3-vl",
        "Qwen3-VL",
        "qwen3_vl",
        "Qwen3VLForConditionalGeneration",
        "Qwen3VLProcessor",
        "qwen3_vl.modeling_qwen3_vl",
        "Qwen3VLTextDecoderLayer",
        "Qwen3VLVisionBlock",
        "",
        "relative",
        16,
        (0.5, 0.5, 0.5),
        (0.5, 0.5, 0.5),
        "tiny-qwen3-vl",
    ),
}


# -- the processor without video (no torchvision here) ---------------------------------------------------------
@functools.cache
def image_only_processor_class(official: str) -> type:
    """A subclass of transformers' `official` processor whose sub-processors are the image processor and the
    tokenizer only: ProcessorMixin reads them from `__init__`'s signature, and the video processor needs
    torchvision. Every other method (token expansion, chat template, mm_token_type_ids) is the official one."""
    import transformers

    base = getattr(transformers, official)

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.vision_start_token = "<|vision_start|>"
        self.vision_end_token = "<|vision_end|>"
        for attribute in ("image_token", "video_token", "vision_start_token", "vision_end_token"):
            setattr(self, f"{attribute}_id", tokenizer.convert_tokens_to_ids(getattr(self, attribute)))
        transformers.ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    return type(f"ImageOnly{official}", (base,), {"__init__": __init__, "__module__": __name__})


@functools.lru_cache(maxsize=16)
def _image_processor_cached(folder: str, stamp: float):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil.from_pretrained(folder)


def image_processor(folder: str | Path):
    """The folder's image processor (the PIL backend: no torchvision), cached per folder and file version."""
    found = [Path(folder) / name for name in ("preprocessor_config.json", "processor_config.json")]
    found = [path for path in found if path.is_file()]
    if not found:
        raise QwenvlError(
            f"{folder} has no preprocessor_config.json (or processor_config.json), so the size of its pictures "
            "in tokens is unknown",
            "Copy preprocessor_config.json from the model's original files",
        )
    return _image_processor_cached(str(Path(folder).resolve()), max(path.stat().st_mtime for path in found))


def pixel_budget(processor) -> tuple[int, int, int, int]:
    """(patch, merge, min_pixels, max_pixels) of an image processor."""
    size = processor.size
    get = size.get if isinstance(size, dict) else lambda key: getattr(size, key)
    return int(processor.patch_size), int(processor.merge_size), int(get("shortest_edge")), int(get("longest_edge"))


# -- the template ----------------------------------------------------------------------------------------------
@dataclass
class EncodedPictures:
    """One conversation encoded: as v1's EncodedConversation, plus each picture's span (markers included)."""

    input_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    image_paths: list[str] = field(default_factory=list)
    image_starts: list[int] = field(default_factory=list)  # index of each <|vision_start|>
    first_target: int | None = None
    image_lengths: list[int] = field(default_factory=list)  # tokens of each picture, markers included

    def __len__(self) -> int:
        return len(self.input_ids)


class VisionTemplate:
    """ChatML with pictures expanded to their token count and boxes in the family's convention."""

    def __init__(self, generation: Generation, tokenizer, system: str, folder: Path, image_root: Path | None):
        self.generation = generation
        self.tokenizer = tokenizer
        self.system = system
        self.image_root = image_root
        self.patch, self.merge, self.min_pixels, self.max_pixels = pixel_budget(image_processor(folder))
        ids = tokenizer.convert_tokens_to_ids
        self.im_start, self.im_end = ids("<|im_start|>"), ids("<|im_end|>")
        self.vision_start, self.vision_end, self.image_pad = (
            ids("<|vision_start|>"),
            ids("<|vision_end|>"),
            ids("<|image_pad|>"),
        )
        self._nl = self._text("\n")
        self.heads = {role: [self.im_start, *self._text(role), *self._nl] for role in ("system", "user", "assistant")}
        self._tail = [self.im_end, *self._nl]
        self._sizes: dict[str, tuple[int, int]] = {}  # path → (resized H′, W′)

    def _text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False) if text else []

    def resized(self, path: str) -> tuple[int, int]:
        """(H′, W′) of a picture after the processor's smart_resize (the picture is opened once per path)."""
        if path not in self._sizes:
            from ..grounding import smart_resize
            from ..images import load_image

            width, height = load_image(path, self.image_root).size
            self._sizes[path] = smart_resize(height, width, self.patch * self.merge, self.min_pixels, self.max_pixels)
        return self._sizes[path]

    def picture_tokens(self, path: str) -> int:
        """`<|image_pad|>` tokens of one picture (the markers not included)."""
        height, width = self.resized(path)
        return (height // self.patch) * (width // self.patch) // self.merge**2

    def _box_text(self, raw: str, label: str | None, picture: str | None) -> str:
        from ..grounding import clamp_relative, json_box, relative_to_absolute, special_token_box
        from ..markup import parse_box_text

        parsed = parse_box_text(raw)
        if parsed.points is None or len(parsed.points) != 2:
            raise QwenvlError(f"box {raw!r} cannot be read: {parsed.message}", "Fix it (qwenvl validate-data)")
        (x1, y1), (x2, y2) = parsed.points
        style = self.generation.box_style
        if style == "tokens":
            return special_token_box(clamp_relative((x1, y1, x2, y2)), label)
        if style == "relative":
            return json_box(clamp_relative((x1, y1, x2, y2)), label)
        if picture is None:
            raise QwenvlError(
                f"a box ({raw}) comes before any picture, and {self.generation.title} writes boxes in pixels of "
                "the picture they refer to",
                "Put the picture (Picture 1: <img>…</img>) before the boxes that refer to it",
            )
        height, width = self.resized(picture)
        return json_box(relative_to_absolute((x1, y1, x2, y2), width, height), label)

    def encode_content(self, text: str, out: EncodedPictures, picture: str | None) -> tuple[list[int], str | None]:
        """Token ids of one message; records pictures in `out`. Returns the ids and the latest picture."""
        from ..markup import MarkupError, scan_markup

        scan = scan_markup(text)
        if scan.problems:
            raise MarkupError(scan.problems)
        ids: list[int] = []
        pending: list[str] = []
        base = len(out.input_ids)
        spans = scan.spans
        for index, span in enumerate(spans):
            if span.kind == "text":
                pending.append(span.content)
            elif span.kind == "ref":
                following = spans[index + 1] if index + 1 < len(spans) else None
                if following is None or following.kind != "box":  # a phrase without a box stays plain text
                    pending.append(span.content)
            elif span.kind == "box":
                previous = spans[index - 1] if index > 0 else None
                label = previous.content if previous is not None and previous.kind == "ref" else None
                pending.append(self._box_text(span.content, label, picture))
            elif span.kind == "quad":
                raise QwenvlError(
                    f"{self.generation.title} training does not take <quad> markup yet",
                    "Drop the quads from the data, or train a Qwen-VL (v1) model",
                )
            else:  # a picture
                pending.append(span.label)
                ids.extend(self._text("".join(pending)))
                pending.clear()
                count = self.picture_tokens(span.content)
                out.image_starts.append(base + len(ids))
                out.image_paths.append(span.content)
                out.image_lengths.append(count + 2)
                ids.append(self.vision_start)
                ids.extend([self.image_pad] * count)
                ids.append(self.vision_end)
                picture = span.content
        ids.extend(self._text("".join(pending)))
        return ids, picture

    def encode(self, turns: Sequence[tuple[str, str]]) -> EncodedPictures:
        out = EncodedPictures()
        if self.system:
            out.input_ids = [*self.heads["system"], *self._text(self.system), *self._tail]
            out.labels = [IGNORE_INDEX] * len(out.input_ids)
        picture = None
        for role, value in turns:
            head = self.heads[role]
            out.input_ids.extend(head)
            content, picture = self.encode_content(value, out, picture)
            out.input_ids.extend(content)
            out.input_ids.extend(self._tail)
            if role == "assistant":
                if out.first_target is None and content:
                    out.first_target = len(out.labels) + len(head)
                out.labels.extend([IGNORE_INDEX] * len(head))
                out.labels.extend(content)
                out.labels.extend(self._tail)
            else:
                out.labels.extend([IGNORE_INDEX] * (len(head) + len(content) + len(self._tail)))
        return out


# -- datasets and collation ------------------------------------------------------------------------------------
class PictureDataset:
    """Encoded conversations → input_ids, labels, mm_token_type_ids, and the pictures' flattened patches and
    grids (read and preprocessed when an item is fetched)."""

    def __init__(self, samples: list, folder: Path, image_root: Path | None, image_pad: int):
        self.samples = samples
        self.folder = folder
        self.image_root = image_root
        self.image_pad = image_pad

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        import torch

        from ..images import load_image

        encoded = self.samples[index]
        ids = torch.tensor(encoded.input_ids, dtype=torch.long)
        item = {
            "input_ids": ids,
            "labels": torch.tensor(encoded.labels, dtype=torch.long),
            "mm_token_type_ids": (ids == self.image_pad).long(),
            "pixel_values": None,
            "image_grid_thw": None,
        }
        if encoded.image_paths:
            processor = image_processor(self.folder)
            pictures = [load_image(path, self.image_root).convert("RGB") for path in encoded.image_paths]
            features = processor(images=pictures, return_tensors="pt")
            grid = features["image_grid_thw"]
            expected = [length - 2 for length in encoded.image_lengths]
            merge = pixel_budget(processor)[1]
            if [int(g.prod()) // merge**2 for g in grid] != expected:
                raise QwenvlError(
                    f"the pictures of sample {index} give {grid.tolist()} patches, not the {expected} tokens the "
                    "template counted",
                    "Report this: the template's smart_resize and the image processor disagree",
                )
            item["pixel_values"] = features["pixel_values"]
            item["image_grid_thw"] = grid
        return item


class PictureCollator:
    """Right padding to the batch's longest row rounded up to a multiple of 8 (or `pad_to`); the pictures'
    patches and grids concatenated in row order."""

    def __init__(self, pad_id: int, multiple: int = 8, pad_to: int | None = None):
        self.pad_id = pad_id
        self.multiple = multiple
        self.pad_to = pad_to

    def __call__(self, items: list[dict]) -> dict:
        import torch

        longest = max(len(item["input_ids"]) for item in items)
        width = -(-longest // self.multiple) * self.multiple
        if self.pad_to is not None:
            width = max(width, self.pad_to)
        rows = len(items)
        batch = {
            "input_ids": torch.full((rows, width), self.pad_id, dtype=torch.long),
            "labels": torch.full((rows, width), IGNORE_INDEX, dtype=torch.long),
            "attention_mask": torch.zeros((rows, width), dtype=torch.long),
            "mm_token_type_ids": torch.zeros((rows, width), dtype=torch.long),
        }
        pixels, grids = [], []
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            batch["input_ids"][row, :n] = item["input_ids"]
            batch["labels"][row, :n] = item["labels"]
            batch["attention_mask"][row, :n] = 1
            batch["mm_token_type_ids"][row, :n] = item["mm_token_type_ids"]
            if item.get("pixel_values") is not None:
                pixels.append(item["pixel_values"])
                grids.append(item["image_grid_thw"])
        if pixels:
            batch["pixel_values"] = torch.cat(pixels)
            batch["image_grid_thw"] = torch.cat(grids)
        return batch


# -- the family ------------------------------------------------------------------------------------------------
def _folder_of(thing: Any) -> Path:
    """The checkpoint folder a tokenizer or config was loaded from."""
    name = getattr(thing, "name_or_path", None) or getattr(thing, "_name_or_path", None)
    if not name or not Path(name).is_dir():
        raise QwenvlError(
            "the tokenizer/config was not loaded from a checkpoint folder, so its picture settings are unknown",
            "Load it with the family's tokenizer(folder)/config(folder)",
        )
    return Path(name)


class HFVisionFamily(ModelFamily):
    """One of Qwen2-VL, Qwen2.5-VL, Qwen3-VL (a subclass sets `generation`)."""

    generation: ClassVar[Generation]
    lora_targets: ClassVar[tuple[str, ...]] = (LM_LORA_REGEX,)
    base_modules_to_save: ClassVar[tuple[str, ...]] = ()
    tokenizer_files: ClassVar[tuple[str, ...]] = PROCESSOR_FILES
    full_summary: ClassVar[str] = (
        "all LM weights, lm_head and the vision merger; the vision tower stays frozen unless --train-vit"
    )

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        gen = cls.generation
        cls.name, cls.title, cls.model_types = gen.name, gen.title, (gen.model_type,)
        cls.default_system = gen.default_system
        cls.presets = {gen.preset: f"tiny random {gen.title} (transformers' own classes) for tests and demos"}

    # -- reading a folder ------------------------------------------------------------------------------------
    def config(self, folder: Path):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(folder))

    def generation_config(self, folder: Path) -> dict[str, Any]:
        found = read_json_object(Path(folder) / "generation_config.json")
        if found:
            return found
        return self.default_generation_config(self.tokenizer(folder))

    def default_generation_config(self, tokenizer, chat: bool = True) -> dict[str, Any]:
        ids = tokenizer.convert_tokens_to_ids
        end_of_text = ids("<|endoftext|>")
        return {
            "bos_token_id": end_of_text,
            "eos_token_id": [ids("<|im_end|>"), end_of_text],
            "pad_token_id": end_of_text,
            "do_sample": False,
        }

    def declared_precision(self, config) -> str:
        dtype = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32")
        return {"bfloat16": "bf16", "float16": "fp16"}.get(dtype.replace("torch.", ""), "fp32")

    def is_base_model(self, folder: Path) -> bool:
        folder = Path(folder)
        has_template = (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file()
        return not has_template and "chat_template" not in read_json_object(folder / "tokenizer_config.json")

    def checkpoint_quantisation(self, config) -> str | None:
        quantisation = getattr(config, "quantization_config", None)
        if not quantisation:
            return None
        if not isinstance(quantisation, dict):
            quantisation = quantisation.to_dict()
        return quantisation.get("quant_method", "4-bit")

    def fingerprint(self, folder: Path) -> str:
        """sha256 over config.json, the processor files and the names and sizes of the weight files."""
        folder = Path(folder)
        digest = hashlib.sha256()
        for name in ("config.json", *PROCESSOR_FILES):
            if (folder / name).is_file():
                digest.update(name.encode() + (folder / name).read_bytes())
        for path in sorted(folder.glob("*.safetensors")):
            digest.update(f"{path.name}:{path.stat().st_size}".encode())
        return digest.hexdigest()

    # -- loading ---------------------------------------------------------------------------------------------
    def load_processor(self, folder: Path):
        """The folder's processor: the official class's image-only subclass (no torchvision needed)."""
        return image_only_processor_class(self.generation.processor_class).from_pretrained(str(folder))

    def tokenizer(self, folder: Path):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder))

    def load(self, folder: Path, dtype: str, device: str, quant: str | None = None, random_weights: bool = False):
        import torch
        from transformers import AutoModelForImageTextToText

        if quant is not None:
            raise QwenvlError(
                f"qwenvl does not train {self.title} 4-bit ({quant}) yet: Q-LoRA is built for Qwen-VL (v1) only",
                "Use --method lora (16-bit base weights) or --method full",
            )
        torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        folder = Path(folder)
        if random_weights:
            model = AutoModelForImageTextToText.from_config(self.config(folder), dtype=torch_dtype)
        else:
            model = AutoModelForImageTextToText.from_pretrained(str(folder), dtype=torch_dtype)
        model.to(device)
        model.eval()
        model.name_or_path = model.config._name_or_path = str(folder.resolve())
        return model, self.tokenizer(folder)

    def empty_model(self, config):
        import torch
        from transformers import AutoModelForImageTextToText

        with torch.device("meta"):
            return AutoModelForImageTextToText.from_config(config)

    # -- text and pictures -----------------------------------------------------------------------------------
    def template(self, tokenizer, system: str | None = None, image_root: Path | None = None):
        return VisionTemplate(
            self.generation,
            tokenizer,
            self.default_system if system is None else system,
            _folder_of(tokenizer),
            image_root,
        )

    def picture_tokens(self) -> int:
        """The most tokens a picture can take is the processor's max_pixels; this seam's fixed count is unused
        here: each `EncodedPictures` carries its pictures' own spans (`image_lengths`)."""
        return 0

    def processor(self, tokenizer, config, image_root: Path | None = None, system: str | None = None):
        from .hf_vl_chat import VisionProcessor

        template = self.template(tokenizer, system, image_root)
        return VisionProcessor(template, tokenizer, config, image_processor(_folder_of(tokenizer)), image_root)

    def chat_session(self, model, processor, generation: dict[str, Any]):
        from .hf_vl_chat import VisionChatSession

        return VisionChatSession(model, processor, dict(generation or {}))

    # -- training --------------------------------------------------------------------------------------------
    def training_dataset(
        self, samples: Sequence[Any], config, image_root: Path, max_length: int, rows: list | None = None
    ):
        if rows is not None:
            raise QwenvlError(
                f"--packing is not built for {self.title} yet (M-RoPE positions per packed sample)",
                "Drop --packing",
            )
        folder = _folder_of(config)
        pad = read_json_object(folder / "config.json").get("image_token_id")
        if pad is None:
            pad = getattr(config, "image_token_id", None)
        return PictureDataset(list(samples), folder, image_root, int(pad))

    def collator(self, tokenizer, pad_to: int | None = None):
        return PictureCollator(tokenizer.convert_tokens_to_ids("<|endoftext|>"), pad_to=pad_to)

    def prepare_full(self, model, train_vision: bool) -> None:
        model.requires_grad_(True)
        visual = _unwrap(model).model.visual
        if not train_vision:
            visual.requires_grad_(False)
            visual.merger.requires_grad_(True)

    def block_classes(self) -> tuple[type, ...]:
        import importlib

        module = importlib.import_module(f"transformers.models.{self.generation.modeling}")
        return (getattr(module, self.generation.decoder_layer), getattr(module, self.generation.vision_block))

    def use_upstream_recipe(self, model) -> None:
        raise QwenvlError(
            f"--recipe upstream reproduces Qwen-VL (v1)'s finetune.py, which has no {self.title} counterpart here",
            "Train with the default --recipe qwenvl",
        )

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
        import torch

        folder, base = Path(folder), Path(base)
        if folder.exists() and any(folder.iterdir()) and not force:
            raise QwenvlError(f"{folder} is not empty", "Choose another folder, or pass --force to replace it")
        model = _unwrap(model)
        staging = folder.parent / f".{folder.name}.writing-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            state = state_dict
            if dtype is not None:
                torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
                state = state if state is not None else model.state_dict()
                state = {k: v.to(torch_dtype) if v.is_floating_point() else v for k, v in state.items()}
                model.config.dtype = torch_dtype
            model.save_pretrained(str(staging), state_dict=state, max_shard_size=max_shard_size)
            for path in self.carried_files(base):
                shutil.copyfile(path, staging / path.name)
            if generation:
                (staging / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", "utf-8")
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(staging, folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return folder

    def carried_files(self, base: Path) -> list[Path]:
        base = Path(base)
        names = (*PROCESSOR_FILES, *CARRIED_EXTRA)
        return sorted(base / name for name in names if (base / name).is_file())

    def consumers(self, folder: Path) -> dict[str, str | None]:
        folder = Path(folder)
        architectures = read_json_object(folder / "config.json").get("architectures") or []
        lacking = [
            name for name in ("config.json", "tokenizer.json", "tokenizer_config.json") if not (folder / name).is_file()
        ]
        if not any((folder / name).is_file() for name in ("preprocessor_config.json", "processor_config.json")):
            lacking.append("preprocessor_config.json")
        if not list(folder.glob("*.safetensors")):
            lacking.append("the safetensors weights")
        transformers_ok = "lacks " + ", ".join(lacking) if lacking else None
        vllm = transformers_ok
        if self.generation.model_class not in architectures:
            vllm = f"config.json's architectures {architectures} do not name {self.generation.model_class}"
        return {
            f"transformers AutoModelForImageTextToText + {self.generation.processor_class} (AutoProcessor needs "
            "torchvision; without it the image-only subclass of qwenvl_cli.families.hf_vl)": transformers_ok,
            f"vLLM ({self.generation.model_class}; not run here)": vllm,
        }

    # -- presets ---------------------------------------------------------------------------------------------
    def init_model(self, preset: str, output: Path, **options: Any) -> dict[str, Any]:
        from .hf_vl_tiny import write_tiny

        if preset not in self.presets:
            raise QwenvlError(f"unknown preset {preset!r}", f"Choose one of {', '.join(self.presets)}")
        if options.get("vocab") is not None:
            raise QwenvlError(
                f"--vocab is a qwen.tiktoken of Qwen-VL (v1); {preset} has its own tiny vocabulary", "Drop --vocab"
            )
        return write_tiny(
            self,
            image_only_processor_class(self.generation.processor_class),
            preset,
            Path(output),
            seed=options.get("seed", 0),
            force=options.get("force", False),
            weights=options.get("weights"),
        )

    def tiny_vocabulary(self, path: Path) -> Path:
        raise QwenvlError(f"{self.title} has no profile presets yet", "Profile a Qwen-VL (v1) preset")


def _unwrap(model):
    """The transformers model under a PEFT wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


class Qwen2VLFamily(HFVisionFamily):
    generation = GENERATIONS["qwen2_vl"]


class Qwen25VLFamily(HFVisionFamily):
    generation = GENERATIONS["qwen2_5_vl"]


class Qwen3VLFamily(HFVisionFamily):
    generation = GENERATIONS["qwen3_vl"]
