"""Asking a Qwen2-VL / Qwen2.5-VL / Qwen3-VL model: the processor (prompt → tensors) and the chat session.

The interface is v1's (`model/processor.py::QwenVLProcessor`, `model/generation.py::ChatSession`), so chat, eval,
serve-ui, merge --verify and eval during training drive these families unchanged:

- the prompt is encoded by the family's own `VisionTemplate` (the one training uses) followed by
  `<|im_start|>assistant\\n`; pictures become the image processor's flattened patches and `image_grid_thw`;
- decoding is transformers' `model.generate` (M-RoPE rope deltas, KV cache) in a worker thread whose tokens are
  streamed as text pieces; stopping the iteration early stops generation (a StoppingCriteria flag);
- answers keep the family's grounding tokens (`<|object_ref_start|>`, `<|box_start|>` …) and drop control
  tokens (`<|im_end|>`, `<|endoftext|>`, picture tokens).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..model.generation import PictureConversation, TextStream
from ..schemas import GenerationSettings

PICTURE_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<|vision_pad|>")
CONTROL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", *PICTURE_TOKENS)


class VisionProcessor:
    """Conversations → model tensors for asking: `input_ids`, `attention_mask`, `mm_token_type_ids`,
    `pixel_values`, `image_grid_thw` (shape (1, S) for the text)."""

    def __init__(self, template, tokenizer, config, image_processor, image_root: Path | None = None):
        """`template`: the family's `VisionTemplate`; `image_processor`: the folder's (hf_vl.image_processor)."""
        self.tokenizer = tokenizer
        self.config = config
        self.image_root = Path(image_root) if image_root is not None else None
        self.template = template
        self.image_processor = image_processor
        self.pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")

    def prompt(self, turns: Sequence[tuple[str, str]]):
        """`turns` (ending with the user's) encoded, followed by `<|im_start|>assistant\\n`."""
        encoded = self.template.encode(turns)
        head = self.template.heads["assistant"]
        encoded.input_ids.extend(head)
        encoded.labels.extend([-100] * len(head))
        return encoded

    def pictures(self, paths: Sequence[str]):
        """(pixel_values, image_grid_thw) of the pictures, or (None, None)."""
        if not paths:
            return None, None
        from ..images import load_image

        pictures = [load_image(path, self.image_root).convert("RGB") for path in paths]
        features = self.image_processor(images=pictures, return_tensors="pt")
        return features["pixel_values"], features["image_grid_thw"]

    def tensors(self, encoded, with_images: bool = True) -> dict:
        import torch

        ids = torch.tensor([encoded.input_ids], dtype=torch.long)
        pixels, grid = self.pictures(encoded.image_paths) if with_images else (None, None)
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "labels": torch.tensor([encoded.labels], dtype=torch.long),
            "mm_token_type_ids": (ids == self.template.image_pad).long(),
            "pixel_values": pixels,
            "image_grid_thw": grid,
            "image_paths": list(encoded.image_paths),
        }

    def encode_prompt(self, turns: Sequence[tuple[str, str]], with_images: bool = True) -> dict:
        """A generation prompt ending with `<|im_start|>assistant\\n`, as tensors."""
        return self.tensors(self.prompt(turns), with_images)

    def encode(self, turns: Sequence[tuple[str, str]], with_images: bool = True) -> dict:
        """A whole conversation (training layout) as tensors."""
        return self.tensors(self.template.encode(turns), with_images)


def model_inputs(batch: dict, device=None) -> dict:
    """The keys of a `VisionProcessor` batch the model takes (None values left out), on `device`."""
    names = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")
    out = {name: batch[name] for name in names if batch.get(name) is not None}
    return {name: value.to(device) for name, value in out.items()} if device is not None else out


class _Stopped(Exception):
    pass


def _streamer_class():
    from transformers.generation.streamers import BaseStreamer

    class TokenQueue(BaseStreamer):
        """Hands each new token id to the reading thread; the prompt (the first `put`) is skipped."""

        def __init__(self):
            self.tokens: queue.Queue = queue.Queue()
            self.prompt_seen = False

        def put(self, value):
            if not self.prompt_seen:
                self.prompt_seen = True
                return
            for token in value.reshape(-1).tolist():
                self.tokens.put(int(token))

        def end(self):
            self.tokens.put(None)

    return TokenQueue


