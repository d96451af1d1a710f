"""`qwenvl serve-ui`: the page's handlers driven directly (pictures, streaming, boxes, regenerate, clear, stop,
failures, refusals), and the page in a real browser (headless Debian Chromium through playwright).

Where an answer must be known in advance (a grounded one, a slow one, a failing one), the model's stream is
replaced the way tests/test_chat.py replaces parts of it: `ChatSession.stream_query` yields fixed pieces and
keeps the exchange, as the real one does. Everything else runs the tiny model the project builds.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from qwenvl_cli.cli import app
from qwenvl_cli.errors import QwenvlError
from qwenvl_cli.model.generation import ChatSession, GenerationSettings
from qwenvl_cli.ui import ChatPage, ServeOptions, exposure_notes, parse_auth

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT = ROOT / "docs" / "images" / "serve-ui.png"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
GREEDY = (6, 0.0, 1.0, 0, 1.0, "")  # the page's settings: max new tokens, temperature, top-p, top-k, penalty, seed
RED_SQUARE, BLUE_CIRCLE = "<ref>the red square</ref><box>(62,100),(312,500)</box>", "<ref>the blue circle</ref>"
GROUNDED = f"{RED_SQUARE} and {BLUE_CIRCLE}<box>(562,350),(875,850)</box>"


@pytest.fixture(scope="module")
def loaded(models):
    from qwenvl_cli.inference import load_for_inference

    return load_for_inference(models / "tiny")


@pytest.fixture
def page(loaded, tmp_path):
    return ChatPage(loaded, "model tiny · cpu (fp32)", GenerationSettings(max_new_tokens=6), tmp_path / "drawn")


@pytest.fixture(scope="module")
def picture(tmp_path_factory) -> Path:
    """320×200: a red square and a blue circle, where GROUNDED's boxes are."""
    from PIL import ImageDraw

    path = tmp_path_factory.mktemp("pictures") / "shapes.png"
    image = Image.new("RGB", (320, 200), (246, 244, 238))
    pen = ImageDraw.Draw(image)
    pen.rectangle((20, 20, 99, 99), fill=(220, 40, 40))
    pen.ellipse((180, 70, 279, 169), fill=(40, 90, 220))
    image.save(path)
    return path


def scripted(monkeypatch, pieces: list[str], delay: float = 0.0, fail_after: int | None = None, endless=False):
    """Make the model 'write' `pieces` (every `delay` seconds); `fail_after`: raise after that many pieces."""

    def stream_query(self, query, settings=None):
        written = []
        for index in range(10**6 if endless else len(pieces)):
            if fail_after is not None and index == fail_after:
                raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
            time.sleep(delay)
            written.append(pieces[index % len(pieces)])
            yield written[-1]
        self.history.append((query, "".join(written).strip()))

    monkeypatch.setattr(ChatSession, "stream_query", stream_query)


def texts(chat: list[dict]) -> list[str]:
    """Every text part of the chat, in order."""
    found = []
    for message in chat:
        parts = message["content"] if isinstance(message["content"], list) else [message["content"]]
        found += [part for part in parts if isinstance(part, str)]
    return found


def files(chat: list[dict], role: str) -> list[str]:
    parts = [p for m in chat if m["role"] == role for p in (m["content"] if isinstance(m["content"], list) else [])]
    return [part["path"] for part in parts if isinstance(part, dict)]


# --- the handlers, without a browser ------------------------------------------------------------------


def test_pictures_are_numbered_across_the_conversation_as_the_chat_session_does(page, picture):
    update = page.upload([str(picture)], None)
    session = update.session
    assert texts(update.chat) == ["Picture 1 (goes with your next message)"]
    assert files(update.chat, "user") == [str(picture)] and "1 picture attached" in update.notice
    *_, last = page.ask("What is this?", session, *GREEDY)  # the real tiny model
    update = page.upload([str(picture), str(picture)], session)
    assert texts(update.chat)[:2] == ["Picture 1", "What is this?"]
    assert texts(update.chat)[-2:] == [f"Picture {n} (goes with your next message)" for n in (2, 3)]
    *_, last = page.ask("And these?", session, *GREEDY)
    queries = [query for query, _ in session.conversation.session.history]
    assert queries[0] == f"Picture 1: <img>{picture}</img>\nWhat is this?"
    assert queries[1] == f"Picture 2: <img>{picture}</img>\nPicture 3: <img>{picture}</img>\nAnd these?"
    assert [t for t in texts(last.chat) if t.startswith("Picture")] == ["Picture 1", "Picture 2", "Picture 3"]


