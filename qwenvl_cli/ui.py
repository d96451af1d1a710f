"""`qwenvl serve-ui`: a Gradio page over the chat session of `qwenvl chat` (`chat.Conversation`).

Every browser tab gets its own `PageSession` (kept in a `gr.State`): a `Conversation` over the one loaded
model, the pictures drawn for grounded answers, and the answer being written now. `ChatPage` holds the
handlers of the page; they are plain functions of plain values, so tests drive them without a browser.
One model answers one question at a time: the generating events share one queue slot.

Gradio is an optional extra (`pip install "qwenvl[ui]"`); this module imports it only to build the page.
"""

from __future__ import annotations

import html
import logging
import shutil
import signal
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from .chat import ChatAnswer, Conversation, check_settings
from .errors import QwenvlError
from .schemas import GenerationSettings

log = logging.getLogger("qwenvl.ui")

INSTALL_HINT = 'Install the web UI extra: pip install "qwenvl[ui]" (it brings Gradio)'
MB = 1024 * 1024  # as Gradio counts them
QUEUE_SLOT = "model"  # the events that run the model share one concurrency slot: one answer at a time


def require_gradio():
    """The gradio module, or a QwenvlError naming the extra to install."""
    try:
        import gradio
    except ImportError as exc:
        raise QwenvlError(f"qwenvl serve-ui needs Gradio, which is not installed ({exc})", INSTALL_HINT) from None
    return gradio


def parse_auth(text: str | None) -> tuple[str, str] | None:
    """`USER:PASS` as (user, password); the password may hold colons. The value is never echoed back."""
    if text is None:
        return None
    user, colon, password = text.partition(":")
    if not colon or not user.strip() or not password:
        raise QwenvlError(
            "--auth needs a user name and a password separated by a colon (USER:PASS)",
            "Pass for example --auth alice:long-secret, or set QWENVL_UI_AUTH=alice:long-secret",
        )
    return user.strip(), password


@dataclass
class ServeOptions:
    model: Path
    adapter: Path | None = None
    host: str = "127.0.0.1"
    port: int = 7860
    share: bool = False
    auth: tuple[str, str] | None = None
    max_upload_mb: float = 20.0
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    system: str | None = None


def exposure_notes(options: ServeOptions) -> list[str]:
    """Warnings about who can reach the page, printed before it starts."""
    notes = []
    if options.host not in ("127.0.0.1", "localhost", "::1") and options.auth is None:
        notes.append(
            f"--host {options.host}: anyone who can reach this machine can use the model and upload files; "
            "add --auth USER:PASS"
        )
    if options.share:
        notes.append(
            "--share: the page gets a public https://*.gradio.live address through Gradio's servers"
            + ("" if options.auth else "; anyone with the link can use it (add --auth USER:PASS)")
        )
    return notes


# --------------------------------------------------------------------------------------------------
# One browser tab's chat


class PageUpdate(NamedTuple):
    """What a handler gives the page: the chat, the tab's session, the question box and a notice line."""

    chat: list[dict]
    session: PageSession
    question: Any  # new text of the question box, or gr.skip() to leave it as it is
    notice: str


class PageSession:
    """One tab's chat: its `Conversation`, the boxes drawn for each grounded answer (by exchange index),
    and the answer being written now (`running`), which Stop or Clear ends from another request."""

    def __init__(self, conversation: Conversation, picture_dir: Path):
        self.conversation = conversation
        self.picture_dir = picture_dir
        self.drawn: dict[int, tuple[ChatAnswer, int]] = {}  # exchange index -> (boxes, picture number)
        self.lock = threading.Lock()  # held while the model writes one piece; `stop` waits for it
        self.running: Iterator[str] | None = None
        self.question: str | None = None  # the text being answered, handed back when stopped
        self.after_stop: PageUpdate | None = None  # what the stopped answering request shows last
        self.writing: dict = {}  # chat_messages() arguments that show the answer being written

    def current_chat(self) -> list[dict]:
        """The chat as the page shows it now, with the answer being written if there is one."""
        return chat_messages(self, **self.writing) if self.running is not None else chat_messages(self)

    def stop(self, view: Callable[[], PageUpdate] | None = None) -> PageUpdate | None:
        """End the answer being written, if any: then `view()`, which the stopping request shows and the
        answering request shows last too (so the order their updates reach the page does not matter).
        As in `qwenvl chat`, the conversation keeps neither the question nor the partial answer, and the
        question's pictures wait for the next message (a regenerated answer: the old one stays)."""
        with self.lock:
            running, self.running = self.running, None
            if running is None:
                return None
            running.close()
            self.after_stop = view() if view is not None else None
            return self.after_stop

    def forget(self) -> None:
        """Empty the conversation (the answer being written is stopped first)."""
        self.stop()
        self.conversation.clear()
        self.drawn.clear()
        shutil.rmtree(self.picture_dir, ignore_errors=True)


