"""`qwenvl chat`: talk to a checkpoint (and an adapter) with pictures; grounding boxes drawn on the picture.

The service holds the conversation (`Conversation`: a `ChatSession` plus the pictures waiting for the next
message and the system prompt), answers by streaming text pieces, and turns an answer's `<ref>`/`<box>`
markup into boxes in pixels drawn on the latest picture. The CLI (interactive or one-shot) and the web UI
render what it returns.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

from pydantic import BaseModel, Field

from .errors import QwenvlError
from .grounding import family_box_style as box_style
from .inference import LoadedModel, load_for_inference
from .schemas import GenerationSettings

BOX_COLOURS = ((230, 57, 70), (29, 122, 243), (46, 160, 67), (245, 159, 0), (142, 68, 173), (0, 150, 136))


class FoundBox(BaseModel):
    ref: str | None
    box_norm1000: list[int]  # x1, y1, x2, y2 in [0, 1000)
    box_pixels: list[int]  # the same on the picture, in pixels
    box_model: list[int | float] | None = None  # the numbers as the model wrote them (its family's convention)
    convention: str = "relative-1000"  # of box_model: "relative-1000" or "resized-pixels" (Qwen2.5-VL)


class ChatAnswer(BaseModel):
    """What `qwenvl chat --json` prints."""

    answer: str
    boxes: list[FoundBox] = Field(default_factory=list)
    image_with_boxes: str | None = None  # PNG of the latest picture with the boxes drawn, when there are boxes
    picture: str | None = None  # the picture the boxes refer to
    new_tokens: int = 0
    seconds: float = 0.0
    first_token_seconds: float | None = None


def check_settings(settings: GenerationSettings) -> None:
    """Refuse generation flags that cannot work, naming the flag."""
    problems = [
        (settings.max_new_tokens < 1, f"--max-new-tokens {settings.max_new_tokens}", "at least 1"),
        (settings.temperature < 0, f"--temperature {settings.temperature}", "0 (greedy) or more"),
        (not 0 < settings.top_p <= 1, f"--top-p {settings.top_p}", "in (0, 1]"),
        (settings.top_k < 0, f"--top-k {settings.top_k}", "0 (off) or more"),
        (settings.repetition_penalty <= 0, f"--repetition-penalty {settings.repetition_penalty}", "above 0"),
    ]
    for bad, what, wanted in problems:
        if bad:
            raise QwenvlError(f"{what} cannot be used", f"Give a value {wanted}")


def generation_settings(
    max_new_tokens: int, temperature: float, top_p: float, top_k: int, repetition_penalty: float, seed: int | None
) -> GenerationSettings:
    """The generation flags of `chat` and `serve-ui` as GenerationSettings, refused with the flag named when
    they cannot work."""
    settings = GenerationSettings(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        repetition_penalty=repetition_penalty,
        seed=seed,
    )
    check_settings(settings)
    return settings


class Conversation:
    """One chat: the model, the exchanges so far, pictures attached for the next message, the system prompt."""

    def __init__(self, loaded: LoadedModel, image_root: Path | None = None, system: str | None = None):
        """`system` None: the family's default system prompt."""
        self.loaded = loaded
        self.image_root = image_root
        self.processor = loaded.family.processor(loaded.tokenizer, loaded.config, image_root, system)
        self.session = loaded.family.chat_session(loaded.model, self.processor, loaded.generation)
        self.pending: list[str] = []  # pictures for the next message

    @property
    def system(self) -> str:
        return self.processor.template.system

    def set_system(self, text: str) -> None:
        processor = self.loaded.family.processor(self.loaded.tokenizer, self.loaded.config, self.image_root, text)
        self.processor = self.session.processor = processor

    def attach(self, picture: str) -> None:
        """Queue a picture (path or URL) for the next message; it is opened now so a broken one is named now."""
        from .images import load_image

        load_image(picture, self.image_root)
        self.pending.append(picture)

    def clear(self) -> None:
        self.session.history.clear()
        self.pending.clear()

    def pictures(self) -> list[str]:
        """Every picture of the conversation so far, in order (Picture 1, 2, …)."""
        found = []
        for query, _ in self.session.history:
            found += self._pictures_in(query)
        return found

    @staticmethod
    def _pictures_in(query: str) -> list[str]:
        from .markup import scan_markup

        return [span.content for span in scan_markup(query).spans if span.kind == "img"]

    def _resized(self, picture: str | None, style: str | None) -> tuple[int, int] | None:
        """(H′, W′) the processor resizes `picture` to, for the families whose boxes are in those pixels."""
        if picture is None or style != "absolute":
            return None
        return self.processor.template.resized(picture)

    def stream(self, text: str, settings: GenerationSettings) -> Iterator[str]:
        """Answer `text` (with the pending pictures), piece by piece; the exchange is kept once complete.
        Stopping the iteration early (Ctrl-C) keeps neither the question nor the partial answer."""
        pictures, self.pending = self.pending, []
        try:
            yield from self.session.stream(text, pictures, settings)
        except BaseException:
            self.pending = pictures + self.pending  # not answered: the pictures wait for the next message
            raise

    def regenerate(self, settings: GenerationSettings) -> Iterator[str]:
        """Answer the last question again (a different answer when sampling)."""
        if not self.session.history:
            raise QwenvlError("there is no answer to regenerate yet", "Ask something first")
        query, answer = self.session.history.pop()
        try:
            yield from self.session.stream_query(query, settings)
        except BaseException:
            if not self.session.history or self.session.history[-1][0] != query:
                self.session.history.append((query, answer))  # stopped: the old answer stays
            raise

    def save(self, path: Path) -> Path:
        """The conversation in the data format (a JSON list with one sample), ready to train on."""
        from .grounding import to_data_markup

        style = box_style(self.loaded.family)
        turns = []
        picture = None
        for query, answer in self.session.history:
            picture = (self._pictures_in(query) or [picture])[-1]
            if style is not None:  # the family's boxes back into the data format's <ref>/<box> markup
                answer = to_data_markup(answer, style, self._resized(picture, style))
            turns += [{"from": "user", "value": query}, {"from": "assistant", "value": answer}]
        sample = {"id": f"chat-{time.strftime('%Y%m%d-%H%M%S')}", "conversations": turns}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps([sample], ensure_ascii=False, indent=2) + "\n", "utf-8")
        return path

    def grounding(self, answer: str, save_dir: Path | None) -> ChatAnswer:
        """The boxes of `answer` in pixels of the latest picture, drawn there and saved as PNG in `save_dir`."""
        from .evaluate import extract_boxes
        from .grounding import CONVENTIONS, answer_boxes, to_pixels, to_relative

        style = box_style(self.loaded.family)
        pictures = self.pictures()
        if not pictures:
            return ChatAnswer(answer=answer, boxes=[])
        from .images import load_image

        picture = pictures[-1]
        if style is None:
            found = extract_boxes(answer)
            if not found:
                return ChatAnswer(answer=answer, boxes=[])
            image = load_image(picture, self.image_root)
            boxes = [
                FoundBox(
                    ref=ref,
                    box_norm1000=[box.x1, box.y1, box.x2, box.y2],
                    box_pixels=list(box.to_pixels(image.width, image.height)),
                    box_model=[box.x1, box.y1, box.x2, box.y2],
                )
                for ref, box in found
            ]
        else:
            family_boxes = answer_boxes(answer, style)
            if not family_boxes:
                return ChatAnswer(answer=answer, boxes=[])
            image = load_image(picture, self.image_root)
            resized = self._resized(picture, style)
            boxes = [
                FoundBox(
                    ref=box.label,
                    box_norm1000=list(to_relative(box.numbers, style, resized)),
                    box_pixels=list(to_pixels(box.numbers, style, image.width, image.height, resized)),
                    box_model=list(box.numbers),
                    convention=CONVENTIONS[style],
                )
                for box in family_boxes
            ]
        out = None
        if save_dir is not None:
            out = draw_boxes(image, boxes, Path(save_dir) / f"boxes-{time.strftime('%Y%m%d-%H%M%S')}-{id(answer)}.png")
        return ChatAnswer(answer=answer, boxes=boxes, image_with_boxes=str(out) if out else None, picture=picture)