def test_an_answer_streams_piece_by_piece_and_the_question_box_empties(page, picture, monkeypatch):
    scripted(monkeypatch, ["The ", "red ", "square."])
    session = page.upload([str(picture)], None).session
    updates = list(page.ask("  What is red?  ", session, *GREEDY))
    assert updates[0].question == "" and updates[0].notice == "Writing…"
    written = [texts(u.chat)[-1] for u in updates[1:-1]]
    assert written == ["The  ▍", "The red  ▍", "The red square. ▍"]  # the ▍ marks an answer being written
    assert texts(updates[-1].chat) == ["Picture 1", "What is red?", "The red square."]
    assert updates[-1].notice.startswith("Answered in")
    assert session.conversation.session.history[-1][1] == "The red square."


def test_a_grounded_answer_shows_the_picture_with_its_boxes(page, picture, monkeypatch):
    scripted(monkeypatch, [GROUNDED[:40], GROUNDED[40:]])
    session = page.upload([str(picture)], None).session
    *_, last = page.ask("Where are the shapes?", session, *GREEDY)
    answer = last.chat[-1]
    assert answer["role"] == "assistant"
    text, drawn, caption = answer["content"]
    assert text == "&lt;ref&gt;the red square&lt;/ref&gt;&lt;box&gt;(62,100),(312,500)&lt;/box&gt; and " + (
        "&lt;ref&gt;the blue circle&lt;/ref&gt;&lt;box&gt;(562,350),(875,850)&lt;/box&gt;"
    )  # the markup is shown, not taken for HTML tags
    boxes = "the red square [19, 20, 99, 100] · the blue circle [179, 70, 280, 170]"
    assert caption == f"2 boxes on Picture 1 (pixels): {boxes}"
    image = Image.open(drawn["path"]).convert("RGB")
    assert image.size == (320, 200) and Path(drawn["path"]).parent == session.picture_dir
    assert image.getpixel((19, 60)) != (246, 244, 238)  # the square's box is outlined on the picture
    assert image.getpixel((160, 60)) == (246, 244, 238)  # and the rest is the picture


def test_regenerate_replaces_the_last_answer(page, picture, monkeypatch):
    session = page.upload([str(picture)], None).session
    first = list(page.regenerate(session, *GREEDY))
    assert first[-1].notice.startswith("Nothing to regenerate")
    scripted(monkeypatch, ["First answer."])
    list(page.ask("Colour?", session, *GREEDY))
    scripted(monkeypatch, ["Second ", "answer."])
    updates = list(page.regenerate(session, *GREEDY))
    assert texts(updates[0].chat) == ["Picture 1", "Colour?", " ▍"]  # the old answer is gone while writing
    assert texts(updates[-1].chat) == ["Picture 1", "Colour?", "Second answer."]
    assert session.conversation.session.history == [(f"Picture 1: <img>{picture}</img>\nColour?", "Second answer.")]


def test_clear_empties_the_conversation(page, picture, monkeypatch):
    scripted(monkeypatch, [GROUNDED])
    session = page.upload([str(picture)], None).session
    list(page.ask("Where?", session, *GREEDY))
    page.upload([str(picture)], session)
    assert session.picture_dir.is_dir()
    update = page.clear(session)
    assert update.chat == [] and update.question == "" and "cleared" in update.notice
    assert session.conversation.session.history == [] and session.conversation.pending == []
    assert session.drawn == {} and not session.picture_dir.exists()
    assert texts(page.upload([str(picture)], session).chat) == ["Picture 1 (goes with your next message)"]