def _stop_flag_criteria(flag: threading.Event):
    from transformers import StoppingCriteria

    class StopWhenAsked(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            import torch

            return torch.full((input_ids.shape[0],), flag.is_set(), dtype=torch.bool, device=input_ids.device)

    return StopWhenAsked()


def _eos_ids(generation: dict[str, Any], tokenizer) -> list[int]:
    eos = generation.get("eos_token_id")
    if eos is None:
        eos = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    return [int(i) for i in (eos if isinstance(eos, list | tuple) else [eos])]


def never_generated(model, tokenizer) -> list[int]:
    """Ids an answer must not hold: the embedding rows past the tokenizer (padding rows of the official vocab)
    and the picture tokens, which only the processor places."""
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    rows = int(getattr(text_config, "vocab_size", 0) or len(tokenizer))
    pictures = {tokenizer.convert_tokens_to_ids(t) for t in PICTURE_TOKENS} - {None, tokenizer.unk_token_id}
    return sorted(pictures | set(range(len(tokenizer), rows)))


def stream_token_ids(
    model, inputs: dict, settings: GenerationSettings, eos: Sequence[int], pad: int, suppress: Sequence[int] = ()
) -> Iterator[int]:
    """New token ids from `model.generate` as they come (eos not yielded; `suppress` never generated). Closing
    the iterator early sets the stopping flag and waits for the generation thread to end."""
    import torch

    device = getattr(model, "device", None) or next(model.parameters()).device
    streamer = _streamer_class()()
    stop = threading.Event()
    options: dict[str, Any] = {
        "max_new_tokens": settings.max_new_tokens,
        "eos_token_id": list(eos),
        "pad_token_id": pad,
        "repetition_penalty": settings.repetition_penalty,
        "use_cache": settings.use_cache,
    }
    if suppress:
        options["suppress_tokens"] = list(suppress)
    if settings.temperature > 0:
        options.update(do_sample=True, temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k)
    else:
        options.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    from transformers import StoppingCriteriaList

    failure: list[BaseException] = []

    def work():
        try:
            if settings.seed is not None:
                torch.manual_seed(settings.seed)
            with torch.inference_mode():
                model.generate(
                    **model_inputs(inputs, device),
                    streamer=streamer,
                    stopping_criteria=StoppingCriteriaList([_stop_flag_criteria(stop)]),
                    **options,
                )
        except BaseException as exc:  # handed to the reading thread
            failure.append(exc)
            streamer.tokens.put(None)

    worker = threading.Thread(target=work, name="qwenvl-generate", daemon=True)
    worker.start()
    stops = set(eos)
    try:
        while True:
            token = streamer.tokens.get()
            if token is None:
                break
            if token in stops:
                continue
            yield token
    finally:
        stop.set()
        worker.join()
    if failure:
        raise failure[0]


class PieceDecoder(TextStream):
    """Token ids → text pieces for the newer families' tokenizers: their control tokens dropped, grounding
    tokens kept, incomplete UTF-8 held back (`TextStream`'s rules)."""

    def control_ids(self, tokenizer) -> set[int]:
        return {tokenizer.convert_tokens_to_ids(t) for t in CONTROL_TOKENS} - {None, tokenizer.unk_token_id}

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


@dataclass
class VisionChatSession(PictureConversation):
    """A conversation with a Qwen2-VL-family model: `history` holds (query, answer) pairs, the queries with
    their `Picture N: <img>…</img>\\n` markup numbered across the conversation, the answers as the model wrote
    them (its own box convention)."""

    model: Any
    processor: VisionProcessor
    generation: dict[str, Any] = field(default_factory=dict)
    history: list[tuple[str, str]] = field(default_factory=list)

    def prompt(self, query: str) -> dict:
        turns = [t for q, r in self.history for t in (("user", q), ("assistant", r))] + [("user", query)]
        return self.processor.encode_prompt(turns)

    def stream_query(self, query: str, settings: GenerationSettings | None = None) -> Iterator[str]:
        """`stream` for a query that already holds its picture markup (to regenerate an answer)."""
        inputs = self.prompt(query)
        tokenizer = self.processor.tokenizer
        decoder = PieceDecoder(tokenizer)
        eos = _eos_ids(self.generation, tokenizer)
        suppress = never_generated(self.model, tokenizer)
        tokens = stream_token_ids(
            self.model, inputs, settings or GenerationSettings(), eos, self.processor.pad_id, suppress
        )
        try:
            for token in tokens:
                piece = decoder.push(token)
                if piece:
                    yield piece
        finally:
            tokens.close()
        self.history.append((query, decoder.text.strip()))
