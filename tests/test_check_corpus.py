"""A corpus of broken data: one case per check code of the catalogue, each run through `validate_data`.

Every case builds its broken file (and images, URLs, a tokenizer) in tmp_path and states the code it
must produce, the report's exit code and where the finding points. `test_corpus_covers_the_catalogue`
fails as soon as a code is added to `CHECKS` without a case here.
"""

from __future__ import annotations

import io
import json
import struct
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from helpers import make_sample
from PIL import Image

from qwenvl_cli.data.checks import CHECKS
from qwenvl_cli.data.validate import ValidateOptions, validate_data
from qwenvl_cli.model.template import IMAGE_TOKENS, ChatTemplate
from qwenvl_cli.model.tokenizer import QwenVLTokenizer
from qwenvl_cli.schemas import Severity

GOOD = make_sample("good", "What is two plus two?", "Four.")
ASK = "\nWhat is in the picture?"
SLOW_S = 1.0  # how long the slow URL takes to answer
URL_TIMEOUT = 0.3  # the timeout the slow URL must exceed


def picture(path: str, number: int = 1) -> str:
    return f"Picture {number}: <img>{path}</img>\n"


def png_bytes(size: tuple[int, int] = (24, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, "PNG")
    return buffer.getvalue()


def jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((96, 96), 60).convert("RGB").save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR claims `width`×`height` (Pillow reads the size without decoding)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b""))
        + _png_chunk(b"IEND", b"")
    )


# --- a local HTTP server (127.0.0.1 only) -------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # do not wait for the slow handler when closing

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.hits: dict[str, int] = {}
        self.lock = threading.Lock()
        self.routes: dict[str, tuple[int, str, bytes]] = {
            "/pic.png": (200, "image/png", png_bytes()),
            "/page.html": (200, "text/html; charset=utf-8", b"<html><body>a picture</body></html>"),
            "/slow.png": (200, "image/png", png_bytes()),
        }

    def url(self, path: str) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}{path}"

    def handle_error(self, request, client_address) -> None:
        pass  # the client gave up on /slow.png: the late answer hits a closed socket


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def _answer(self, body: bool) -> None:
        with self.server.lock:
            self.server.hits[self.path] = self.server.hits.get(self.path, 0) + 1
        if self.path == "/slow.png":
            time.sleep(SLOW_S)
        status, content_type, payload = self.server.routes.get(self.path, (404, "text/plain", b"not found"))
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if body:
            self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def http_server():
    server = _Server()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch) -> Path:
    """Keep the on-disk URL cache inside this test, and never route 127.0.0.1 through a proxy."""
    cache = tmp_path / "qwenvl-cache"
    monkeypatch.setenv("QWENVL_CACHE_DIR", str(cache))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    return cache


# --- the corpus ---------------------------------------------------------------------------------------


class Ctx:
    """What a case builder may use: tmp_path, the shared writers, and lazily the server and tokenizer."""

    def __init__(self, tmp_path: Path, request: pytest.FixtureRequest):
        self.tmp = tmp_path
        self._request = request

    @property
    def server(self) -> _Server:
        return self._request.getfixturevalue("http_server")

    @property
    def model_dir(self) -> Path:
        return self._request.getfixturevalue("tiny_model_dir")

    def jsonl(self, *items: Any, name: str = "data.jsonl") -> Path:
        return self._request.getfixturevalue("write_jsonl")(list(items), name)

    def json_list(self, obj: Any, name: str = "data.json") -> Path:
        return self._request.getfixturevalue("write_json")(obj, name)

    def after_good(self, sample: Any) -> list[Path]:
        """A JSONL file with a clean sample on line 1 and `sample` on line 2."""
        return [self.jsonl(GOOD, sample)]

    def file(self, name: str, content: bytes) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        return path

    def image(self, name: str = "pic.png") -> Path:
        return self.file(name, png_bytes())


@dataclass(frozen=True)
class Case:
    id: str
    code: str
    exit_code: int
    build: Callable[[Ctx], tuple[list[Path], dict[str, Any]]]
    where: dict[str, Any] = field(default_factory=dict)  # expected fields of the finding
    says: str | None = None  # a piece of its message


