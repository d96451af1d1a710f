"""Training data: validated samples → token ids once (cached), pictures decoded in DataLoader workers,
dynamic right padding to the longest sample of the batch (a multiple of 8), never to --max-length."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..data.reader import DataFile
from ..data.validate import ValidateOptions, validate_data
from ..errors import QwenvlError
from ..model.image import load_image, preprocess_images
from ..model.processor import PaddingCollator  # noqa: F401 - re-exported for the trainer
from ..model.template import IMAGE_TOKENS, ChatTemplate, EncodedConversation
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