def test_a_failure_while_answering_is_a_message_and_the_next_question_works(page, picture, monkeypatch):
    scripted(monkeypatch, ["Half ", "an answer"], fail_after=1)
    session = page.upload([str(picture)], None).session
    *_, last = page.ask("Describe it.", session, *GREEDY)
    failure = last.chat[-1]
    assert failure["role"] == "assistant" and "The answer failed" in failure["content"]
    assert "RuntimeError: CUDA out of memory" in failure["content"] and "Traceback" not in failure["content"]
    assert last.question == "Describe it." and last.notice == "⚠ The answer failed."
    assert session.conversation.session.history == [] and session.conversation.pending == [str(picture)]
    monkeypatch.undo()  # the real model again
    *_, last = page.ask("Describe it.", session, *GREEDY)
    assert last.notice.startswith("Answered in") and len(session.conversation.session.history) == 1
    scripted(monkeypatch, ["x"], fail_after=0)
    *_, last = page.regenerate(session, *GREEDY)  # a failed regeneration keeps the previous answer
    assert "The previous answer is kept" in last.chat[-1]["content"]
    assert len(session.conversation.session.history) == 1 and texts(last.chat)[1] == "Describe it."


def answer_in_a_thread(page, session, question: str):
    """Ask as the page does, in a worker thread; (thread, updates, event set once a piece is shown)."""
    updates, first_piece = [], threading.Event()

    def answer():
        for update in page.ask(question, session, *GREEDY):
            updates.append(update)
            if any("word" in text for text in texts(update.chat)[-1:]):
                first_piece.set()

    worker = threading.Thread(target=answer)
    worker.start()
    assert first_piece.wait(10)
    return worker, updates


def test_stop_ends_the_answer_from_another_request(page, picture, monkeypatch):
    scripted(monkeypatch, ["word "], delay=0.02, endless=True)
    session = page.upload([str(picture)], None).session
    worker, updates = answer_in_a_thread(page, session, "Tell me everything.")
    during = page.upload([str(picture)], session)  # a picture for the next message, while this one is written
    assert texts(during.chat)[:2] == ["Picture 1", "Tell me everything."] and "word" in texts(during.chat)[2]
    assert texts(during.chat)[-1] == "Picture 2 (goes with your next message)"
    stopped = page.stop(session)
    worker.join(5)
    assert not worker.is_alive() and updates[-1] is stopped  # the answering request ends on the same view
    assert stopped.question == "Tell me everything."
    assert stopped.notice == "Stopped: the unanswered question is back in the box and its pictures stay attached."
    assert session.conversation.session.history == [] and session.conversation.pending == [str(picture)] * 2
    assert texts(stopped.chat) == [f"Picture {n} (goes with your next message)" for n in (1, 2)]
    assert page.stop(session).notice == ""  # nothing to stop


def test_clear_while_answering_ends_the_answer_and_empties_the_page(page, picture, monkeypatch):
    scripted(monkeypatch, ["word "], delay=0.02, endless=True)
    session = page.upload([str(picture)], None).session
    worker, updates = answer_in_a_thread(page, session, "Tell me everything.")
    cleared = page.clear(session)
    worker.join(5)
    assert not worker.is_alive() and updates[-1] is cleared and cleared.chat == []
    assert session.conversation.session.history == [] and session.conversation.pending == []


