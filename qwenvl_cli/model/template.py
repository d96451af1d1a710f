"""Conversation → token ids and training labels, in Qwen's ChatML template.

```
<|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{q}<|im_end|>\\n<|im_start|>assistant\\n{a}<|im_end|>\\n
```
Each `<img>PATH</img>` becomes `<img>` + 256 `<imgpad>` + `</img>` (258 tokens); the model replaces
the 256 pad embeddings by the image's vectors. Labels are -100 everywhere except `<|im_start|>`,
`<|im_end|>` and the newline after it in every turn, and the assistant's content (the role word and
its newline are not learned).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..markup import MarkupError, scan_markup
from .tokenizer import IMAGE_PLACEHOLDERS, QwenVLTokenizer

DEFAULT_SYSTEM = "You are a helpful assistant."
IGNORE_INDEX = -100
IMAGE_TOKENS = IMAGE_PLACEHOLDERS + 2  # <img> + 256 positions + </img>


@dataclass
class EncodedConversation:
    input_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    image_paths: list[str] = field(default_factory=list)
    image_starts: list[int] = field(default_factory=list)  # index of each <img> token
    first_target: int | None = None  # index of the first assistant-content token

    def __len__(self) -> int:
        return len(self.input_ids)


class ChatTemplate:
    """Encodes conversations for one tokenizer; caches the fixed pieces of the template."""

    def __init__(self, tokenizer: QwenVLTokenizer, system: str = DEFAULT_SYSTEM):
        self.tokenizer = tokenizer
        self.system = system
        self._nl = tokenizer.encode_plain("\n")
        self.heads = {
            role: [tokenizer.im_start_id, *tokenizer.encode_plain(role), *self._nl]
            for role in ("system", "user", "assistant")
        }
        self._tail = [tokenizer.im_end_id, *self._nl]
        self._system_ids = self.heads["system"] + tokenizer.encode(system) + self._tail
        self._system_labels = self._masked(self._system_ids)

    def _masked(self, ids: list[int]) -> list[int]:
        """Labels of a turn that is not learned: only <|im_start|>, <|im_end|> and its newline."""
        tail = len(self._tail)
        return [ids[0], *([IGNORE_INDEX] * (len(ids) - 1 - tail)), *ids[-tail:]]

    def encode_content(self, text: str, out: EncodedConversation) -> list[int]:
        """Token ids of one message, expanding pictures; records their paths and positions in `out`
        relative to the current end of `out.input_ids`."""
        scan = scan_markup(text)
        if scan.problems:
            raise MarkupError(scan.problems)
        tok = self.tokenizer
        ids: list[int] = []
        pending: list[str] = []
        base = len(out.input_ids)
        for span in scan.spans:
            if span.kind != "img":
                pending.append(text[span.start : span.end])
                continue
            pending.append(span.label)
            if pending:
                ids.extend(tok.encode("".join(pending)))
                pending.clear()
            out.image_starts.append(base + len(ids))
            out.image_paths.append(span.content)
            ids.append(tok.img_start_id)
            ids.extend([tok.img_pad_id] * IMAGE_PLACEHOLDERS)
            ids.append(tok.img_end_id)
        if pending:
            ids.extend(tok.encode("".join(pending)))
        return ids

    def encode_raw(self, text: str) -> EncodedConversation:
        """A prompt without the chat template (base models, `chat_format: "raw"`)."""
        out = EncodedConversation()
        out.input_ids = self.encode_content(text, out)
        out.labels = [IGNORE_INDEX] * len(out.input_ids)
        return out

    def encode(self, turns: Sequence[tuple[str, str]]) -> EncodedConversation:
        """Encode `(role, value)` turns (roles `user`/`assistant`) with the system prompt first."""
        out = EncodedConversation(list(self._system_ids), list(self._system_labels))
        for role, value in turns:
            head = self.heads[role]
            out.input_ids.extend(head)
            content = self.encode_content(value, out)
            out.input_ids.extend(content)
            out.input_ids.extend(self._tail)
            if role == "assistant":
                if out.first_target is None and content:
                    out.first_target = len(out.labels) + len(head)
                out.labels.append(head[0])
                out.labels.extend([IGNORE_INDEX] * (len(head) - 1))
                out.labels.extend(content)
                out.labels.extend(self._tail)
            else:
                out.labels.extend(self._masked([*head, *content, *self._tail]))
        return out


def encode_prompt(template: ChatTemplate, turns: Sequence[tuple[str, str]]) -> EncodedConversation:
    """A generation prompt: the conversation so far (ending with the user's turn) and the assistant's
    header `<|im_start|>assistant\\n`, exactly as upstream `make_context` builds it."""
    out = template.encode(turns)
    head = template.heads["assistant"]
    out.input_ids.extend(head)
    out.labels.extend([IGNORE_INDEX] * len(head))
    return out
