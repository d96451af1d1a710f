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
- Training: LM + merger in full fine-tuning (the vision tower with --train-vit), LoRA on the LM's Linears only,
  Q-LoRA with those Linears in NF4 (`nf4_layer_names`).
- --packing: rows of several samples, each with its own M-RoPE positions (the model's `get_rope_index`) and
  attention confined to it (transformers' packed position ids).
- Asking (chat, eval, serve-ui, merge --verify): `processor` and `chat_session` in `hf_vl_chat.py`.
- Not yet: GPTQ checkpoints, --recipe upstream.
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
from .hf_vl_presets import OFFICIAL, presets_of, profile_presets_of, write_official

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
def _image_processor_cached(folder: str, stamp: float, pixels: tuple[int, int] | None = None):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    if pixels is None:
        return Qwen2VLImageProcessorPil.from_pretrained(folder)
    return Qwen2VLImageProcessorPil.from_pretrained(
        folder, size={"shortest_edge": pixels[0], "longest_edge": pixels[1]}
    )


def image_processor(folder: str | Path, pixels: tuple[int, int] | None = None):
    """The folder's image processor (the PIL backend: no torchvision), cached per folder and file version;
    `pixels` = (min_pixels, max_pixels) replaces the folder's bounds (`qwenvl train --min-pixels/--max-pixels`)."""
    found = [Path(folder) / name for name in ("preprocessor_config.json", "processor_config.json")]
    found = [path for path in found if path.is_file()]
    if not found:
        raise QwenvlError(
            f"{folder} has no preprocessor_config.json (or processor_config.json), so the size of its pictures "
            "in tokens is unknown",
            "Copy preprocessor_config.json from the model's original files",
        )
    stamp = max(path.stat().st_mtime for path in found)
    return _image_processor_cached(str(Path(folder).resolve()), stamp, tuple(pixels) if pixels else None)


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

    def __init__(
        self,
        generation: Generation,
        tokenizer,
        system: str,
        folder: Path,
        image_root: Path | None,
        pixels: tuple[int, int] | None = None,
        max_length: int | None = None,
    ):
        self.generation = generation
        self.tokenizer = tokenizer
        self.system = system
        self.image_root = image_root
        self.patch, self.merge, self.min_pixels, self.max_pixels = pixel_budget(image_processor(folder, pixels))
        self.max_length = max_length  # a picture longer than this (markers included) is refused by name
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
        count = (height // self.patch) * (width // self.patch) // self.merge**2
        if self.max_length is not None and count + 2 > self.max_length:
            raise QwenvlError(
                f"picture {path} takes {count + 2} tokens ({width}×{height} after resizing to at most "
                f"{self.max_pixels:,} pixels, markers included), more than --max-length {self.max_length}",
                f"Lower --max-pixels (each {(self.patch * self.merge) ** 2} pixels are one token) or raise "
                "--max-length",
            )
        return count

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

    def __init__(
        self,
        samples: list,
        folder: Path,
        image_root: Path | None,
        image_pad: int,
        pixels: tuple[int, int] | None = None,
    ):
        self.samples = samples
        self.folder = folder
        self.image_root = image_root
        self.image_pad = image_pad
        self.pixels = pixels  # the run's (min_pixels, max_pixels), the template's too

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
            processor = image_processor(self.folder, self.pixels)
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


class PackedPictureDataset(PictureDataset):
    """Rows of several encoded conversations end to end (`rows` from `pack_rows`): ids, labels and
    mm_token_type_ids concatenated, the pictures in the order they appear, and `segments` numbering each token's
    sample (1, 2, …). `HFVisionFamily.training_inputs` turns the numbers into per-sample M-RoPE positions."""

    def __init__(self, samples: list, rows: list[list[int]], *args, **kwargs):
        super().__init__(samples, *args, **kwargs)
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        import torch

        parts = [PictureDataset.__getitem__(self, sample) for sample in self.rows[index]]
        labels = []
        for number, part in enumerate(parts):
            row_labels = part["labels"].clone()
            if number:  # the token before a sample belongs to another one: nothing predicts its first token
                row_labels[0] = IGNORE_INDEX
            labels.append(row_labels)
        item = {
            "input_ids": torch.cat([part["input_ids"] for part in parts]),
            "labels": torch.cat(labels),
            "mm_token_type_ids": torch.cat([part["mm_token_type_ids"] for part in parts]),
            "segments": torch.cat(
                [
                    torch.full((len(part["input_ids"]),), number, dtype=torch.long)
                    for number, part in enumerate(parts, 1)
                ]
            ),
            "pixel_values": None,
            "image_grid_thw": None,
        }
        pictures = [part for part in parts if part["pixel_values"] is not None]
        if pictures:
            item["pixel_values"] = torch.cat([part["pixel_values"] for part in pictures])
            item["image_grid_thw"] = torch.cat([part["image_grid_thw"] for part in pictures])
        return item


def packed_position_ids(model, inputs: dict):
    """[4, batch, length] position ids of packed rows (`attention_mask` numbers each token's sample, 0 is
    padding): row 0 the text positions, restarting at 0 for each sample (transformers' masking finds the
    samples there and confines attention to each), rows 1–3 each sample's M-RoPE positions from the model's own
    `get_rope_index`, as if the sample were alone. Padding is one more sample of its own."""
    import torch

    while hasattr(model, "module"):  # DDP and DeepSpeed wrap the model the Trainer's compute_loss gets
        model = model.module
    inner = _unwrap(model).model
    numbers = inputs["attention_mask"]
    ids, types = inputs["input_ids"], inputs["mm_token_type_ids"]
    grids = inputs.get("image_grid_thw")
    positions = torch.zeros((4, *ids.shape), dtype=torch.long, device=ids.device)
    used = 0  # pictures of the batch taken so far (image_grid_thw is in row order)
    for row in range(ids.shape[0]):
        start = 0
        width = ids.shape[1]
        row_numbers = numbers[row].tolist()  # one copy per row: the scan below reads plain ints
        while start < width:
            number = row_numbers[start]
            end = start + 1
            while end < width and row_numbers[end] == number:
                end += 1
            span = slice(start, end)
            positions[0, row, span] = torch.arange(end - start, device=ids.device)
            if number == 0:  # padding
                positions[1:, row, span] = positions[0, row, span]
            else:
                kinds = types[row, span]
                pictures = int(((kinds[1:] == 1) & (kinds[:-1] != 1)).sum()) + int(kinds[0] == 1)
                sample_grids = grids[used : used + pictures] if pictures else None
                used += pictures
                rope, _ = inner.get_rope_index(
                    ids[row : row + 1, span], mm_token_type_ids=kinds[None], image_grid_thw=sample_grids
                )
                positions[1:, row, span] = rope[:, 0]
            start = end
    return positions


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
            # a packed row's attention mask numbers its samples 1, 2, … (HFVisionFamily.training_inputs)
            batch["attention_mask"][row, :n] = item.get("segments", 1)
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
    merger_modules: ClassVar[tuple[str, ...]] = ("merger", "deepstack_merger_list")  # Qwen3-VL has both
    tokenizer_files: ClassVar[tuple[str, ...]] = PROCESSOR_FILES
    full_summary: ClassVar[str] = (
        "all LM weights, lm_head and the vision merger; the vision tower stays frozen unless --train-vit"
    )

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        gen = cls.generation
        cls.name, cls.title, cls.model_types = gen.name, gen.title, (gen.model_type,)
        cls.default_system = gen.default_system
        cls.presets = {
            gen.preset: f"tiny random {gen.title} (transformers' own classes) for tests and demos",
            **presets_of(gen.model_type),
        }
        cls.profile_presets = profile_presets_of(gen.model_type)
        cls.device_presets = tuple(presets_of(gen.model_type))

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

        if quant not in (None, "nf4"):
            raise QwenvlError(
                f"qwenvl does not load {self.title} {quant} checkpoints yet: its Q-LoRA quantises a 16-bit "
                "checkpoint to NF4 at load",
                "Train Q-LoRA from the bf16/fp16 checkpoint (--method qlora, NF4), or use --method lora",
            )
        torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        folder = Path(folder)
        if random_weights:
            model = AutoModelForImageTextToText.from_config(self.config(folder), dtype=torch_dtype)
        else:
            model = AutoModelForImageTextToText.from_pretrained(str(folder), dtype=torch_dtype)
        if quant == "nf4":
            from ..model.quant import swap_in_nf4

            # the language model's Linears only: the vision tower, merger, embeddings and lm_head stay 16-bit
            swap_in_nf4(model, torch_dtype, device=device, names=nf4_layer_names(model))
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
    def template(
        self,
        tokenizer,
        system: str | None = None,
        image_root: Path | None = None,
        pixels: tuple[int, int] | None = None,
        max_length: int | None = None,
    ):
        return VisionTemplate(
            self.generation,
            tokenizer,
            self.default_system if system is None else system,
            _folder_of(tokenizer),
            image_root,
            pixels,
            max_length,
        )

    def picture_pixels(
        self, folder: Path, min_pixels: int | None, max_pixels: int | None, max_length: int
    ) -> tuple[int, int] | None:
        """(min_pixels, max_pixels) of a run: the folder's, replaced by the given ones rounded to whole tokens
        (min up, max down, to multiples of (patch·merge)²); None when neither is given."""
        if min_pixels is None and max_pixels is None:
            return None
        patch, merge, folder_min, folder_max = pixel_budget(image_processor(folder))
        unit = (patch * merge) ** 2  # the pixels of one merged token
        low = -(-(folder_min if min_pixels is None else min_pixels) // unit) * unit
        high = (folder_max if max_pixels is None else max_pixels) // unit * unit
        if high < unit:
            raise QwenvlError(
                f"--max-pixels {max_pixels} is less than one token of {self.title} ({unit} pixels: ({patch}·{merge})²)",
                f"Give --max-pixels of at least {unit}",
            )
        if low > high:
            raise QwenvlError(
                f"--min-pixels ({low:,} rounded up to whole {unit}-pixel tokens) is more than --max-pixels "
                f"({high:,} rounded down); the folder's own bounds are {folder_min:,} … {folder_max:,}",
                "Give --min-pixels ≤ --max-pixels",
            )
        if low // unit + 2 > max_length:
            raise QwenvlError(
                f"with --min-pixels {low:,} every picture takes at least {low // unit + 2} tokens (markers "
                f"included), more than --max-length {max_length}",
                "Lower --min-pixels or raise --max-length",
            )
        return low, high

    def record_pixels(self, folder: Path, pixels: tuple[int, int]) -> None:
        """Write a run's (min_pixels, max_pixels) into the processor files copied into `folder`, so that the
        trained folder's processor makes the pictures it was trained on."""
        for name in ("preprocessor_config.json", "processor_config.json"):
            path = Path(folder) / name
            if not path.is_file():
                continue
            settings = json.loads(path.read_text("utf-8"))
            image = settings.get("image_processor", settings) if name == "processor_config.json" else settings
            if name == "processor_config.json" and "image_processor" not in settings:
                continue
            image["size"] = {**(image.get("size") or {}), "shortest_edge": pixels[0], "longest_edge": pixels[1]}
            for key, value in (("min_pixels", pixels[0]), ("max_pixels", pixels[1])):
                if key in image:  # older files: these win over size when the processor is made
                    image[key] = value
            path.write_text(json.dumps(settings, indent=2) + "\n", "utf-8")

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
        self,
        samples: Sequence[Any],
        config,
        image_root: Path,
        max_length: int,
        rows: list | None = None,
        pixels: tuple[int, int] | None = None,
    ):
        folder = _folder_of(config)
        pad = read_json_object(folder / "config.json").get("image_token_id")
        if pad is None:
            pad = getattr(config, "image_token_id", None)
        if rows is not None:
            return PackedPictureDataset(list(samples), rows, folder, image_root, int(pad), pixels)
        return PictureDataset(list(samples), folder, image_root, int(pad), pixels)

    def training_inputs(self, model, inputs: dict, packed: bool = False) -> dict:
        """A packed batch (its attention mask numbers the samples of each row) → per-sample M-RoPE position
        ids with the text positions first (transformers' packed format) and no attention mask: transformers'
        masking then confines each token's attention to its own sample. Unpacked batches pass unchanged; a run
        without --packing never reads its mask on the host (on a GPU that read waits for the device)."""
        mask = inputs.get("attention_mask")
        if not packed or mask is None or int(mask.max()) <= 1:
            return inputs
        inputs = dict(inputs)
        inputs["position_ids"] = packed_position_ids(model, inputs)
        inputs["attention_mask"] = None
        inputs["use_cache"] = False  # transformers looks for packed positions only without a cache
        return inputs

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
        if preset in OFFICIAL:
            return write_official(
                self,
                image_only_processor_class(self.generation.processor_class),
                preset,
                Path(output),
                force=options.get("force", False),
                weights=options.get("weights"),
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

    def tiny_vocabulary(self, path: Path) -> Path | None:
        return None  # every preset writes its own tiny vocabulary (init_model takes no --vocab)


def nf4_layer_names(model) -> list[str]:
    """The `nn.Linear` modules Q-LoRA quantises: every one inside the language model (its attention and MLP
    projections); the vision tower, the merger, the embeddings and `lm_head` are left out."""
    import torch

    return [
        name
        for name, module in model.named_modules()
        if type(module) is torch.nn.Linear and ".language_model." in f".{name}."
    ]


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