def _keep() -> Any:
    """Leave a component as it is."""
    import gradio

    return gradio.skip()


# --------------------------------------------------------------------------------------------------
# The chat as messages for gr.Chatbot (Gradio's "messages" format)


def shown_text(text: str) -> str:
    """Model or user text for the chat: `<ref>`/`<box>` markup stays visible instead of being taken
    for HTML tags."""
    return html.escape(text, quote=False)


def _user_messages(query: str, first_picture: int) -> tuple[list[dict], int]:
    """A query (with its `Picture N: <img>…</img>` markup) as messages; and the number of pictures in it."""
    from .markup import scan_markup

    messages, text, count = [], [], 0
    for span in scan_markup(query).spans:
        if span.kind == "img":
            number = span.number or first_picture + count
            messages.append({"role": "user", "content": [f"Picture {number}", {"path": span.content}]})
            count += 1
        else:
            text.append(query[span.start : span.end])
    words = "".join(text).strip()
    if words:
        messages.append({"role": "user", "content": shown_text(words)})
    return messages, count


def _answer_message(answer: str, drawn: tuple[ChatAnswer, int] | None) -> dict:
    if drawn is None or not drawn[0].image_with_boxes:
        return {"role": "assistant", "content": shown_text(answer) or "*(an empty answer)*"}
    result, number = drawn
    boxes = " · ".join(
        f"{shown_text(box.ref or f'box {index}')} {box.box_pixels}" for index, box in enumerate(result.boxes, 1)
    )
    caption = f"{len(result.boxes)} box{'es' if len(result.boxes) > 1 else ''} on Picture {number} (pixels): {boxes}"
    return {
        "role": "assistant",
        "content": [shown_text(answer), {"path": result.image_with_boxes, "alt_text": caption}, caption],
    }


def chat_messages(
    session: PageSession,
    asked: str | None = None,
    partial: str | None = None,
    failure: str | None = None,
    exchanges: int | None = None,
    attached: list[str] | None = None,
) -> list[dict]:
    """The conversation as the page shows it: each exchange (pictures, question, answer with its boxes drawn;
    the first `exchanges` only when given), then the question being answered (`asked`, with `partial` or
    `failure`), then the pictures attached for the next message (`attached`, default: the pending ones)."""
    messages, pictures = [], 0
    history = session.conversation.session.history
    for index, (query, answer) in enumerate(history[:exchanges]):
        shown, count = _user_messages(query, pictures + 1)
        messages += [*shown, _answer_message(answer, session.drawn.get(index))]
        pictures += count
    if asked is not None:
        shown, count = _user_messages(asked, pictures + 1)
        messages += shown
        pictures += count
        if failure is not None:
            messages.append({"role": "assistant", "content": failure})
        elif partial is not None:
            messages.append({"role": "assistant", "content": shown_text(partial) + " ▍"})
    for offset, picture in enumerate(session.conversation.pending if attached is None else attached, 1):
        caption = f"Picture {pictures + offset} (goes with your next message)"
        messages.append({"role": "user", "content": [caption, {"path": picture}]})
    return messages


# --------------------------------------------------------------------------------------------------
# The handlers