CASES: list[Case] = []
NO_SAMPLE = {"sample_index": None, "sample_id": None, "turn": None}  # a file-level finding
LINE2 = {"line": 2, "sample_index": 1}  # the sample after GOOD in `after_good`


def case(code: str, exit_code: int, *, id: str | None = None, says: str | None = None, **where):
    def register(build):
        CASES.append(Case(id or code, code, exit_code, build, where, says))
        return build

    return register


def samples(build: Callable[[Ctx], Any]) -> Callable[[Ctx], tuple[list[Path], dict[str, Any]]]:
    """A builder of one broken sample placed after a good one (images are not looked at)."""
    return lambda ctx: (ctx.after_good(build(ctx)), {"check_images": False})


# File


@case("F001", 2, says="does not exist", line=None, **NO_SAMPLE)
def f001(ctx):
    return [ctx.tmp / "nowhere.json"], {}


@case("F002", 2, says="is a directory", line=None, **NO_SAMPLE)
def f002(ctx):
    (ctx.tmp / "samples").mkdir()
    return [ctx.tmp / "samples"], {}


@case("F003", 2, says="0xe9", line=2, column=14, **NO_SAMPLE)
def f003(ctx):
    # Latin-1 "café": line 2 is `  {"id": "caf\xe9"...`, the bad byte is its 14th.
    return [ctx.file("latin1.json", b'[\n  {"id": "caf\xe9", "conversations": []}\n]\n')], {}


@case("F004", 2, id="F004-json-list", says="delimiter", line=3, column=14, **NO_SAMPLE)
def f004_list(ctx):
    good = json.dumps(GOOD)
    text = f'[\n  {good},\n  {{"id": "b" "conversations": []}}\n]\n'  # missing comma after "b"
    return [ctx.file("syntax.json", text.encode())], {}


@case("F004", 2, id="F004-json-trailing-comma", says="trailing comma", line=3, column=1, **NO_SAMPLE)
def f004_trailing(ctx):
    return [ctx.file("trailing.json", f"[\n  {json.dumps(GOOD)},\n]\n".encode())], {}


@case("F004", 1, id="F004-jsonl-line", line=2, column=13, sample_index=1, sample_id=None, turn=None)
def f004_jsonl(ctx):
    return [ctx.jsonl(GOOD, '{"id": "b", conversations: []}')], {}


@case("F005", 2, says="single sample object; wrap it in a list", line=None, **NO_SAMPLE)
def f005(ctx):
    return [ctx.json_list(GOOD, "single.json")], {}


@case("F006", 2, id="F006-empty-file", says="is empty", line=None, **NO_SAMPLE)
def f006_empty(ctx):
    return [ctx.file("empty.jsonl", b"\n  \n")], {}


@case("F006", 2, id="F006-empty-list", says="holds no samples", line=None, **NO_SAMPLE)
def f006_list(ctx):
    return [ctx.file("empty.json", b"[]")], {}


# Sample structure


@case("S101", 1, sample_id=None, turn=None, **LINE2)
@samples
def s101(ctx):
    return '["not", "a", "sample"]'


@case("S102", 1, sample_id=None, turn=None, **LINE2)
@samples
def s102(ctx):
    return {"conversations": make_sample()["conversations"]}


@case("S103", 1, says="number", sample_id="7", turn=None, **LINE2)
@samples
def s103(ctx):
    return {**make_sample(), "id": 7}


@case("S104", 1, turn=None, **LINE2)
@samples
def s104(ctx):
    return {**make_sample(), "id": "  "}


@case("S105", 1, says="line 1", sample_id="good", turn=None, **LINE2)
@samples
def s105(ctx):
    return make_sample("good", "Another question", "Another answer")


@case("S106", 1, sample_id="s1", turn=None, **LINE2)
@samples
def s106(ctx):
    return {"id": "s1"}


@case("S107", 1, sample_id="s1", turn=None, **LINE2)
@samples
def s107(ctx):
    return {"id": "s1", "conversations": "Hello"}


@case("S108", 1, sample_id="s1", turn=None, **LINE2)
@samples
def s108(ctx):
    return {"id": "s1", "conversations": []}


@case("S109", 1, sample_id="s1", turn=0, **LINE2)
@samples
def s109(ctx):
    return {"id": "s1", "conversations": ["Hello", {"from": "assistant", "value": "Hi!"}]}


