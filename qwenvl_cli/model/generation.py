"""Text generation for Qwen-VL: a streaming token loop with a KV cache, and `chat` as upstream builds it.

The loop is small and ours (rather than transformers' `generate`) so that streaming, stop tokens,
images on the first step and the no-cache baseline of the benchmark all go through one place.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch
from transformers import DynamicCache

from ..markup import pictures_in_history, query_with_pictures
from ..schemas import GenerationSettings
from .processor import QwenVLProcessor
from .template import encode_prompt
from .tokenizer import BOX_END, BOX_START, IM_END, IM_START, QUAD_END, QUAD_START, REF_END, REF_START


def _next_token(
    logits: torch.Tensor, seen: torch.Tensor, settings: GenerationSettings, generator: torch.Generator | None
) -> int:
    logits = logits.float()
    if settings.vocab_limit is not None:
        logits[settings.vocab_limit :] = float("-inf")
    if settings.suppress_ids:
        logits[list(settings.suppress_ids)] = float("-inf")
    if settings.repetition_penalty != 1.0 and seen.numel():
        previous = logits[seen]
        logits[seen] = torch.where(
            previous > 0, previous / settings.repetition_penalty, previous * settings.repetition_penalty
        )
    if settings.temperature <= 0:
        return int(logits.argmax())
    logits = logits / settings.temperature
    if settings.top_k > 0:
        kth = torch.topk(logits, min(settings.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if settings.top_p < 1.0:
        ordered, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(ordered, dim=-1).cumsum(dim=-1)
        drop = cumulative - torch.softmax(ordered, dim=-1) >= settings.top_p  # keep the first token always
        logits[order[drop]] = float("-inf")
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.inference_mode()
def stream_tokens(
    model,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor | None = None,
    settings: GenerationSettings | None = None,
    stop_ids: Sequence[int] = (),
) -> Iterator[int]:
    """Yield new token ids one by one (a stop token is not yielded). `input_ids` is (1, S)."""
    settings = settings or GenerationSettings()
    device = getattr(model, "compute_device", None) or next(model.parameters()).device
    ids = input_ids.to(device)
    if pixel_values is not None:
        pixel_values = pixel_values.to(device)
    generator = None
    if settings.seed is not None:
        generator = torch.Generator(device=device).manual_seed(settings.seed)
    stops = set(stop_ids)
    cache = DynamicCache() if settings.use_cache else None
    logits = model(input_ids=ids, pixel_values=pixel_values, cache=cache, use_cache=settings.use_cache).logits
    for _ in range(settings.max_new_tokens):
        token = _next_token(logits[0, -1], ids[0], settings, generator)
        if token in stops:
            return
        yield token
        step = torch.tensor([[token]], device=device)
        ids = torch.cat((ids, step), dim=1)
        if settings.use_cache:
            logits = model(input_ids=step, cache=cache, use_cache=True).logits
        else:
            logits = model(input_ids=ids, pixel_values=pixel_values, use_cache=False).logits


def generate(model, input_ids, pixel_values=None, settings=None, stop_ids=()) -> list[int]:
    return list(stream_tokens(model, input_ids, pixel_values, settings, stop_ids))


class TextStream:
    """Turns a stream of token ids into text pieces, holding back incomplete UTF-8 sequences and
    dropping control and picture tokens a model may emit; grounding tokens (`<ref>`, `<box>` …) stay.
    A family with another tokenizer overrides `control_ids` and `decode` (families/hf_vl_chat.py)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.control = self.control_ids(tokenizer)
        self.ids: list[int] = []
        self.text = ""

    def control_ids(self, tokenizer) -> set[int]:
        kept = (REF_START, REF_END, BOX_START, BOX_END, QUAD_START, QUAD_END)
        return set(tokenizer.special_ids.values()) - {tokenizer.special_ids[t] for t in kept}

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def push(self, token: int) -> str:
        if token in self.control:
            return ""
        self.ids.append(token)
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        piece, self.text = text[len(self.text) :], text
        return piece


class PictureConversation:
    """What every chat session shares: `history` of (query, answer) pairs whose queries carry their
    `Picture N: <img>…</img>\\n` markup, numbered across the conversation. A session gives `stream_query`."""

    history: list[tuple[str, str]]

    @property
    def pictures(self) -> int:
        return pictures_in_history(self.history)

    def make_query(self, text: str, images: Sequence[str] = ()) -> str:
        return query_with_pictures(self.history, text, images)

    def stream(
        self, text: str, images: Sequence[str] = (), settings: GenerationSettings | None = None
    ) -> Iterator[str]:
        """Yield the answer as it is generated; the exchange joins the history once it completes."""
        yield from self.stream_query(self.make_query(text, images), settings)

    def ask(self, text: str, images: Sequence[str] = (), settings: GenerationSettings | None = None) -> str:
        for _ in self.stream(text, images, settings):
            pass
        return self.history[-1][1]


@dataclass
class ChatSession(PictureConversation):
    """A conversation with a model: `history` holds (query, response) pairs, the queries with their
    `Picture N: <img>…</img>\\n` markup, numbered across the whole conversation."""

    model: object
    processor: QwenVLProcessor
    chat_format: str = "chatml"
    max_window_size: int = 6144
    history: list[tuple[str, str]] = field(default_factory=list)

    def prompt(self, query: str) -> dict:
        if self.chat_format == "raw":
            return self.processor.tensors(self.processor.template.encode_raw(query))
        history = list(self.history)
        while True:
            turns = [t for q, r in history for t in (("user", q), ("assistant", r))] + [("user", query)]
            encoded = encode_prompt(self.processor.template, turns)
            if len(encoded) <= self.max_window_size or not history:
                break
            history.pop(0)  # drop the oldest exchange, as upstream does past max_window_size
        return self.processor.tensors(encoded)

    def stop_ids(self) -> list[int]:
        tok = self.processor.tokenizer
        return [tok.special_ids[IM_END], tok.special_ids[IM_START], tok.eod_id]

    def stream_query(self, query: str, settings: GenerationSettings | None = None) -> Iterator[str]:
        """`stream` for a query that already holds its picture markup (to regenerate an answer)."""
        inputs = self.prompt(query)
        tokenizer = self.processor.tokenizer
        settings = replace(
            settings or GenerationSettings(),
            vocab_limit=len(tokenizer),
            suppress_ids=(tokenizer.img_start_id, tokenizer.img_end_id, tokenizer.img_pad_id),
        )
        decoder = TextStream(tokenizer)
        for token in stream_tokens(self.model, inputs["input_ids"], inputs["pixel_values"], settings, self.stop_ids()):
            piece = decoder.push(token)
            if piece:
                yield piece
        self.history.append((query, decoder.text.strip()))