def draw_boxes(image, boxes: list[FoundBox], path: Path) -> Path:
    """`image` with each box outlined and labelled with its ref, saved as PNG at `path`."""
    from PIL import ImageDraw, ImageFont

    canvas = image.convert("RGB").copy()
    pen = ImageDraw.Draw(canvas)
    width = max(2, round(min(canvas.size) / 150))
    font = ImageFont.load_default(size=max(12, round(min(canvas.size) / 28)))
    for index, box in enumerate(boxes):
        colour = BOX_COLOURS[index % len(BOX_COLOURS)]
        x1, y1, x2, y2 = box.box_pixels
        pen.rectangle((x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)), outline=colour, width=width)
        label = box.ref or f"box {index + 1}"
        left, top, right, bottom = pen.textbbox((0, 0), label, font=font)
        tag_y = y1 - (bottom - top) - 2 * width if y1 - (bottom - top) - 2 * width >= 0 else y1
        pen.rectangle((x1, tag_y, x1 + right - left + 2 * width, tag_y + bottom - top + 2 * width), fill=colour)
        pen.text((x1 + width, tag_y + width - top), label, fill=(255, 255, 255), font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG")
    return path


def open_conversation(
    model_dir: Path, adapter_dir: Path | None = None, image_root: Path | None = None, system: str | None = None
) -> Conversation:
    loaded = load_for_inference(model_dir, adapter_dir)
    return Conversation(loaded, image_root, system)


def ask_once(
    conversation: Conversation, text: str, settings: GenerationSettings, save_dir: Path | None, on_piece=None
) -> ChatAnswer:
    """One question (with the attached pictures): the answer, its boxes and timing."""
    started = time.perf_counter()
    first = None
    pieces = []
    for piece in conversation.stream(text, settings):
        if first is None:
            first = time.perf_counter() - started
        pieces.append(piece)
        if on_piece is not None:
            on_piece(piece)
    answer = conversation.session.history[-1][1]
    result = conversation.grounding(answer, save_dir)
    tokens = len(conversation.loaded.tokenizer.encode(answer)) if answer else 0
    return result.model_copy(
        update={
            "new_tokens": tokens,
            "seconds": round(time.perf_counter() - started, 3),
            "first_token_seconds": round(first, 3) if first is not None else None,
        }
    )