class ChatPage:
    """The page's handlers over one loaded model. `new_session` makes a tab's chat; every handler takes the
    tab's session (None on its first event) and returns a `PageUpdate` (the answering ones yield them)."""

    def __init__(
        self,
        loaded,
        title: str,
        settings: GenerationSettings | None = None,
        picture_dir: Path | None = None,
        max_upload_mb: float = 20.0,
        system: str | None = None,
    ):
        self.loaded = loaded
        self.title = title
        self.settings = settings or GenerationSettings()
        self.picture_dir = Path(picture_dir or tempfile.mkdtemp(prefix="qwenvl-ui-"))
        self.max_upload_mb = max_upload_mb
        self.system = system

    def new_session(self) -> PageSession:
        conversation = Conversation(self.loaded, None, self.system or None)  # empty: the family default
        return PageSession(conversation, self.picture_dir / uuid.uuid4().hex)

    def read_settings(self, max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed) -> GenerationSettings:
        """The page's generation settings, checked as `qwenvl chat` checks its flags."""
        try:
            settings = GenerationSettings(
                max_new_tokens=int(max_new_tokens),
                temperature=float(temperature),
                top_p=float(top_p),
                top_k=int(top_k),
                repetition_penalty=float(repetition_penalty),
                seed=None if seed is None or str(seed).strip() == "" else int(str(seed).strip()),
            )
        except (TypeError, ValueError) as exc:
            raise QwenvlError(
                f"a generation setting is not a number ({exc})", "Correct it under Generation settings"
            ) from None
        check_settings(settings)
        return settings

    # --- pictures, clear, stop -------------------------------------------------------------------

    def upload(self, files, session: PageSession | None) -> PageUpdate:
        """Attach uploaded pictures to the next message; a file that is too large or not a picture is named."""
        session = session or self.new_session()
        problems = []
        for file in files if isinstance(files, list | tuple) else [files]:
            if file is None:
                continue
            path = Path(file if isinstance(file, str) else file["path"])  # Gradio gives paths; a client, dicts
            megabytes = path.stat().st_size / MB if path.is_file() else 0.0
            if megabytes > self.max_upload_mb:
                problems.append(f"{path.name} is {megabytes:.1f} MB, above the {self.max_upload_mb:g} MB limit")
                continue
            try:
                session.conversation.attach(str(path))
            except QwenvlError:
                problems.append(f"{path.name} is not a picture that can be read (PNG, JPEG, WebP, GIF, BMP…)")
        attached = len(session.conversation.pending)
        if problems:
            notice = "⚠ Not added: " + "; ".join(shown_text(p) for p in problems) + "."
        else:
            notice = f"{attached} picture{'s' if attached != 1 else ''} attached: they go with your next message."
        return PageUpdate(session.current_chat(), session, _keep(), notice)

    def clear(self, session: PageSession | None) -> PageUpdate:
        session = session or self.new_session()

        def cleared() -> PageUpdate:
            session.conversation.clear()
            session.drawn.clear()
            shutil.rmtree(session.picture_dir, ignore_errors=True)
            return PageUpdate([], session, "", "Conversation cleared: pictures are numbered from 1 again.")

        return session.stop(cleared) or cleared()

    def stop(self, session: PageSession | None) -> PageUpdate:
        session = session or self.new_session()
        question = session.question

        def stopped() -> PageUpdate:
            if question is None:
                return PageUpdate(chat_messages(session), session, _keep(), "Stopped: the previous answer is kept.")
            pictures = " and its pictures stay attached" if session.conversation.pending else ""
            notice = f"Stopped: the unanswered question is back in the box{pictures}."
            return PageUpdate(chat_messages(session), session, question, notice)

        return session.stop(stopped) or PageUpdate(chat_messages(session), session, _keep(), "")

    # --- answers -----------------------------------------------------------------------------------

    def ask(self, text: str, session: PageSession | None, *settings_values) -> Iterator[PageUpdate]:
        """Answer `text` with the attached pictures, streaming: one update per piece written."""
        session = session or self.new_session()
        text = (text or "").strip()
        conversation = session.conversation
        if not text and not conversation.pending:
            yield PageUpdate(chat_messages(session), session, _keep(), "Type a question (or upload a picture first).")
            return
        if "<img>" in text or "</img>" in text:
            yield PageUpdate(
                chat_messages(session),
                session,
                _keep(),
                "⚠ Pictures come in through *Upload pictures*; `<img>` tags cannot be typed in a question.",
            )
            return
        try:
            settings = self.read_settings(*settings_values)
        except QwenvlError as exc:
            yield PageUpdate(chat_messages(session), session, _keep(), f"⚠ {shown_text(str(exc))}")
            return
        session.stop()  # an answer whose page went away while it was written: its pictures come back
        asked = conversation.session.make_query(text, conversation.pending)
        yield from self._answer(session, conversation.stream(text, settings), asked, text)

    def regenerate(self, session: PageSession | None, *settings_values) -> Iterator[PageUpdate]:
        """Answer the last question again, streaming; the old answer stays if this one is stopped or fails."""
        session = session or self.new_session()
        session.stop()
        history = session.conversation.session.history
        if not history:
            yield PageUpdate(
                chat_messages(session), session, _keep(), "Nothing to regenerate yet: ask something first."
            )
            return
        try:
            settings = self.read_settings(*settings_values)
        except QwenvlError as exc:
            yield PageUpdate(chat_messages(session), session, _keep(), f"⚠ {shown_text(str(exc))}")
            return
        asked = history[-1][0]
        yield from self._answer(session, session.conversation.regenerate(settings), asked, None)

    def _answer(
        self, session: PageSession, stream: Iterator[str], asked: str, question: str | None
    ) -> Iterator[PageUpdate]:
        with session.lock:
            session.running, session.question = stream, question
        history = session.conversation.session.history
        index = len(history) - (question is None)  # where the answer will stand (regenerate: the last one)
        started, partial = time.perf_counter(), ""
        # Until the stream starts, the pictures it will take are still pending: `asked` shows them already.
        attached = [] if question is not None else None
        emptied = "" if question is not None else _keep()
        session.writing = {"asked": asked, "partial": partial, "exchanges": index, "attached": attached}
        yield PageUpdate(chat_messages(session, **session.writing), session, emptied, "Writing…")
        while True:
            try:
                with session.lock:
                    if session.running is not stream:  # stopped by another request, which left its view
                        stopped = session.after_stop
                        break
                    piece = next(stream, None)
                    if piece is None:  # complete: the exchange is in the history
                        session.running = None
                        self._draw_boxes(session, index)
            except Exception as exc:
                with session.lock:
                    session.running = None
                yield self._failed(session, question, exc)
                return
            if piece is None:
                yield PageUpdate(
                    chat_messages(session), session, _keep(), f"Answered in {time.perf_counter() - started:.1f} s."
                )
                return
            partial += piece
            session.writing = {"asked": asked, "partial": partial, "exchanges": index}
            yield PageUpdate(chat_messages(session, **session.writing), session, _keep(), "Writing…")
        if stopped is not None:
            yield stopped

    @staticmethod
    def _draw_boxes(session: PageSession, index: int) -> None:
        """The boxes of answer `index` drawn on the latest picture, as `qwenvl chat` draws them."""
        session.drawn.pop(index, None)
        try:
            grounded = session.conversation.grounding(
                session.conversation.session.history[index][1], session.picture_dir
            )
        except Exception as exc:  # the answer stands; only its drawing failed
            log.warning("drawing the boxes failed: %s", exc)
            return
        if grounded.boxes:
            session.drawn[index] = (grounded, len(session.conversation.pictures()))

    def _failed(self, session: PageSession, question: str | None, exc: Exception) -> PageUpdate:
        """An error while answering, as a message at the end of the chat; the conversation is as before."""
        log.warning("answering failed: %s: %s", type(exc).__name__, exc, exc_info=not isinstance(exc, QwenvlError))
        _release_cuda_memory()
        what = str(exc) if isinstance(exc, QwenvlError) else f"{type(exc).__name__}: {exc}"
        if question is None:
            kept = "The previous answer is kept"
        else:
            kept = "The question was not kept: it is back in the box"
            kept += ", its pictures stay attached" if session.conversation.pending else ""
        failure = f"⚠ **The answer failed**: {shown_text(what)}\n\n{kept}. Try again, or change the settings."
        shown = [*chat_messages(session), {"role": "assistant", "content": failure}]
        return PageUpdate(shown, session, question if question is not None else _keep(), "⚠ The answer failed.")


