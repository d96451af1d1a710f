"""Training data: validated samples → token ids once (cached), pictures decoded in DataLoader workers,
dynamic right padding to the longest sample of the batch (a multiple of 8), never to --max-length.

With --packing, several samples share one row of up to --max-length tokens (best-fit decreasing, decided
once, so every epoch and every resumed run sees the same rows): positions restart at 0 for each sample and
the attention mask numbers the samples (1, 2, …), so that no token sees another sample's tokens."""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..data.reader import DataFile
from ..data.validate import ValidateOptions, validate_data
from ..errors import QwenvlError
from ..model.image import load_image, preprocess_images
from ..model.processor import PaddingCollator  # noqa: F401 - re-exported for the trainer
from ..model.template import IGNORE_INDEX, IMAGE_TOKENS, ChatTemplate, EncodedConversation
from ..schemas import ValidationReport


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class PreparedData:
    samples: list[EncodedConversation]
    dropped_too_long: int
    skipped_invalid: int
    report: ValidationReport


def prepare_samples(
    data_file: str | Path,
    template: ChatTemplate,
    max_length: int,
    image_root: Path | None = None,
    skip_invalid: bool = False,
) -> PreparedData:
    """Validate the file with validate-data's checks, then encode every valid sample once.

    Samples longer than `max_length` are truncated at the end, except when the cut would fall inside a
    picture or leave no assistant token: those are dropped and counted."""
    report = validate_data([data_file], ValidateOptions(image_root=image_root))
    if report.exit_code == 2:
        first = report.findings[0]
        raise QwenvlError(f"{data_file} cannot be read: {first.message}", first.fix)
    bad = {f.sample_index for f in report.findings if f.severity.value == "error" and f.sample_index is not None}
    if bad and not skip_invalid:
        examples = "; ".join(
            f"{f.code} line {f.line}: {f.message}" for f in report.findings if f.severity.value == "error"
        )[:600]
        raise QwenvlError(
            f"{data_file} has {report.errors} errors in {len(bad)} samples ({examples})",
            "Fix them (qwenvl validate-data shows all of them), or pass --skip-invalid to train on the rest",
        )
    samples: list[EncodedConversation] = []
    dropped = 0
    for record in DataFile.open(data_file).records():
        if record.index in bad or record.problem is not None:
            continue
        turns = [(turn["from"], turn["value"]) for turn in record.value["conversations"]]
        encoded = template.encode(turns)
        if len(encoded) > max_length:
            cut_in_picture = any(start < max_length < start + IMAGE_TOKENS for start in encoded.image_starts)
            no_target = encoded.first_target is None or encoded.first_target >= max_length
            if cut_in_picture or no_target:
                dropped += 1
                continue
            keep = [s for s in encoded.image_starts if s + IMAGE_TOKENS <= max_length]
            encoded.image_paths = encoded.image_paths[: len(keep)]
            encoded.image_starts = keep
            encoded.input_ids = encoded.input_ids[:max_length]
            encoded.labels = encoded.labels[:max_length]
        samples.append(encoded)
    if not samples:
        raise QwenvlError(
            f"no sample of {data_file} is left to train on ({dropped} too long for --max-length {max_length})",
            "Raise --max-length or check the data with qwenvl validate-data --model",
        )
    return PreparedData(samples, dropped, len(bad), report)


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


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Sample indices grouped into rows of at most `capacity` tokens: best-fit decreasing (each sample, the
    longest first, goes into the fullest row that still has room). Rows list their samples in data order."""
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (tokens left, row number), sorted
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        length = lengths[index]
        if length > capacity:
            raise ValueError(f"sample {index} has {length} tokens, more than a row's {capacity}")
        spot = bisect.bisect_left(room, (length, -1))
        if spot < len(room):
            left, row = room.pop(spot)
        else:
            left, row = capacity, len(rows)
            rows.append([])
        rows[row].append(index)
        if left - length > 0:
            bisect.insort(room, (left - length, row))
    return [sorted(row) for row in rows]


class PackedDataset(Dataset):
    """Rows of several encoded conversations: ids and labels end to end, positions restarting at 0 for each
    sample, the attention mask numbering the samples (1, 2, …), and the pictures in the order they appear."""

    def __init__(
        self,
        samples: list[EncodedConversation],
        capacity: int,
        image_size: int,
        image_root: Path | None,
        rows: list[list[int]] | None = None,
    ):
        self.samples = samples
        self.rows = rows if rows is not None else pack_rows([len(sample.input_ids) for sample in samples], capacity)
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
