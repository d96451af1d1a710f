"""Qwen-VL training datasets: encoded conversations → tensors, pictures read and preprocessed when an item is
fetched (in a DataLoader worker when there are workers). Packed rows restart positions at 0 for each sample
and number the samples in the attention mask (1, 2, …), so that no token sees another sample's tokens."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..images import load_image
from .image import preprocess_images
from .template import IGNORE_INDEX, EncodedConversation


class ConversationDataset(Dataset):
    """Encoded conversations; each item's pictures are read and preprocessed when it is fetched (in a
    DataLoader worker when there are workers)."""

    def __init__(self, samples: list[EncodedConversation], image_size: int, image_root: Path | None):
        self.samples = samples
        self.image_size = image_size
        self.image_root = image_root

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        encoded = self.samples[index]
        pixels = None
        if encoded.image_paths:
            pixels = preprocess_images([load_image(p, self.image_root) for p in encoded.image_paths], self.image_size)
        return {
            "input_ids": torch.tensor(encoded.input_ids, dtype=torch.long),
            "labels": torch.tensor(encoded.labels, dtype=torch.long),
            "pixel_values": pixels,
        }


class PackedDataset(Dataset):
    """Rows of several encoded conversations: ids and labels end to end, positions restarting at 0 for each
    sample, the attention mask numbering the samples (1, 2, …), and the pictures in the order they appear."""

    def __init__(
        self,
        samples: list[EncodedConversation],
        rows: list[list[int]],
        image_size: int,
        image_root: Path | None,
    ):
        self.samples = samples
        self.rows = rows
        self.image_size = image_size
        self.image_root = image_root

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        segments: list[int] = []
        paths: list[str] = []
        for number, sample_index in enumerate(self.rows[index], 1):
            encoded = self.samples[sample_index]
            ids += encoded.input_ids
            # the token before a sample belongs to another one: nothing predicts a sample's first token
            labels += [IGNORE_INDEX, *encoded.labels[1:]] if labels else encoded.labels
            positions += range(len(encoded.input_ids))
            segments += [number] * len(encoded.input_ids)
            paths += encoded.image_paths
        pixels = None
        if paths:
            pixels = preprocess_images([load_image(p, self.image_root) for p in paths], self.image_size)
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "position_ids": torch.tensor(positions, dtype=torch.long),
            "segments": torch.tensor(segments, dtype=torch.long),
            "pixel_values": pixels,
        }
