"""`qwenvl chat`: one-shot and JSON answers, grounding boxes drawn on the picture, refusals, and the
interactive chat driven through a pseudo-terminal (typing, streamed answers, slash commands, Ctrl-C)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import sys
import time
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from qwenvl_cli.chat import check_settings, open_conversation
from qwenvl_cli.cli import app
from qwenvl_cli.errors import QwenvlError
from qwenvl_cli.model.generation import GenerationSettings
from qwenvl_cli.model.presets import init_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("chat") / "tiny"
    init_model("tiny", folder, seed=0)
    return folder


@pytest.fixture(scope="module")
def picture(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pictures") / "red.png"
    image = Image.new("RGB", (200, 100), (245, 245, 240))
    image.paste((220, 40, 40), (20, 10, 80, 60))
    image.save(path)
    return path


def test_grounded_answers_become_boxes_in_pixels_drawn_on_the_latest_picture(tiny, picture, tmp_path):
    conversation = open_conversation(tiny)
    conversation.session.history.append((f"Picture 1: <img>{picture}</img>\nWhere is the square?", "x"))
    answer = "<ref>the red square</ref><box>(100,100),(400,600)</box> and <box>(500,0),(999,999)</box>"
    result = conversation.grounding(answer, tmp_path / "out")
    assert [b.ref for b in result.boxes] == ["the red square", None]  # text in between ends a ref
    assert result.boxes[0].box_norm1000 == [100, 100, 400, 600]
    assert result.boxes[0].box_pixels == [20, 10, 80, 60]  # 200×100 picture
    drawn = Image.open(result.image_with_boxes).convert("RGB")
    assert drawn.size == (200, 100) and result.picture == str(picture)
    assert drawn.getpixel((20, 35)) != (220, 40, 40)  # the left edge of the first box is outlined
    assert conversation.grounding("no boxes here", tmp_path / "out").boxes == []


def test_pictures_are_numbered_across_the_conversation(tiny, picture):
    conversation = open_conversation(tiny)
    settings = GenerationSettings(max_new_tokens=3)
    conversation.attach(str(picture))
    list(conversation.stream("What is this?", settings))
    conversation.attach(str(picture))
    list(conversation.stream("And this?", settings))
    queries = [query for query, _ in conversation.session.history]
    assert queries[0].startswith(f"Picture 1: <img>{picture}</img>\n")
    assert queries[1].startswith(f"Picture 2: <img>{picture}</img>\n")
    assert conversation.pictures() == [str(picture), str(picture)]


def test_a_stopped_answer_keeps_nothing_and_the_pictures_wait(tiny, picture):
    conversation = open_conversation(tiny)
    conversation.attach(str(picture))
    pieces = conversation.stream("Describe it.", GenerationSettings(max_new_tokens=50))
    next(pieces)
    pieces.close()  # what Ctrl-C does to the stream
    assert conversation.session.history == [] and conversation.pending == [str(picture)]


def test_save_writes_the_conversation_in_the_data_format(tiny, picture, tmp_path):
    from qwenvl_cli.data.validate import validate_data

    conversation = open_conversation(tiny)
    conversation.session.history.append((f"Picture 1: <img>{picture}</img>\nColour?", "Red."))
    path = conversation.save(tmp_path / "chat.json")
    sample = json.loads(path.read_text())[0]
    assert [t["from"] for t in sample["conversations"]] == ["user", "assistant"]
    assert validate_data([path]).errors == 0


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"temperature": -1.0}, "--temperature -1.0"),
        ({"top_p": 0.0}, "--top-p 0.0"),
        ({"top_k": -2}, "--top-k -2"),
        ({"max_new_tokens": 0}, "--max-new-tokens 0"),
        ({"repetition_penalty": 0.0}, "--repetition-penalty 0.0"),
    ],
)
def test_generation_flags_that_cannot_work_are_refused(changes, message):
    with pytest.raises(QwenvlError, match=message.replace(".", r"\.")):
        check_settings(GenerationSettings(**changes))


def test_cli_one_shot_json(tiny, picture, tmp_path):
    args = ["chat", "--model", str(tiny), "--image", str(picture), "--prompt", "What colour?", "--json"]
    result = CliRunner().invoke(app, [*args, "--max-new-tokens", "5", "--save-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert set(printed) >= {"answer", "boxes", "image_with_boxes"} and printed["new_tokens"] <= 5


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--temperature", "-1", "--prompt", "hi"], "--temperature -1.0 cannot be used"),
        (["--json"], "--json goes with --prompt"),
        (["--image", "missing.png", "--prompt", "hi"], "missing.png does not exist"),
        (["--adapter", "nowhere", "--prompt", "hi"], "--adapter nowhere does not exist"),
    ],
)
def test_cli_refusals(tiny, args, message):
    result = CliRunner().invoke(app, ["chat", "--model", str(tiny), *args])
    assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output
    assert "Traceback" not in result.output


# --- the interactive chat in a pseudo-terminal ---------------------------------------------------------


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class Terminal:
    """`qwenvl chat` on a pseudo-terminal: what a person at a keyboard sees and types."""

    def __init__(self, args: list[str], cwd: Path, endless: bool = False):
        """`endless`: the model never writes a stop token, so only Ctrl-C (or the token limit) ends an answer."""
        import pty

        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: becomes `qwenvl chat`, its terminal the pty
            os.chdir(cwd)
            os.environ.update({"COLUMNS": "200", "TERM": "xterm", "OMP_NUM_THREADS": "1"})
            patch = "from qwenvl_cli.model.generation import ChatSession; ChatSession.stop_ids = lambda self: []; "
            # Ctrl-C raises KeyboardInterrupt as in a terminal's shell, even where this test runs with SIGINT
            # ignored (a background job of a shell without job control): Python keeps an ignored SIGINT ignored.
            interrupt = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
            code = (
                interrupt + (patch if endless else "") + "import sys; from qwenvl_cli.cli import main; sys.exit(main())"
            )
            os.execv(sys.executable, [sys.executable, "-c", code, "chat", *args])
        self.seen = ""

    def read_until(self, text: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while text not in self.seen:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"{text!r} did not appear; the screen so far:\n{self.seen[-2000:]}"
            ready, _, _ = select.select([self.fd], [], [], min(remaining, 0.5))
            if ready:
                try:
                    chunk = os.read(self.fd, 4096).decode("utf-8", "replace")
                except OSError:
                    break
                self.seen += ANSI.sub("", chunk)
        return self.seen

    def pump(self, seconds: float) -> None:
        """Read whatever arrives for `seconds`."""
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([self.fd], [], [], remaining)
            if ready:
                self.seen += ANSI.sub("", os.read(self.fd, 4096).decode("utf-8", "replace"))

    def type(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def close(self) -> int:
        for _ in range(100):
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.1)
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        os.close(self.fd)
        return -9


@pytest.mark.slow
def test_interactive_chat_in_a_terminal(tiny, picture, tmp_path):
    # A random model that never stops by itself, with room for 20,000 tokens: Ctrl-C ends the answer.
    term = Terminal(["--model", str(tiny), "--max-new-tokens", "20000"], tmp_path, endless=True)
    try:
        term.read_until("you ›")
        term.type("/image missing.png\r")
        term.read_until("does not exist")  # a bad picture is named, the session goes on
        term.type(f"/image {picture}\r")
        term.read_until("Picture 1 attached")
        term.type("Describe the picture.\r")
        term.read_until("qwen ›")
        start = len(term.seen)
        term.pump(1.5)  # let it stream for a while
        assert len(term.seen) > start + 20, f"nothing was streamed: {term.seen[start:]!r}"
        term.type("\x03")  # Ctrl-C: stops the answer, not the session
        term.read_until("(stopped)")
        term.read_until("1 picture(s) attached")  # the unanswered question's picture waits for the next one
        term.type("/system Answer in one word.\r")
        term.read_until("system prompt set")
        term.type("/history\r")
        term.read_until("(no exchanges yet)")
        term.type("/save saved.json\r")
        term.read_until("saved")
        term.type("/exit\r")
        assert term.close() == 0
    finally:
        if term.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(term.pid, signal.SIGKILL)
    saved = json.loads((tmp_path / "saved.json").read_text())
    assert saved[0]["conversations"] == []


@pytest.mark.slow
def test_interactive_answers_history_and_regen_with_a_short_limit(tiny, picture, tmp_path):
    term = Terminal(["--model", str(tiny), "--max-new-tokens", "4"], tmp_path)
    try:
        term.read_until("you ›")
        term.type(f"/image {picture}\r")
        term.type("What colour?\r")
        term.read_until("qwen ›")
        term.read_until("you ›", timeout=60)
        term.type("/regen\r")
        term.read_until("qwen ›")
        term.type("/history\r")
        term.read_until("1. qwen ›")
        term.type("/nonsense\r")
        term.read_until("unknown command /nonsense")
        term.type("\x04")  # Ctrl-D leaves
        assert term.close() == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(term.pid, signal.SIGKILL)
    assert "Picture 1: <img>" in term.seen  # the history shows the numbered picture