@case("S110", 1, sample_id="s1", turn=0, **LINE2)
@samples
def s110(ctx):
    return {"id": "s1", "conversations": [{"role": "user", "value": "Hello"}, {"from": "assistant", "value": "Hi!"}]}


@case("S111", 1, sample_id="s1", turn=1, **LINE2)
@samples
def s111(ctx):
    return {"id": "s1", "conversations": [{"from": "user", "value": "Hello"}, {"from": "assistant", "content": "Hi"}]}


@case("S112", 1, says="list", sample_id="s1", turn=0, **LINE2)
@samples
def s112(ctx):
    return {"id": "s1", "conversations": [{"from": "user", "value": ["Hello"]}, {"from": "assistant", "value": "Hi"}]}


@case("S113", 1, says="gpt", sample_id="s1", turn=1, **LINE2)
@samples
def s113(ctx):
    return make_sample("s1", "Hello", "Hi!", roles=("user", "gpt"))


@case("S114", 1, sample_id="s1", turn=0, **LINE2)
@samples
def s114(ctx):
    return make_sample("s1", "Welcome!", "Hello", "Hi!", roles=("assistant", "user", "assistant"))


@case("S115", 1, sample_id="s1", turn=1, **LINE2)
@samples
def s115(ctx):
    return make_sample("s1", "Hello", "Are you there?", "Yes.", roles=("user", "user", "assistant"))


@case("S116", 0, sample_id="s1", turn=2, **LINE2)
@samples
def s116(ctx):
    return make_sample("s1", "Hello", "Hi!", "Thanks")


@case("S117", 1, sample_id="s1", turn=1, **LINE2)
@samples
def s117(ctx):
    return make_sample("s1", "Hello", " \n\t")


@case("S118", 0, says="line 1", sample_id="copy", turn=None, **LINE2)
@samples
def s118(ctx):
    return {**GOOD, "id": "copy"}


@case("S119", 0, says="`image`", sample_id="s1", turn=None, **LINE2)
@samples
def s119(ctx):
    return {**make_sample("s1"), "image": "pic.png"}


# The messages format and declared box conventions (tests/test_data_formats.py has the rest)


def messages(*contents: str, **extra) -> dict:
    roles = ["user", "assistant"] * len(contents)
    return {"messages": [{"role": r, "content": c} for r, c in zip(roles, contents, strict=False)], **extra}


@case("S120", 1, says="2 path(s)", sample_id="sample-1", field="images", **LINE2)
@samples
def s120(ctx):
    return messages("<image>What?", "A.", images=["a.png", "b.png"])


@case("S121", 1, says="system message", sample_id="sample-1", field="messages[0]", **LINE2)
@samples
def s121(ctx):
    return {"messages": [{"role": "system", "content": "Be brief."}, *messages("Q?", "A.")["messages"]]}


@case("S122", 1, says="video", sample_id="sample-1", field="videos", **LINE2)
@samples
def s122(ctx):
    return messages("What happens?", "A fall.", videos=["v.mp4"])


@case("S123", 1, says="not a list", sample_id="sample-1", field="images", **LINE2)
@samples
def s123(ctx):
    return messages("What?", "A.", images="a.png")


@case("B310", 1, says="yolo", sample_id="s1", field="boxes", **LINE2)
@samples
def b310(ctx):
    return {**make_sample("s1", "Where?", "<box>(1,2),(3,4)</box>"), "boxes": "yolo"}


def declared(convention: str, answer: str, size: tuple[int, int] = (24, 16)):
    def build(ctx: Ctx):
        ctx.file("pic.png", png_bytes(size))
        sample = {**make_sample("s1", picture("pic.png") + "Where?", answer), "boxes": convention}
        return ctx.after_good(sample), {}

    return build


@case("B311", 1, says="comes before any picture", sample_id="s1", field="conversations[1].value", **LINE2)
@samples
def b311(ctx):
    return {**make_sample("s1", "Where?", "<ref>x</ref><box>(1,2),(3,4)</box>"), "boxes": "pixels"}


