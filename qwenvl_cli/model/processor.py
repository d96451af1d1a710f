"""Conversations → model tensors (ids, labels, attention mask, pixel values) for training and chat.

The token layout and label masking come from `template.ChatTemplate`; this module adds the pictures
(loaded and preprocessed as the model expects) and batching.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ..images import load_image
from ..schemas import Sample
from .image import preprocess_images
from .template import DEFAULT_SYSTEM, IGNORE_INDEX, ChatTemplate, EncodedConversation, encode_prompt
from .tokenizer import QwenVLTokenizer


class QwenVLProcessor:
    """Conversations → model tensors: ids, labels, attention mask and the pictures' pixel values."""

    def __init__(
        self,
        tokenizer: QwenVLTokenizer,
        image_size: int,
        image_root: str | Path | None = None,
        system: str = DEFAULT_SYSTEM,
    ):
        self.tokenizer = tokenizer
        self.template = ChatTemplate(tokenizer, system)
        self.image_size = image_size
        self.image_root = Path(image_root) if image_root is not None else None
        self.pad_id = tokenizer.eod_id

    def pixel_values(self, paths: Sequence[str]) -> torch.Tensor | None:
        if not paths:
            return None
        images = [load_image(path, self.image_root) for path in paths]
        return preprocess_images(images, self.image_size)

    def encode(self, turns: Sequence[tuple[str, str]], with_images: bool = True) -> dict[str, torch.Tensor | None]:
        """One training sample (user/assistant turns) as tensors of shape (1, S)."""
        encoded = self.template.encode(turns)
        return self.tensors(encoded, with_images)

    def encode_sample(self, sample: Sample | dict, with_images: bool = True) -> dict[str, torch.Tensor | None]:
        """A sample in the data format (`{"id", "conversations": [{"from", "value"}, ...]}`)."""
        if isinstance(sample, dict):
            sample = Sample.model_validate(sample)
        return self.encode([(turn.role, turn.value) for turn in sample.conversations], with_images)

    def encode_prompt(self, turns: Sequence[tuple[str, str]], with_images: bool = True) -> dict:
        """A generation prompt ending with `<|im_start|>assistant\\n`."""
        return self.tensors(encode_prompt(self.template, turns), with_images)

    def tensors(self, encoded: EncodedConversation, with_images: bool = True) -> dict:
        ids = torch.tensor([encoded.input_ids], dtype=torch.long)
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "labels": torch.tensor([encoded.labels], dtype=torch.long),
            "pixel_values": self.pixel_values(encoded.image_paths) if with_images else None,
            "image_paths": encoded.image_paths,
        }

    def collate(self, items: Sequence[dict], pad_to_multiple_of: int = 8) -> dict[str, torch.Tensor | None]:
        """Right-pad a list of `encode` results to the longest (rounded up to a multiple of 8)."""
        rows = [
            {"input_ids": item["input_ids"][0], "labels": item["labels"][0], "pixel_values": item.get("pixel_values")}
            for item in items
        ]
        batch = PaddingCollator(self.pad_id, pad_to_multiple_of)(rows)
        batch.setdefault("pixel_values", None)
        return batch


class PaddingCollator:
    """Right-pads to the batch's longest sample rounded up to a multiple of 8; pictures in row order. Packed
    rows (items with `segments` and `position_ids`) keep their sample numbers as the attention mask."""

    def __init__(self, pad_id: int, multiple: int = 8, pad_to: int | None = None):
        self.pad_id = pad_id
        self.multiple = multiple
        self.pad_to = pad_to  # a fixed width (the upstream recipe pads every sample to --max-length)

    def __call__(self, items: list[dict]) -> dict:
        longest = max(len(item["input_ids"]) for item in items)
        width = -(-longest // self.multiple) * self.multiple
        if self.pad_to is not None:
            width = max(width, self.pad_to)
        input_ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(items), width), dtype=torch.long)
        packed = "segments" in items[0]  # rows of several samples (train --packing)
        position_ids = torch.zeros((len(items), width), dtype=torch.long) if packed else None
        pictures = []
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            input_ids[row, :n] = item["input_ids"]
            labels[row, :n] = item["labels"]
            attention_mask[row, :n] = item["segments"] if packed else 1
            if position_ids is not None:
                position_ids[row, :n] = item["position_ids"]
            if item["pixel_values"] is not None:
                pictures.append(item["pixel_values"])
        batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
        if position_ids is not None:
            batch["position_ids"] = position_ids
        if pictures:
            batch["pixel_values"] = torch.cat(pictures)
        return batch
