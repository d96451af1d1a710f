"""`QWenTokenizer`: qwenvl's tokenizer behind transformers' tokenizer API, for `AutoTokenizer`.

The class bears the name official checkpoints give their tokenizer in tokenizer_config.json
(`"tokenizer_class": "QWenTokenizer"`), which is how `AutoTokenizer` looks a tokenizer up; it reads the
folder's `qwen.tiktoken` and encodes and decodes exactly as `QwenVLTokenizer` does:

- `tokenizer(text)` / `encode` give `QwenVLTokenizer.encode(text)`: markup tokens (`<img>`, `<ref>`, `<box>` …)
  are special when typed, ChatML control tokens typed in a text stay plain text, nothing is added around a
  text (no BOS or EOS); padding, truncation, batches and `return_tensors` are transformers' own.
- `decode` gives `QwenVLTokenizer.decode` (ids past the vocabulary, the padding rows of the embedding,
  are skipped); `skip_special_tokens=True` drops every special token.
- Token strings (`tokenize`, `convert_ids_to_tokens`, `get_vocab`) spell a token's bytes in the printable
  byte alphabet of byte-level BPE tokenizers (GPT-2's); special tokens are spelled as themselves.
- `<|endoftext|>` is the EOS and the padding token, as in the official generation config.

Pictures are not expanded here: a prompt's 256 picture positions and its pixel values come from qwenvl's
processor (`QwenVLProcessor`), and chat prompts from its `ChatTemplate`.
"""

from __future__ import annotations

import os
import shutil
from functools import cached_property

from transformers.tokenization_python import PythonBackend

from .tokenizer import ENDOFTEXT, VOCAB_FILE, QwenVLTokenizer


def byte_alphabet() -> dict[int, str]:
    """One printable character per byte: the printable Latin-1 bytes stand for themselves, the 68 others
    (controls, space, NBSP, soft hyphen) for the characters from U+0100 on, in byte order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {byte: chr(byte) for byte in printable}
    for offset, byte in enumerate(b for b in range(256) if b not in table):
        table[byte] = chr(0x100 + offset)
    return table


class QWenTokenizer(PythonBackend):
    vocab_files_names = {"vocab_file": VOCAB_FILE}  # noqa: RUF012 - the names transformers reads
    model_input_names = ["input_ids", "attention_mask"]  # noqa: RUF012

    def __init__(self, vocab_file: str, errors: str = "replace", **kwargs):
        self.vocab_file = str(vocab_file)
        self.errors = errors
        self.qwen = QwenVLTokenizer.from_file(vocab_file)
        self._special_names = {token_id: token for token, token_id in self.qwen.special_ids.items()}
        self._alphabet = byte_alphabet()
        self._bytes_of = {char: byte for byte, char in self._alphabet.items()}
        kwargs.setdefault("eos_token", ENDOFTEXT)
        kwargs.setdefault("pad_token", ENDOFTEXT)
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        super().__init__(errors=errors, **kwargs)

    # --- vocabulary -----------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self.qwen)

    @cached_property
    def _vocab(self) -> dict[str, int]:
        vocab = {self._spell(self.qwen.token_bytes(i)): i for i in range(self.qwen.num_ranks)}
        vocab.update(self.qwen.special_ids)
        return vocab

    def get_vocab(self) -> dict[str, int]:
        return dict(self._vocab)

    def _spell(self, token: bytes) -> str:
        return "".join(self._alphabet[byte] for byte in token)

    def _convert_token_to_id(self, token: str) -> int:
        return self._vocab[token]

    def _convert_id_to_token(self, index: int) -> str:
        if index in self._special_names:
            return self._special_names[index]
        if 0 <= index < self.qwen.num_ranks:
            return self._spell(self.qwen.token_bytes(index))
        return ""  # a padding row of the model's embedding: no token

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        data = b"".join(
            token.encode() if token in self.qwen.special_ids else bytes(self._bytes_of[char] for char in token)
            for token in tokens
        )
        return data.decode("utf-8", errors=self.errors)

    # --- encoding and decoding ------------------------------------------------------------------------

    def tokenize(self, text: str, **kwargs) -> list[str]:
        return [self._convert_id_to_token(i) for i in self.qwen.encode(text)]

    def _encode_plus(self, text, text_pair=None, *args, **kwargs):
        # Texts become ids here, so that transformers' own splitting on special tokens (which would make a
        # typed <|endoftext|> the real token) never runs; a list of ids passes through unchanged.
        if isinstance(text, str):
            text = self.qwen.encode(text)
        if isinstance(text_pair, str):
            text_pair = self.qwen.encode(text_pair)
        return super()._encode_plus(text, text_pair, *args, **kwargs)

    def _decode(self, token_ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces=None, **kwargs):
        ids = [token_ids] if isinstance(token_ids, int) else [int(i) for i in token_ids]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_names]
        text = self.qwen.decode(ids, errors=self.errors)
        if clean_up_tokenization_spaces or (clean_up_tokenization_spaces is None and self.clean_up_tokenization_spaces):
            text = self.clean_up_tokenization(text)
        return text

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        target = os.path.join(save_directory, (f"{filename_prefix}-" if filename_prefix else "") + VOCAB_FILE)
        if os.path.abspath(target) != os.path.abspath(self.vocab_file):
            shutil.copyfile(self.vocab_file, target)
        return (target,)