def _release_cuda_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------
# The page

CSS = """
#qwenvl-chat .message img { max-height: 360px; width: auto; }
#qwenvl-notice { min-height: 1.5em; }
"""


def build_app(page: ChatPage):
    """The Gradio Blocks of the page (not launched)."""
    gr = require_gradio()
    s = page.settings
    with gr.Blocks(title="qwenvl serve-ui", analytics_enabled=False) as demo:
        session = gr.State(None, delete_callback=lambda value: value is not None and value.forget())
        gr.Markdown(f"## qwenvl · {shown_text(page.title)}", elem_id="qwenvl-title")
        chatbot = gr.Chatbot(
            label="Chat",
            elem_id="qwenvl-chat",
            height="68vh",
            min_height=420,
            buttons=["copy", "copy_all"],
            feedback_options=None,
            placeholder="Upload pictures, then ask about them. Pictures are numbered Picture 1, 2, … "
            "across the conversation; boxes in an answer are drawn on the latest picture.",
        )
        notice = gr.Markdown("", elem_id="qwenvl-notice")
        with gr.Row():
            question = gr.Textbox(
                show_label=False,
                placeholder="Ask about the pictures (Enter sends)",
                scale=6,
                elem_id="qwenvl-question",
                autofocus=True,
            )
            send = gr.Button("Send", variant="primary", scale=1, elem_id="qwenvl-send")
        with gr.Row():
            upload = gr.UploadButton(
                "Upload pictures", file_types=["image"], file_count="multiple", elem_id="qwenvl-upload"
            )
            regenerate = gr.Button("Regenerate", elem_id="qwenvl-regenerate")
            stop = gr.Button("Stop", variant="stop", elem_id="qwenvl-stop")
            clear = gr.Button("Clear", elem_id="qwenvl-clear")
        with gr.Accordion("Generation settings", open=False):
            with gr.Row():
                max_new_tokens = gr.Slider(
                    1, max(2048, s.max_new_tokens), s.max_new_tokens, step=1, label="max new tokens"
                )
                temperature = gr.Slider(
                    0.0, max(2.0, s.temperature), s.temperature, step=0.05, label="temperature (0: greedy)"
                )
                top_p = gr.Slider(0.01, 1.0, s.top_p, step=0.01, label="top-p")
            with gr.Row():
                top_k = gr.Slider(0, max(200, s.top_k), s.top_k, step=1, label="top-k (0: off)")
                repetition_penalty = gr.Slider(
                    0.5, max(2.0, s.repetition_penalty), s.repetition_penalty, step=0.01, label="repetition penalty"
                )
                seed = gr.Textbox("" if s.seed is None else str(s.seed), label="seed", placeholder="empty: random")
        settings = [max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed]
        outputs = [chatbot, session, question, notice]

        answering = {"concurrency_id": QUEUE_SLOT, "concurrency_limit": 1, "show_progress": "minimal"}
        light = {"concurrency_limit": None, "show_progress": "hidden"}
        for trigger in (question.submit, send.click):
            trigger(page.ask, [question, session, *settings], outputs, **answering)
        regenerate.click(page.regenerate, [session, *settings], outputs, **answering)
        upload.upload(page.upload, [upload, session], outputs, **light)
        # Stop and Clear end a running answer through the session, not with Gradio's `cancels`: a cancelled
        # event's last update could reach the page after theirs; this way both requests end on the same view.
        for trigger in (clear.click, chatbot.clear):  # the chat's own trash icon clears the conversation too
            trigger(page.clear, [session], outputs, **light)
        stop.click(page.stop, [session], outputs, **light)
    return demo