case("B312", 1, says="past the 24×16 picture", sample_id="s1", **LINE2)(
    declared("pixels", "<ref>x</ref><box>(1,2),(30,4)</box>")
)
case("B313", 1, says="looks absolute", sample_id="s1", **LINE2)(declared("qwen3-vl", '{"bbox_2d": [1, 2, 1300, 4]}'))
case("B314", 0, says="looks relative", sample_id="s1", **LINE2)(
    declared("pixels", "<ref>x</ref><box>(1,2),(300,400)</box>", (1200, 1100))
)


# Markup (pictures are real files next to the data file, so only the markup is at fault)


def markup(*turns: str, sample_id: str = "s1", roles: tuple[str, ...] | None = None):
    def build(ctx: Ctx):
        ctx.image("pic.png")
        return ctx.after_good(make_sample(sample_id, *turns, roles=roles)), {}

    return build


case("M201", 1, sample_id="s1", turn=0, **LINE2)(markup("Picture 1: <img>pic.png" + ASK, "A red square."))
case("M202", 1, says="</box>", sample_id="s1", turn=1, **LINE2)(markup("Where is it?", "It is here</box>."))
case("M203", 1, says="<box>", sample_id="s1", turn=1, **LINE2)(
    markup("Where is it?", "<ref>the <box>(1,2),(30,40)</box> dog</ref>")
)
case("M204", 1, says="<|endoftext|>", sample_id="s1", turn=0, **LINE2)(markup("Say <|endoftext|> now", "No."))
case("M205", 1, says="Picture 1", sample_id="s1", turn=2, **LINE2)(
    # the second picture of the conversation, in a later turn, labelled 1 again
    markup(picture("pic.png") + ASK, "A square.", picture("pic.png", 1) + "And this?", "The same square.")
)
case("M206", 0, sample_id="s1", turn=1, **LINE2)(markup("Draw a square.", picture("pic.png")))
case("M207", 0, says="<ref>the dog</ref>", sample_id="s1", turn=1, **LINE2)(
    markup("Where is the dog?", "<ref>the dog</ref> is on the left.")
)
case("M208", 0, id="M208-no-label", says="no `Picture 1: ` label", sample_id="s1", turn=0, **LINE2)(
    markup("<img>pic.png</img>" + ASK, "A square.")
)
case("M208", 0, id="M208-loose-label", says="picture 1:", sample_id="s1", turn=0, **LINE2)(
    markup("picture 1:<img>pic.png</img>" + ASK, "A square.")
)
case("M209", 1, sample_id="s1", turn=0, **LINE2)(markup("Picture 1: <img></img>" + ASK, "Nothing."))

# Boxes

case("B301", 1, says="fractions", sample_id="s1", turn=1, **LINE2)(
    markup("Where?", "<ref>dog</ref><box>(0.1,0.2),(0.3,0.4)</box>")
)
case("B302", 1, says="1000", sample_id="s1", turn=1, **LINE2)(
    markup("Where?", "<ref>dog</ref><box>(0,0),(1000,10)</box>")
)
case("B303", 1, says="x1=500", sample_id="s1", turn=1, **LINE2)(
    markup("Where?", "<ref>dog</ref><box>(500,0),(100,10)</box>")
)
case("B304", 1, says="3 points", sample_id="s1", turn=1, **LINE2)(
    markup("Where?", "<ref>sign</ref><quad>(1,2),(30,4),(30,40)</quad>")
)


# Images


def with_picture(path_of: Callable[[Ctx], str], **options: Any):
    """A sample whose first user turn shows the picture `path_of(ctx)`, placed after a good one."""

    def build(ctx: Ctx):
        sample = make_sample("img", picture(path_of(ctx)) + ASK, "A red square.")
        return ctx.after_good(sample), dict(options)

    return build


AT_PICTURE = {"sample_id": "img", "turn": 0, **LINE2}


def _directory(ctx: Ctx) -> str:
    (ctx.tmp / "folder.png").mkdir()
    return "folder.png"