def test_uploads_that_are_not_pictures_or_too_large_are_named(page, picture, loaded, tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    update = page.upload([str(text), str(picture)], None)
    assert update.notice == "⚠ Not added: notes.png is not a picture that can be read (PNG, JPEG, WebP, GIF, BMP…)."
    assert update.session.conversation.pending == [str(picture)]
    small = ChatPage(loaded, "tiny", max_upload_mb=0.0001, picture_dir=tmp_path / "drawn")
    update = small.upload(str(picture), None)
    assert "shapes.png is 0.0 MB, above the 0.0001 MB limit" in update.notice
    assert update.session.conversation.pending == []


def test_questions_and_settings_that_cannot_be_used_are_named(page, picture):
    session = page.upload([str(picture)], None).session
    (update,) = page.ask("What is in <img>/etc/passwd</img>?", session, *GREEDY)
    assert "`<img>` tags cannot be typed" in update.notice
    (update,) = page.ask("Colour?", session, 6, 0.0, 0.0, 0, 1.0, None)
    assert update.notice == "⚠ --top-p 0.0 cannot be used. Give a value in (0, 1]"
    (update,) = page.ask("Colour?", session, 6, 0.7, 1.0, 0, 1.0, "one")
    assert update.notice.startswith("⚠ a generation setting is not a number") and "Generation settings" in update.notice
    assert page.read_settings(6, 0.7, 0.9, 5, 1.1, " 7 ") == GenerationSettings(6, 0.7, 0.9, 5, 1.1, seed=7)
    (update,) = page.ask("   ", page.new_session(), *GREEDY)
    assert update.notice.startswith("Type a question")
    assert session.conversation.session.history == [] and session.conversation.pending == [str(picture)]


def test_every_tab_has_its_own_conversation(page, picture, monkeypatch):
    scripted(monkeypatch, ["Red."])
    one = page.upload([str(picture)], None).session
    two = page.upload([str(picture)], None).session
    list(page.ask("Colour?", one, *GREEDY))
    assert len(one.conversation.session.history) == 1 and two.conversation.session.history == []
    assert two.conversation.pending == [str(picture)] and one.conversation.loaded is two.conversation.loaded


def test_one_answer_at_a_time_and_stop_never_waits(page):
    from qwenvl_cli.ui import build_app

    demo = build_app(page)
    slots = {
        (fn.name, fn.concurrency_id if fn.concurrency_limit else None, fn.concurrency_limit) for fn in demo.fns.values()
    }
    # Answers from every tab share one queue slot (one model); pictures, Stop and Clear run at once.
    assert slots == {
        ("ask", "model", 1),
        ("regenerate", "model", 1),
        ("upload", None, None),
        ("clear", None, None),
        ("stop", None, None),
    }


def test_auth_is_user_colon_password():
    assert parse_auth("alice:pa:ss") == ("alice", "pa:ss")
    assert parse_auth(None) is None
    for bad in ("alice", ":secret", "alice:", ""):
        with pytest.raises(QwenvlError, match="USER:PASS") as caught:
            parse_auth(bad)
        assert "secret" not in caught.value.message  # the value is not echoed


def test_exposure_is_pointed_out():
    assert exposure_notes(ServeOptions(Path("m"))) == []
    open_to_all = exposure_notes(ServeOptions(Path("m"), host="0.0.0.0"))
    assert len(open_to_all) == 1 and "add --auth" in open_to_all[0]
    assert exposure_notes(ServeOptions(Path("m"), host="0.0.0.0", auth=("a", "b"))) == []
    assert "gradio.live" in exposure_notes(ServeOptions(Path("m"), share=True, auth=("a", "b")))[0]


# --- the command ------------------------------------------------------------------------------------


def test_help_has_an_example():
    result = CliRunner().invoke(app, ["serve-ui", "--help"], env={"COLUMNS": "160", "NO_COLOR": "1"})
    assert result.exit_code == 0
    assert "qwenvl serve-ui --model" in result.stdout and "--max-upload-mb" in result.stdout


def test_without_gradio_the_command_names_the_extra(models, monkeypatch):
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` raises ImportError
    result = CliRunner().invoke(app, ["serve-ui", "--model", str(models / "tiny")])
    assert result.exit_code == 2, result.output
    assert 'pip install "qwenvl[ui]"' in " ".join(result.output.split()) and "Traceback" not in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "nowhere"], "model folder nowhere does not exist"),
        (["--adapter", "nowhere"], "--adapter nowhere does not exist"),
        (["--auth", "alice"], "--auth needs a user name and a password"),
        (["--temperature", "-1"], "--temperature -1.0 cannot be used"),
    ],
)
def test_refusals(models, args, message):
    full = ["serve-ui", "--model", str(models / "tiny"), *args] if args[0] != "--model" else ["serve-ui", *args]
    result = CliRunner().invoke(app, full)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()) and "Traceback" not in result.output


def test_a_port_in_use_is_named(page):
    from qwenvl_cli.ui import launch

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(QwenvlError, match=f"cannot serve on 127.0.0.1:{port}"):
            launch(page, "127.0.0.1", port, False, None, 20)


def test_auth_guards_the_page(page):
    from qwenvl_cli.ui import launch

    demo = launch(page, "127.0.0.1", free_port(), False, ("alice", "long-secret"), 20)
    try:
        config = demo.local_url + "config"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(config, timeout=10)
        assert refused.value.code == 401
        login = urllib.request.Request(
            demo.local_url + "login", data=b"username=alice&password=long-secret", method="POST"
        )
        with urllib.request.urlopen(login, timeout=10) as answer:
            assert answer.status == 200
    finally:
        demo.close()


# --- in a real browser --------------------------------------------------------------------------------

HAVE_BROWSER = CHROMIUM.is_file() and importlib.util.find_spec("playwright") is not None
browser_skip = pytest.mark.skipif(
    not HAVE_BROWSER,
    reason="browser test: needs Debian's chromium at /usr/bin/chromium (apt-get install chromium) and "
    "pip's playwright (the dev extra); never `playwright install`",
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_http(url: str, process: subprocess.Popen | None = None, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            pytest.fail(f"serve-ui exited with {process.returncode}: {process.stdout.read()}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as answer:
            if answer.status == 200:
                return
        time.sleep(0.25)
    pytest.fail(f"{url} did not answer within {timeout} s")


@pytest.fixture(scope="module")
def browser():
    if not HAVE_BROWSER:
        pytest.skip("no browser")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def upload_and_ask(tab, picture: Path, question: str) -> None:
    with tab.expect_file_chooser() as chooser:
        tab.locator("#qwenvl-upload").click()
    chooser.value.set_files(str(picture))
    tab.locator("#qwenvl-chat").get_by_text("Picture 1 (goes with your next message)").wait_for()
    tab.locator("#qwenvl-question textarea").fill(question)
    tab.locator("#qwenvl-question textarea").press("Enter")


@pytest.mark.browser
@browser_skip
def test_in_the_browser_answers_stream_boxes_show_and_stop_works(browser, page, picture, monkeypatch, tmp_path):
    from qwenvl_cli.ui import launch

    pieces = ["<ref>the red square</ref>", "<box>(62,100),(312,500)</box>", " and ", "<ref>the blue circle</ref>"]
    scripted(monkeypatch, [*pieces, "<box>(562,350),(875,850)</box>"], delay=0.4)
    demo = launch(page, "127.0.0.1", free_port(), False, None, 0.1)  # uploads up to 0.1 MB
    tab = browser.new_page(viewport={"width": 1200, "height": 1150})
    try:
        tab.goto(demo.local_url)
        tab.get_by_text("model tiny · cpu (fp32)").wait_for()
        upload_and_ask(tab, picture, "Where are the red square and the blue circle?")
        chat = tab.locator("#qwenvl-chat")
        chat.get_by_text("<ref>the red square</ref>").first.wait_for()  # the first pieces, shown as written
        assert not chat.get_by_text("the blue circle</ref>").count(), "the whole answer came at once"
        tab.get_by_text("Answered in").wait_for(timeout=30_000)
        chat.get_by_text("2 boxes on Picture 1 (pixels)").first.wait_for()
        drawn = chat.locator("img[src*='/boxes-']")  # chat.py's name for a picture with boxes drawn
        drawn.wait_for()
        assert drawn.evaluate("img => img.complete && img.naturalWidth") == 320  # the picture with boxes loaded
        tab.get_by_text("Generation settings").click()
        tab.get_by_text("repetition penalty").wait_for()
        shot = tmp_path / "serve-ui.png"
        tab.screenshot(path=str(shot), full_page=True)
        assert Image.open(shot).size[0] == 1200
        if os.environ.get("QWENVL_UPDATE_SCREENSHOT") == "1":
            shutil.copyfile(shot, SCREENSHOT)

        scripted(monkeypatch, ["word "], delay=0.1, endless=True)
        tab.locator("#qwenvl-question textarea").fill("Tell me everything.")
        tab.locator("#qwenvl-send").click()
        chat.get_by_text("word word").first.wait_for()
        tab.locator("#qwenvl-stop").click()
        tab.get_by_text("Stopped: the unanswered question is back in the box.").wait_for()
        assert tab.locator("#qwenvl-question textarea").input_value() == "Tell me everything."
        assert not chat.get_by_text("word word").count()
        tab.locator("#qwenvl-clear").click()
        tab.get_by_text("Conversation cleared").wait_for()
        assert not chat.locator("img").count()

        # Uploads that are refused, each with a message on the page; nothing is attached.
        (tmp_path / "notes.txt").write_text("not a picture")
        (tmp_path / "broken.png").write_text("not a picture either")
        noise = Image.frombytes("RGB", (400, 400), os.urandom(400 * 400 * 3))
        noise.save(tmp_path / "noise.png")  # ~470 KB
        for name, message in [
            ("notes.txt", "Invalid file type: notes.txt"),  # Gradio, from file_types=["image"]
            ("broken.png", "broken.png is not a picture that can be read"),  # the page, from chat.py's check
            ("noise.png", "exceed the maximum allowed size"),  # Gradio, from --max-upload-mb
        ]:
            with tab.expect_file_chooser() as chooser:
                tab.locator("#qwenvl-upload").click()
            chooser.value.set_files(str(tmp_path / name))
            tab.get_by_text(message).first.wait_for()
        assert not chat.locator("img").count()
    finally:
        tab.close()
        demo.close()


@pytest.mark.browser
@browser_skip
@pytest.mark.slow
def test_the_command_serves_the_page_with_the_real_model(browser, models, picture, tmp_path):
    port = free_port()
    # `python -m qwenvl_cli`, with Ctrl-C raising KeyboardInterrupt as in a terminal's shell even where the test
    # runs with SIGINT ignored (a background job of a shell without job control keeps it ignored in children).
    start = (
        "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "sys.argv[0] = 'qwenvl'; runpy.run_module('qwenvl_cli', run_name='__main__')"
    )
    command = [sys.executable, "-c", start, "serve-ui", "--model", str(models / "tiny"), "--port", str(port)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    server = subprocess.Popen(
        [*command, "--max-new-tokens", "6"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    tab = browser.new_page()
    try:
        wait_for_http(f"http://127.0.0.1:{port}/", server)
        tab.goto(f"http://127.0.0.1:{port}/")
        tab.get_by_text("model tiny · cpu (fp32)").wait_for()
        upload_and_ask(tab, picture, "What colour is the square?")
        tab.get_by_text("Answered in").wait_for(timeout=60_000)
        chat = tab.locator("#qwenvl-chat")
        assert chat.get_by_text("What colour is the square?").count() == 1
        assert chat.locator("img").first.evaluate("img => img.complete && img.naturalWidth") == 320
        server.send_signal(signal.SIGINT)  # Ctrl-C
        assert server.wait(20) == 0
        output = server.stdout.read()
        assert f"serving http://127.0.0.1:{port}/" in output and "Traceback" not in output
    finally:
        tab.close()
        if server.poll() is None:
            server.kill()
            server.wait()


@pytest.mark.browser
@browser_skip
def test_in_the_browser_a_qwen25_vl_grounded_answer_shows_its_box_at_the_pictures_pixels(
    browser, vl_models, picture, monkeypatch, tmp_path
):
    """Qwen2.5-VL answers boxes as JSON in pixels of the resized picture (140×84 for 320×200 at the tiny preset's
    budget): (35, 21)–(105, 63) there is (80, 50)–(240, 150) on the picture itself."""
    from qwenvl_cli.chat import BOX_COLOURS
    from qwenvl_cli.families.hf_vl_chat import VisionChatSession
    from qwenvl_cli.inference import load_for_inference
    from qwenvl_cli.ui import launch

    answer = '```json\n[{"bbox_2d": [35, 21, 105, 63], "label": "the middle"}]\n```'

    def stream_query(self, query, settings=None):
        yield answer
        self.history.append((query, answer))

    monkeypatch.setattr(VisionChatSession, "stream_query", stream_query)
    loaded = load_for_inference(vl_models / "qwen2.5-vl")
    family_page = ChatPage(loaded, "model qwen2.5-vl · cpu (fp32)", GenerationSettings(max_new_tokens=6), tmp_path)
    demo = launch(family_page, "127.0.0.1", free_port(), False, None, 1)
    tab = browser.new_page(viewport={"width": 1200, "height": 1150})
    try:
        tab.goto(demo.local_url)
        tab.get_by_text("model qwen2.5-vl · cpu (fp32)").wait_for()
        upload_and_ask(tab, picture, "Where is the middle?")
        tab.get_by_text("Answered in").wait_for(timeout=30_000)
        chat = tab.locator("#qwenvl-chat")
        chat.get_by_text("1 box on Picture 1 (pixels): the middle [80, 50, 240, 150]").first.wait_for()
        drawn = chat.locator("img[src*='/boxes-']")
        drawn.wait_for()
        assert drawn.evaluate("img => img.complete && img.naturalWidth") == 320
        name = drawn.get_attribute("src").rsplit("/", 1)[-1]
        (shown,) = list(tmp_path.rglob(name))
        image = Image.open(shown).convert("RGB")
        assert image.getpixel((80, 130)) == BOX_COLOURS[0] and image.getpixel((239, 130)) == BOX_COLOURS[0]
        assert image.getpixel((76, 130)) == (246, 244, 238) and image.getpixel((150, 130)) == (246, 244, 238)
    finally:
        tab.close()
        demo.close()