def launch(page: ChatPage, host: str, port: int, share: bool, auth, max_upload_mb: float):
    """Build the page and serve it in the background; the launched Blocks (`.local_url`, `.share_url`)."""
    demo = build_app(page)
    demo.queue(default_concurrency_limit=1)
    # Gradio's queue estimates waiting times with pandas, which warns about its own deprecations: not ours to fix.
    warnings.filterwarnings("ignore", module=r"gradio\.queueing")
    try:
        demo.launch(
            server_name=host,
            server_port=port,
            share=share,
            auth=auth,
            max_file_size=max(1, round(max_upload_mb * MB)),
            prevent_thread_lock=True,
            quiet=True,
            show_error=False,
            ssr_mode=False,
            css=CSS,
        )
    except OSError as exc:
        raise QwenvlError(
            f"cannot serve on {host}:{port} ({exc})".replace("..", "."),
            "Pass another --port, or stop the program that uses this one",
        ) from None
    return demo


def serve(options: ServeOptions, on_ready: Callable[[str, str | None], None] | None = None) -> None:
    """Load the model, serve the page until Ctrl-C. `on_ready(local_url, share_url)` is called once it answers."""
    require_gradio()
    from .inference import load_for_inference

    loaded = load_for_inference(options.model, options.adapter)
    name = Path(options.model).resolve().name + (
        f" + {Path(options.adapter).resolve().name}" if options.adapter else ""
    )
    title = f"model {name} · {loaded.device} ({loaded.dtype})"
    page = ChatPage(loaded, title, options.settings, None, options.max_upload_mb, options.system)
    demo = launch(page, options.host, options.port, options.share, options.auth, options.max_upload_mb)
    terminate = _interrupt_on_sigterm()
    try:
        if on_ready is not None:
            on_ready(demo.local_url, demo.share_url)
        while demo.is_running:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        demo.close()
        shutil.rmtree(page.picture_dir, ignore_errors=True)
        if terminate is not None:
            signal.signal(signal.SIGTERM, terminate)


def _interrupt_on_sigterm():
    """Stop on SIGTERM (a service manager, `kill`) as on Ctrl-C; the previous handler, to restore."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, interrupt)
