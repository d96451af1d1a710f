"""Qwen-VL tokenizer on tiktoken, read from a checkpoint's `qwen.tiktoken` (no remote code).

The file holds one `base64(token) rank` pair per line. With N ranks, the special tokens take the ids
from N in a fixed order (see SPECIAL_TOKENS), which gives the official ids for the official file
(151643 ranks, `<img>` = 151857).
"""

from __future__ import annotations

import base64
import itertools
import os
import unicodedata
from collections import Counter
from functools import cached_property
from pathlib import Path

import tiktoken

from ..errors import QwenvlError

VOCAB_FILE = "qwen.tiktoken"
# Pre-tokenisation pattern of Qwen's BPE (single digits, like cl100k otherwise).
PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
EXTRAS = tuple(f"<|extra_{i}|>" for i in range(205))
REF_START, REF_END, BOX_START, BOX_END = "<ref>", "</ref>", "<box>", "</box>"
QUAD_START, QUAD_END, IMG_START, IMG_END, IMG_PAD = "<quad>", "</quad>", "<img>", "</img>", "<imgpad>"
MARKUP_TOKENS = (REF_START, REF_END, BOX_START, BOX_END, QUAD_START, QUAD_END, IMG_START, IMG_END, IMG_PAD)
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, *EXTRAS, *MARKUP_TOKENS)
IMAGE_PLACEHOLDERS = 256  # positions between <img> and </img>, replaced by the 256 image vectors


def load_ranks(path: str | os.PathLike[str]) -> dict[bytes, int]:
    """Read a `.tiktoken` file; raises QwenvlError naming the line when it is malformed."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError:
                raise QwenvlError(
                    f"{path} line {number} is not `base64-token rank`",
                    "Replace the file with the checkpoint's original qwen.tiktoken",
                ) from None
    return ranks


def write_ranks(ranks: dict[bytes, int], path: str | os.PathLike[str]) -> None:
    with open(path, "w", encoding="ascii") as handle:
        for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
            handle.write(f"{base64.b64encode(token).decode('ascii')} {rank}\n")


def train_bpe_ranks(corpus: str, vocab_size: int) -> dict[bytes, int]:
    """Learn a small byte-level BPE vocabulary from `corpus`, deterministically.

    The 256 single bytes come first, then merges in order of frequency (ties broken by the bytes),
    each merged token getting the next rank, so tiktoken's rank-ordered merging reproduces them.
    Used to build the tiny test models' vocabularies; the official vocabulary is read from disk.
    """
    import regex

    if vocab_size < 256:
        raise ValueError("a byte-level vocabulary needs at least 256 entries")
    ranks = {bytes([b]): b for b in range(256)}
    words = Counter(
        tuple(bytes([b]) for b in piece.encode("utf-8"))
        for piece in regex.findall(PAT_STR, unicodedata.normalize("NFC", corpus))
    )
    while len(ranks) < vocab_size:
        pairs: Counter[tuple[bytes, bytes]] = Counter()
        for word, count in words.items():
            for pair in itertools.pairwise(word):
                pairs[pair] += count
        if not pairs:
            break
        best_count = max(pairs.values())
        best = min(pair for pair, count in pairs.items() if count == best_count)
        merged = best[0] + best[1]
        if merged not in ranks:
            ranks[merged] = len(ranks)
        new_words: Counter[tuple[bytes, ...]] = Counter()
        for word, count in words.items():
            out: list[bytes] = []
            i = 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == best[0] and word[i + 1] == best[1]:
                    out.append(merged)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            new_words[tuple(out)] += count
        words = new_words
    return ranks


class QwenVLTokenizer:
    """Byte-level BPE with Qwen's special tokens.

    `encode` treats the markup tokens (`<img>`, `<ref>`, `<box>`, …) as special and any typed ChatML
    control token (`<|im_start|>` …) as plain text, so user data can never inject template tokens.
    Text is NFC-normalised first.
    """

    def __init__(self, ranks: dict[bytes, int], name: str = "qwen"):
        self.num_ranks = len(ranks)
        self.special_ids = {token: self.num_ranks + i for i, token in enumerate(SPECIAL_TOKENS)}
        self._encoding = tiktoken.Encoding(
            name, pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=self.special_ids
        )
        self._markup = frozenset(MARKUP_TOKENS)
        self.name = name

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> QwenVLTokenizer:
        return cls(load_ranks(path), name=Path(path).parent.name or "qwen")

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike[str]) -> QwenVLTokenizer:
        directory = Path(directory)
        if not directory.is_dir():
            raise QwenvlError(
                f"model folder {directory} does not exist",
                "Pass the folder that holds the checkpoint's config.json and qwen.tiktoken",
            )
        vocab = directory / VOCAB_FILE
        if not vocab.is_file():
            raise QwenvlError(
                f"{directory} has no {VOCAB_FILE}",
                "Pass a Qwen-VL checkpoint folder (it ships qwen.tiktoken beside config.json)",
            )
        return cls(load_ranks(vocab), name=directory.name)

    def __len__(self) -> int:
        return self.num_ranks + len(SPECIAL_TOKENS)

    @cached_property
    def im_start_id(self) -> int:
        return self.special_ids[IM_START]

    @cached_property
    def im_end_id(self) -> int:
        return self.special_ids[IM_END]

    @cached_property
    def eod_id(self) -> int:
        return self.special_ids[ENDOFTEXT]

    @cached_property
    def img_start_id(self) -> int:
        return self.special_ids[IMG_START]

    @cached_property
    def img_end_id(self) -> int:
        return self.special_ids[IMG_END]

    @cached_property
    def img_pad_id(self) -> int:
        return self.special_ids[IMG_PAD]

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, markup tokens special, control tokens as plain text."""
        return self._encoding.encode(
            unicodedata.normalize("NFC", text), allowed_special=self._markup, disallowed_special=()
        )

    def encode_plain(self, text: str) -> list[int]:
        """Token ids of `text` with every special token spelled out as text."""
        return self._encoding.encode_ordinary(unicodedata.normalize("NFC", text))

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one token (a special token's text for a special id)."""
        return self._encoding.decode_single_token_bytes(token_id)

    def decode(self, ids: list[int], errors: str = "replace") -> str:
        """Text of `ids`; ids past the vocabulary (the padding rows of a model's embedding) are skipped."""
        size = len(self)
        return self._encoding.decode([i for i in ids if 0 <= i < size], errors=errors)