def _truncated(name: str, content: bytes) -> Callable[[Ctx], str]:
    def make(ctx: Ctx) -> str:
        ctx.file(name, content[: len(content) // 2])
        return name

    return make


def _long_path(ctx: Ctx) -> str:
    # 3 folders of 30 CJK characters (90 bytes each): 100 characters but 280 UTF-8 bytes.
    folder = "/".join(["图" * 30] * 3)
    ctx.image(f"{folder}/pic.png")
    return f"{folder}/pic.png"


case("I401", 1, says="does not exist", snippet="missing.png", **AT_PICTURE)(with_picture(lambda ctx: "missing.png"))
case("I402", 1, says="directory", **AT_PICTURE)(with_picture(_directory))
case("I403", 1, says="0 bytes", **AT_PICTURE)(with_picture(lambda ctx: ctx.file("empty.png", b"").name))
case("I404", 1, id="I404-truncated-png", says="truncated", **AT_PICTURE)(
    with_picture(_truncated("cut.png", png_bytes((64, 64))))
)
case("I404", 1, id="I404-truncated-jpeg", says="truncated", **AT_PICTURE)(
    with_picture(_truncated("cut.jpg", jpeg_bytes()))
)
case("I404", 1, id="I404-text-named-png", says="not an image", **AT_PICTURE)(
    with_picture(lambda ctx: ctx.file("notes.png", b"these are notes, not pixels\n").name)
)
case("I405", 1, id="I405-over-limit", says="100,000,000 pixels", **AT_PICTURE)(
    with_picture(lambda ctx: ctx.file("huge.png", png_header_claiming(10_000, 10_000)).name)
)
case("I405", 1, id="I405-pillow-bomb", says="decompression bomb", **AT_PICTURE)(
    with_picture(lambda ctx: ctx.file("bomb.png", png_header_claiming(30_000, 30_000)).name)
)
case("I406", 1, id="I406-ftp", says="ftp://", **AT_PICTURE)(with_picture(lambda ctx: "ftp://127.0.0.1/pic.png"))
case("I406", 1, id="I406-no-host", says="no host", **AT_PICTURE)(with_picture(lambda ctx: "http:///pic.png"))
case("I406", 1, id="I406-space", says="white space", **AT_PICTURE)(
    with_picture(lambda ctx: "http://127.0.0.1/my pic.png")
)
case("I406", 1, id="I406-bad-port", says="does not parse", **AT_PICTURE)(
    with_picture(lambda ctx: "http://127.0.0.1:99999/pic.png")
)
case("I407", 1, id="I407-404", says="HTTP 404", **AT_PICTURE)(
    with_picture(lambda ctx: ctx.server.url("/gone.png"), check_urls=True, url_timeout=5)
)
case("I407", 1, id="I407-timeout", says="did not answer", **AT_PICTURE)(
    with_picture(lambda ctx: ctx.server.url("/slow.png"), check_urls=True, url_timeout=URL_TIMEOUT)
)
case("I408", 0, says="280-byte", **AT_PICTURE)(with_picture(_long_path))
case("I409", 0, says="text/html", **AT_PICTURE)(
    with_picture(lambda ctx: ctx.server.url("/page.html"), check_urls=True, url_timeout=5)
)


# Length (with a tokenizer): the picture sample is system + user head, 258 picture tokens, the
# question, then the answer. The cut position picks the code.

LENGTH_TURNS = (picture("pic.png") + ASK, "A red square on a white background.")


def with_cut(where: Callable[[int, int, int], int]):
    """`where(picture_start, first_answer_token, length)` -> max_length."""

    def build(ctx: Ctx):
        ctx.image("pic.png")
        tokenizer = QwenVLTokenizer.from_pretrained(ctx.model_dir)
        encoded = ChatTemplate(tokenizer).encode(list(zip(("user", "assistant"), LENGTH_TURNS, strict=True)))
        (start,) = encoded.image_starts
        first, length = encoded.first_target, len(encoded)
        assert start + IMAGE_TOKENS < first < length - 1  # the layout the cases rely on
        max_length = where(start, first, length)
        return ctx.after_good(make_sample("long", *LENGTH_TURNS)), {"model": ctx.model_dir, "max_length": max_length}

    return build


LENGTH_AT = {"sample_id": "long", "turn": None, **LINE2}
case("L501", 1, says="inside picture 1", **LENGTH_AT)(with_cut(lambda start, first, length: start + IMAGE_TOKENS // 2))
case("L502", 1, says="no token of the assistant", **LENGTH_AT)(
    with_cut(lambda start, first, length: (start + IMAGE_TOKENS + first) // 2)
)
case("L503", 0, says="will not be learned", **LENGTH_AT)(with_cut(lambda start, first, length: (first + length) // 2))


@pytest.fixture
def ctx(tmp_path, request) -> Ctx:
    return Ctx(tmp_path, request)


def test_corpus_covers_the_catalogue():
    assert {c.code for c in CASES} == set(CHECKS)
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_corpus_case(case: Case, ctx: Ctx):
    paths, options = case.build(ctx)
    report = validate_data(paths, ValidateOptions(**options))

    assert set(report.counts) == {case.code}, [(f.code, f.message) for f in report.findings]
    assert report.exit_code == case.exit_code
    info = CHECKS[case.code]
    assert report.errors == sum(1 for f in report.findings if f.severity is Severity.error)
    assert (report.errors > 0) == (info.severity is Severity.error)
    assert report.files[0].readable == (case.exit_code != 2)

    finding = next(f for f in report.findings if f.code == case.code)
    assert (finding.name, finding.severity) == (info.name, info.severity)
    assert finding.fix  # the catalogue's fix, or one tailored to the finding
    assert finding.file == str(paths[0])
    if case.says is not None:
        assert case.says in finding.message
    for key, expected in case.where.items():
        assert getattr(finding, key) == expected, f"{key}: {getattr(finding, key)!r} != {expected!r}"
    if finding.sample_index is not None and report.files[0].samples:
        # the finding's sample is excluded from the valid ones exactly when it is an error
        assert report.valid_samples == report.samples - (info.severity is Severity.error)


# --- behaviour around the corpus ---------------------------------------------------------------------


def test_clean_control_reports_nothing(ctx: Ctx, tiny_model_dir):
    ctx.image("pic.png")
    ctx.image("more/other.png")
    data = [
        GOOD,
        make_sample("pic", picture("pic.png") + ASK, "A red square."),
        make_sample(
            "two",
            picture("pic.png") + picture("more/other.png", 2) + "Where is the square?",
            "<ref>the square</ref><box>(10,20),(300,400)</box> and <quad>(1,2),(30,2),(30,40),(1,40)</quad>",
            "Thanks." + picture(str(ctx.tmp / "pic.png"), 3) + "And here?",
            "<box>(0,0),(999,999)</box>",
        ),
    ]
    paths = [ctx.json_list(data), ctx.jsonl(*data)]
    report = validate_data(paths, ValidateOptions(model=tiny_model_dir, max_length=4096))
    assert report.findings == []
    assert report.counts == {}
    assert (report.errors, report.warnings, report.exit_code) == (0, 0, 0)
    assert report.samples == report.valid_samples == 6
    assert report.images_checked == 2  # pic.png (by its relative and its absolute path) and other.png
    assert report.lengths is not None and report.lengths.count == 6 and report.lengths.over_limit == 0


def test_warnings_alone_exit_0_but_1_when_strict(ctx: Ctx):
    path = ctx.jsonl(
        GOOD,
        make_sample("trailing-user", "Hello", "Hi!", "Bye"),  # S116
        {**make_sample("extra-key", "Q", "A"), "source": "web"},  # S119
    )
    lenient = validate_data([path], ValidateOptions(check_images=False))
    assert set(lenient.counts) == {"S116", "S119"}
    assert all(f.severity is Severity.warning for f in lenient.findings)
    assert (lenient.errors, lenient.warnings, lenient.exit_code) == (0, 2, 0)
    assert lenient.valid_samples == 3

    strict = validate_data([path], ValidateOptions(check_images=False, strict=True))
    assert strict.counts == lenient.counts
    assert strict.strict is True
    assert (strict.errors, strict.warnings, strict.exit_code) == (0, 2, 1)
    assert strict.valid_samples == 1


def test_relative_image_paths_resolve_against_the_data_files_folder(ctx: Ctx, monkeypatch):
    ctx.image("data/imgs/pic.png")
    path = ctx.file(
        "data/train.jsonl", (json.dumps(make_sample("a", picture("imgs/pic.png") + ASK, "A")) + "\n").encode()
    )
    elsewhere = ctx.tmp / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the current directory plays no part

    report = validate_data([path])
    assert report.findings == [] and report.exit_code == 0
    assert report.images_checked == 1

    # Relative data-file paths work too: the folder is resolved from the path given.
    monkeypatch.chdir(ctx.tmp)
    report = validate_data([Path("data/train.jsonl")])
    assert report.findings == [] and report.exit_code == 0

    # The same sample in a file of another folder does not find the picture.
    moved = ctx.file("other/train.jsonl", path.read_bytes())
    report = validate_data([moved])
    assert [f.code for f in report.findings] == ["I401"]
    assert str(ctx.tmp / "other" / "imgs" / "pic.png") in report.findings[0].message


def test_relative_image_paths_resolve_against_image_root(ctx: Ctx):
    ctx.image("images/pic.png")
    path = ctx.file("data/train.jsonl", (json.dumps(make_sample("a", picture("pic.png") + ASK, "A")) + "\n").encode())

    without_root = validate_data([path])
    assert [(f.code, f.sample_id, f.turn, f.line) for f in without_root.findings] == [("I401", "a", 0, 1)]
    assert without_root.exit_code == 1

    with_root = validate_data([path], ValidateOptions(image_root=ctx.tmp / "images"))
    assert with_root.findings == [] and with_root.exit_code == 0
    assert with_root.images_checked == 1

    # An image root that is wrong reports the path it looked at.
    wrong_root = validate_data([path], ValidateOptions(image_root=ctx.tmp / "data"))
    assert [f.code for f in wrong_root.findings] == ["I401"]
    assert str(ctx.tmp / "data" / "pic.png") in wrong_root.findings[0].message


def test_one_bad_jsonl_line_is_reported_and_the_others_are_still_checked(ctx: Ctx):
    path = ctx.jsonl(
        GOOD,
        '{"id": "broken", "conversations": [}',
        {"id": "s3", "conversations": []},
        make_sample("s4", "Hello", "Hi!"),
    )
    report = validate_data([path], ValidateOptions(check_images=False))
    assert [(f.code, f.line, f.sample_index) for f in report.findings] == [("F004", 2, 1), ("S108", 3, 2)]
    assert report.findings[0].column == 36  # the `}`
    assert report.findings[1].sample_id == "s3"
    assert report.exit_code == 1
    assert report.files[0].readable is True
    assert (report.samples, report.valid_samples) == (4, 2)


def test_a_jsonl_file_where_every_line_is_bad_is_unreadable(ctx: Ctx):
    path = ctx.jsonl("{not json", "{'single': 'quotes'}", '{"id": "x",}')
    report = validate_data([path])
    assert [(f.code, f.line) for f in report.findings] == [("F004", 1), ("F004", 2), ("F004", 3)]
    assert report.exit_code == 2
    assert report.files[0].readable is False
    assert report.valid_samples == 0


def test_url_cache_remembers_successes_only(ctx: Ctx, http_server: _Server, _isolated_cache: Path):
    ok, gone = http_server.url("/pic.png"), http_server.url("/gone.png")
    path = ctx.jsonl(
        make_sample("ok", picture(ok) + ASK, "A red square."),
        make_sample("gone", picture(gone) + ASK, "Nothing."),
    )
    options = ValidateOptions(check_urls=True, url_timeout=5)

    first = validate_data([path], options)
    assert [(f.code, f.sample_id) for f in first.findings] == [("I407", "gone")]
    assert (first.urls_found, first.urls_checked) == (2, 2)
    assert http_server.hits["/pic.png"] == 1
    gone_hits = http_server.hits["/gone.png"]
    assert gone_hits >= 1
    assert (_isolated_cache / "url-checks.json").is_file()
    assert ok in json.loads((_isolated_cache / "url-checks.json").read_text("utf-8"))

    second = validate_data([path], options)
    assert [(f.code, f.sample_id) for f in second.findings] == [("I407", "gone")]
    assert http_server.hits["/pic.png"] == 1  # answered from the cache
    assert http_server.hits["/gone.png"] > gone_hits  # failures are asked again

    no_cache = validate_data([path], ValidateOptions(check_urls=True, url_timeout=5, url_cache=False))
    assert [f.code for f in no_cache.findings] == ["I407"]
    assert http_server.hits["/pic.png"] == 2


def test_urls_are_not_fetched_without_check_urls(ctx: Ctx, http_server: _Server):
    path = ctx.jsonl(make_sample("gone", picture(http_server.url("/gone.png")) + ASK, "Nothing."))
    report = validate_data([path])
    assert report.findings == [] and report.exit_code == 0
    assert (report.urls_found, report.urls_checked) == (1, 0)
    assert http_server.hits == {}


def test_length_statistics(ctx: Ctx, tiny_model_dir):
    ctx.image("pic.png")
    path = ctx.jsonl(
        make_sample("short", "Hi", "Hello"),
        make_sample("medium", "Tell me about the quick brown fox.", "It jumps over the lazy dog. " * 3),
        make_sample("long", "Describe it. " * 5, "The quick brown fox jumps over the lazy dog. " * 4),
        make_sample("picture", *LENGTH_TURNS),
        {"id": "broken", "conversations": []},  # not counted: it has an error already
    )
    report = validate_data([path], ValidateOptions(model=tiny_model_dir, max_length=4096))
    assert [f.code for f in report.findings] == ["S108"]
    stats = report.lengths
    assert stats is not None
    assert stats.count == 4
    assert stats.max_length == 4096
    assert stats.tokenizer == str(tiny_model_dir)
    assert 0 < stats.min <= stats.median <= stats.p95 <= stats.max
    assert stats.max > IMAGE_TOKENS  # the picture sample counts its 258 picture tokens
    assert stats.min < stats.max
    assert stats.over_limit == 0
    assert sum(b.count for b in stats.histogram) == stats.count
    assert all(b.low <= b.high for b in stats.histogram)
    assert all(a.high < b.low for a, b in zip(stats.histogram, stats.histogram[1:], strict=False))

    # With a limit between the plain samples and the picture one, only the picture sample is over it.
    tight = validate_data([path], ValidateOptions(model=tiny_model_dir, max_length=stats.max - 1))
    assert tight.lengths is not None
    assert tight.lengths.count == 4 and tight.lengths.over_limit == 1
    assert sum(b.count for b in tight.lengths.histogram) == 4
    assert set(tight.counts) == {"S108", "L503"}
    assert next(f for f in tight.findings if f.code == "L503").sample_id == "picture"
    assert tight.exit_code == 1  # S108 is an error; L503 alone would be a warning


def test_no_lengths_without_a_model(ctx: Ctx):
    report = validate_data([ctx.jsonl(GOOD)])
    assert report.lengths is None
    assert report.exit_code == 0


# --- regressions -----------------------------------------------------------------------------------


def test_duplicates_on_one_line_are_found(ctx: Ctx):
    """A minified JSON list puts every sample on line 1: duplicates are told apart by position."""
    good = make_sample("a")
    path = ctx.file("minified.json", json.dumps([good, good]).encode())
    report = validate_data([path])
    assert sorted(f.code for f in report.findings) == ["S105", "S118"]
    assert all(f.sample_index == 1 and f.line == 1 for f in report.findings)
    assert "sample #0 (line 1)" in report.findings[0].message


def test_non_image_url_is_not_cached_as_good(ctx: Ctx, http_server: _Server):
    path = ctx.jsonl(make_sample("page", picture(http_server.url("/page.html")) + ASK, "A page."))
    options = ValidateOptions(check_urls=True, url_timeout=5, strict=True)
    for _ in range(2):
        report = validate_data([path], options)
        assert [f.code for f in report.findings] == ["I409"]
        assert report.exit_code == 1
    assert http_server.hits["/page.html"] == 2


@pytest.mark.parametrize("first_line", ["not json", "42"])
def test_bad_first_line_of_a_jsonl_file_is_one_bad_line(ctx: Ctx, first_line: str):
    path = ctx.jsonl(first_line, make_sample("a"), make_sample("b", "Q", "A"))
    report = validate_data([path])
    assert report.exit_code == 1
    assert report.samples == 3 and report.valid_samples == 2
    assert [(f.code, f.line) for f in report.findings] == [("F004" if first_line == "not json" else "S101", 1)]


def test_null_from_is_named_as_null(ctx: Ctx):
    path = ctx.jsonl({"id": "a", "conversations": [{"from": None, "value": "Q"}, {"from": "assistant", "value": "A"}]})
    (finding,) = validate_data([path]).findings
    assert finding.code == "S110"
    assert finding.message == "turn 0's `from` is null"
