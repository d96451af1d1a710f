"""The markup scanner, parser and formatter (`qwenvl_cli.markup`) and the box/quad models."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from qwenvl_cli.markup import (
    MarkupError,
    format_markup,
    grounding_markup,
    parse_box_text,
    parse_markup,
    parse_quad_text,
    picture_markup,
    scan_markup,
    snippet,
)
from qwenvl_cli.schemas import Box, BoxSpan, PictureSpan, Quad, QuadSpan, RefSpan, TextSpan

PROPERTY = settings(max_examples=200, deadline=None)

FRAGMENTS = (
    "<img>",
    "</img>",
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
    "<quad>",
    "</quad>",
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<|extra_7|>",
    "<imgpad>",
    "Picture 1: ",
    "Picture 1: \n",
    "picture 2:",
    "Picture 3：",
    "(1,2),(3,4)",
    "(1,2),(3,4),(5,6),(7,8)",
    "<",
    ">",
    "/",
    "|",
    "\n",
    " ",
    "é",
    "e\u0301",
    "图片",
    "🙂",
)
messy_text = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=4)), max_size=14).map("".join)


# --------------------------------------------------------------------------------------------------
# Properties


def assert_tiles(text: str) -> None:
    scan = scan_markup(text)
    pieces = [text[s.start : s.end] for s in scan.spans]
    assert "".join(pieces) == text
    if not text:
        assert scan.spans == []
        return
    assert scan.spans[0].start == 0
    assert scan.spans[-1].end == len(text)
    for before, after in zip(scan.spans, scan.spans[1:], strict=False):
        assert before.end == after.start
    for span in scan.spans:
        assert span.start < span.end
        assert span.kind in ("text", "img", "ref", "box", "quad")
        if span.kind == "text":
            assert span.content == text[span.start : span.end]
        else:
            tag = "img" if span.kind == "img" else span.kind
            assert text[span.start : span.end].endswith(f"<{tag}>{span.content}</{tag}>")
    for problem in scan.problems:
        assert 0 <= problem.offset < len(text)
        assert re.fullmatch(r"M20[1-4]", problem.code)


@PROPERTY
@given(messy_text)
def test_scan_never_raises_and_spans_tile_the_input(text):
    assert_tiles(text)
    scan = scan_markup(text)
    if scan.problems:
        with pytest.raises(MarkupError) as info:
            parse_markup(text)
        assert info.value.problems == scan.problems
    else:
        assert len(parse_markup(text)) == len(scan.spans)


@PROPERTY
@given(st.text())
def test_scan_tiles_arbitrary_unicode(text):
    assert_tiles(text)


no_lt = st.text(st.characters(exclude_characters="<"), max_size=12)
no_lt_fragments = st.lists(
    st.one_of(st.sampled_from([f for f in FRAGMENTS if "<" not in f]), no_lt), min_size=1, max_size=5
).map("".join)


@st.composite
def boxes(draw) -> Box:
    x1 = draw(st.integers(0, 998))
    y1 = draw(st.integers(0, 998))
    return Box(x1=x1, y1=y1, x2=draw(st.integers(x1 + 1, 999)), y2=draw(st.integers(y1 + 1, 999)))


coord = st.integers(0, 999)
quads = st.tuples(*[st.tuples(coord, coord)] * 4).map(lambda points: Quad(points=points))
numbers = st.integers(1, 120)

spans_strategy = st.lists(
    st.one_of(
        no_lt_fragments.filter(bool).map(lambda t: TextSpan(text=t)),
        st.builds(lambda path, n: PictureSpan(path=path, number=n, label=f"Picture {n}: "), no_lt, numbers),
        no_lt.map(lambda path: PictureSpan(path=path)),
        no_lt.map(lambda t: RefSpan(text=t)),
        boxes().map(lambda b: BoxSpan(raw=b.to_text(), box=b)),
        quads.map(lambda q: QuadSpan(raw=q.to_text(), quad=q)),
    ),
    max_size=10,
)


@PROPERTY
@given(spans_strategy)
def test_format_parse_format_is_stable(spans):
    text = format_markup(spans)
    parsed = parse_markup(text)
    assert format_markup(parsed) == text
    # Markup spans come back as they were; text spans may merge but keep every character.
    markup_in = [s for s in spans if not isinstance(s, TextSpan)]
    markup_out = [s for s in parsed if not isinstance(s, TextSpan)]
    assert len(markup_out) == len(markup_in)
    for got, want in zip(markup_out, markup_in, strict=True):
        if isinstance(want, PictureSpan):
            assert isinstance(got, PictureSpan)
            assert got.path == want.path
            if want.label:
                assert (got.number, got.label) == (want.number, want.label)
        else:
            assert got == want


@PROPERTY
@given(messy_text)
def test_format_of_parse_is_identity_for_well_formed_text(text):
    try:
        spans = parse_markup(text)
    except MarkupError:
        return
    assert format_markup(spans) == text


def test_label_before_newline_keeps_the_newline():
    # Regression: the exact-label regex once ended in `$`, which also matches before a final newline,
    # so "Picture 1: \n<img>" was taken as the exact label and the newline was dropped.
    text = "Picture 1: \n<img>a.png</img>"
    scan = scan_markup(text)
    head, img = scan.spans
    assert (head.kind, head.content) == ("text", "Picture 1: \n")
    assert (img.number, img.label, img.loose_label, img.start) == (1, "", "Picture 1: \n", 12)
    assert format_markup(parse_markup(text)) == text


# --------------------------------------------------------------------------------------------------
# Scanner problems


def codes(text: str) -> list[tuple[str, int]]:
    return [(p.code, p.offset) for p in scan_markup(text).problems]


def test_plain_text_is_one_span():
    scan = scan_markup("no tags here > at all")
    assert [(s.kind, s.start, s.end, s.content) for s in scan.spans] == [("text", 0, 21, "no tags here > at all")]
    assert scan.problems == []
    assert scan_markup("").spans == []


def test_well_formed_message_spans():
    text = (
        "Picture 1: <img>a.png</img>\nFind <ref>the cat</ref><box>(1,2),(30,40)</box>"
        "<quad>(1,2),(3,4),(5,6),(7,8)</quad>"
    )
    scan = scan_markup(text)
    assert scan.problems == []
    assert [(s.kind, s.content) for s in scan.spans] == [
        ("img", "a.png"),
        ("text", "\nFind "),
        ("ref", "the cat"),
        ("box", "(1,2),(30,40)"),
        ("quad", "(1,2),(3,4),(5,6),(7,8)"),
    ]
    img = scan.spans[0]
    assert (img.start, img.end, img.number, img.label, img.loose_label) == (0, 27, 1, "Picture 1: ", "")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<ref>abc", [("M201", 0)]),
        ("x <img>a.png", [("M201", 2)]),
        ("<box>(1,2),(3,4)", [("M201", 0)]),
        ("abc</box>", [("M202", 3)]),
        ("</img>", [("M202", 0)]),
        ("<img>a</ref></img>", [("M202", 6)]),
        ("<ref>a<ref>b</ref>", [("M203", 6)]),
        ("<ref>a<box>(1,2),(3,4)</box></ref>", [("M203", 6)]),
        ("<quad>(1,2),<img>x</img></quad>", [("M203", 12)]),
    ],
)
def test_tag_problems(text, expected):
    assert codes(text) == expected
    with pytest.raises(MarkupError) as info:
        parse_markup(text)
    assert info.value.problems[0].code == expected[0][0]
    assert str(info.value).startswith(f"{expected[0][0]} at offset {expected[0][1]}: ")


def test_unclosed_message_names_the_tag():
    (problem,) = scan_markup("<quad>(1,2)").problems
    assert "<quad>" in problem.message and "</quad>" in problem.message


@pytest.mark.parametrize("token", ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|extra_12|>", "<imgpad>"])
def test_control_tokens_are_reported(token):
    text = f"hello {token} there"
    scan = scan_markup(text)
    assert [(p.code, p.offset) for p in scan.problems] == [("M204", 6)]
    assert token in scan.problems[0].message
    assert "".join(s.content for s in scan.spans) == text
    with pytest.raises(MarkupError):
        parse_markup(text)


def test_look_alikes_of_control_tokens_are_text():
    text = "<|im_begin|> <|extra_|> <img pad> <imgpads"
    assert scan_markup(text).problems == []
    assert parse_markup(text) == [TextSpan(text=text)]


def test_every_problem_is_collected():
    text = "<|im_end|></ref><box>(1,2),(3,4)"
    assert codes(text) == [("M204", 0), ("M202", 10), ("M201", 16)]
    with pytest.raises(MarkupError, match=r"\(and 2 more\)"):
        parse_markup(text)


@pytest.mark.parametrize(
    ("prefix", "number", "label"),
    [
        ("Picture 1: ", 1, "Picture 1: "),
        ("see Picture 12: ", 12, "Picture 12: "),
        ("Picture 007: ", 7, "Picture 007: "),
    ],
)
def test_exact_picture_label(prefix, number, label):
    text = f"{prefix}<img>p.png</img>"
    scan = scan_markup(text)
    img = scan.spans[-1]
    assert (img.kind, img.number, img.label, img.loose_label) == ("img", number, label, "")
    assert text[img.start : img.end] == f"{label}<img>p.png</img>"
    (picture,) = [s for s in parse_markup(text) if isinstance(s, PictureSpan)]
    assert (picture.path, picture.number, picture.label) == ("p.png", number, label)


@pytest.mark.parametrize(
    ("prefix", "number", "loose"),
    [
        ("picture 1: ", 1, "picture 1: "),
        ("Picture1:", 1, "Picture1:"),
        ("Picture 2:", 2, "Picture 2:"),
        ("PICTURE 3 ", 3, "PICTURE 3 "),
        ("Picture 4：", 4, "Picture 4："),
        ("Picture 5:  ", 5, "Picture 5:  "),
    ],
)
def test_loose_picture_label(prefix, number, loose):
    text = f"{prefix}<img>p.png</img>"
    scan = scan_markup(text)
    assert scan.problems == []
    head, img = scan.spans
    assert (head.kind, head.content) == ("text", prefix)
    assert (img.kind, img.number, img.label, img.loose_label, img.start) == ("img", number, "", loose, len(prefix))
    # The loose label stays text: the parsed picture has no number.
    parsed = parse_markup(text)
    assert parsed == [TextSpan(text=prefix), PictureSpan(path="p.png")]
    assert format_markup(parsed) == text


def test_picture_without_label():
    scan = scan_markup("look: <img>http://x/y.jpg</img>")
    img = scan.spans[-1]
    assert (img.number, img.label, img.loose_label, img.content) == (None, "", "", "http://x/y.jpg")


def test_label_is_only_looked_for_after_the_previous_span():
    text = "Picture 1: <ref>r</ref><img>a</img>"
    img = scan_markup(text).spans[-1]
    assert (img.number, img.label, img.loose_label) == (None, "", "")


def test_empty_img_is_a_picture_with_empty_path():
    scan = scan_markup("Picture 1: <img></img>")
    assert scan.problems == []
    (img,) = scan.spans
    assert (img.kind, img.content, img.number) == ("img", "", 1)
    assert parse_markup("<img></img>") == [PictureSpan(path="")]


def test_invalid_box_keeps_raw_text():
    text = "<box>(5,2),(3,4)</box><box>(1, 2),(3,4)</box><quad>(1,2)</quad>"
    parsed = parse_markup(text)
    assert parsed == [
        BoxSpan(raw="(5,2),(3,4)", box=None),
        BoxSpan(raw="(1, 2),(3,4)", box=None),
        QuadSpan(raw="(1,2)", quad=None),
    ]
    assert format_markup(parsed) == text


def test_valid_markup_parses_to_typed_spans():
    text = "Picture 2: <img>b.png</img>\n<ref>dog</ref><box>(0,0),(999,999)</box>"
    assert parse_markup(text) == [
        PictureSpan(path="b.png", number=2, label="Picture 2: "),
        TextSpan(text="\n"),
        RefSpan(text="dog"),
        BoxSpan(raw="(0,0),(999,999)", box=Box(x1=0, y1=0, x2=999, y2=999)),
    ]


def test_format_fills_in_missing_raw_and_label():
    box = Box(x1=1, y1=2, x2=3, y2=4)
    quad = Quad(points=((1, 2), (3, 4), (5, 6), (7, 8)))
    spans = [PictureSpan(path="a.png", number=3), BoxSpan(raw="", box=box), QuadSpan(raw="", quad=quad)]
    assert (
        format_markup(spans) == "Picture 3: <img>a.png</img><box>(1,2),(3,4)</box><quad>(1,2),(3,4),(5,6),(7,8)</quad>"
    )


# --------------------------------------------------------------------------------------------------
# Box and quad text


def test_parse_box_text_valid():
    result = parse_box_text("(0,10),(999,20)")
    assert (result.points, result.code, result.message) == ([(0, 10), (999, 20)], None, "")


@pytest.mark.parametrize(
    ("raw", "hint"),
    [
        ("(1, 2),(3,4)", "remove the spaces"),
        (" (1,2),(3,4)", "remove the spaces"),
        ("(0.1,0.2),(0.3,0.4)", "multiply fractions by 1000"),
        ("(.1,2),(3,4)", "multiply fractions by 1000"),
        ("[1,2],[3,4]", "use parentheses, not brackets"),
        ("(1,2)", "write integers"),
        ("(1,2),(3,4),(5,6)", "write integers"),
        ("", "write integers"),
        ("(a,b),(c,d)", "write integers"),
    ],
)
def test_parse_box_text_malformed(raw, hint):
    result = parse_box_text(raw)
    assert (result.points, result.code) == (None, "B301")
    assert hint in result.message


@pytest.mark.parametrize("raw", ["(-1,2),(3,4)", "(1,2),(3,1000)", "(1000,2),(1001,4)", "(0,-5),(3,4)"])
def test_parse_box_text_out_of_range(raw):
    result = parse_box_text(raw)
    assert result.code == "B302"
    assert result.points is not None and len(result.points) == 2
    assert "outside [0,1000)" in result.message


@pytest.mark.parametrize(
    ("raw", "part"),
    [("(5,2),(3,4)", "x1=5"), ("(3,2),(3,4)", "x1=3"), ("(1,9),(3,4)", "y1=9"), ("(1,4),(3,4)", "y1=4")],
)
def test_parse_box_text_inverted(raw, part):
    result = parse_box_text(raw)
    assert result.code == "B303"
    assert part in result.message


def test_parse_quad_text_valid():
    result = parse_quad_text("(0,0),(999,0),(999,999),(0,999)")
    assert (result.points, result.code) == ([(0, 0), (999, 0), (999, 999), (0, 999)], None)


@pytest.mark.parametrize("raw", ["(1,2),(3,4),(5,6)", "(1,2),(3,4),(5,6),(7,8),(9,10)", "(1,2)"])
def test_parse_quad_text_wrong_point_count(raw):
    result = parse_quad_text(raw)
    assert result.code == "B304"
    assert result.points is not None
    assert f"quad has {len(result.points)} points, expected 4" == result.message
    assert len(result.points) == raw.count("(")


@pytest.mark.parametrize("raw", ["(1,2),(3,4),(5,6),(7,1000)", "(-1,2),(3,4),(5,6),(7,8)"])
def test_parse_quad_text_out_of_range(raw):
    result = parse_quad_text(raw)
    assert result.code == "B302"
    assert len(result.points) == 4


@pytest.mark.parametrize(
    ("raw", "hint"),
    [
        ("(1,2), (3,4),(5,6),(7,8)", "remove the spaces"),
        ("(1.5,2),(3,4),(5,6),(7,8)", "multiply fractions"),
        ("[1,2],[3,4],[5,6],[7,8]", "brackets"),
        ("(1,2),(3,4),(5,6),", "write integers"),
    ],
)
def test_parse_quad_text_malformed(raw, hint):
    result = parse_quad_text(raw)
    assert (result.points, result.code) == (None, "B301")
    assert hint in result.message


# --------------------------------------------------------------------------------------------------
# Pydantic models


def test_box_model_accepts_the_extremes():
    box = Box(x1=0, y1=0, x2=999, y2=999)
    assert box.to_text() == "(0,0),(999,999)"


@pytest.mark.parametrize(
    "coords",
    [
        (-1, 0, 5, 5),
        (0, -1, 5, 5),
        (0, 0, 1000, 5),
        (0, 0, 5, 1000),
        (5, 0, 5, 6),
        (6, 0, 5, 6),
        (0, 6, 5, 6),
        (0, 7, 5, 6),
        (0.5, 0, 5, 6),
        ("a", 0, 5, 6),
    ],
)
def test_box_model_rejects_invalid(coords):
    x1, y1, x2, y2 = coords
    with pytest.raises(ValidationError):
        Box(x1=x1, y1=y1, x2=x2, y2=y2)


def test_box_model_is_frozen():
    box = Box(x1=0, y1=0, x2=1, y2=1)
    with pytest.raises(ValidationError):
        box.x1 = 5


@PROPERTY
@given(st.integers(-5, 1005), st.integers(-5, 1005), st.integers(-5, 1005), st.integers(-5, 1005))
def test_box_model_agrees_with_parse_box_text(x1, y1, x2, y2):
    valid = all(0 <= v < 1000 for v in (x1, y1, x2, y2)) and x1 < x2 and y1 < y2
    raw = f"({x1},{y1}),({x2},{y2})"
    assert (parse_box_text(raw).code is None) == valid
    if valid:
        assert Box(x1=x1, y1=y1, x2=x2, y2=y2).to_text() == raw
    else:
        with pytest.raises(ValidationError):
            Box(x1=x1, y1=y1, x2=x2, y2=y2)


def test_quad_model():
    quad = Quad(points=((0, 0), (999, 0), (999, 999), (0, 999)))
    assert quad.to_text() == "(0,0),(999,0),(999,999),(0,999)"
    with pytest.raises(ValidationError):
        Quad(points=((0, 0), (1000, 0), (999, 999), (0, 999)))
    with pytest.raises(ValidationError):
        Quad(points=((0, -1), (1, 0), (999, 999), (0, 999)))
    with pytest.raises(ValidationError):
        Quad(points=((0, 0), (1, 0), (999, 999)))
    with pytest.raises(ValidationError):
        Quad(points=((0, 0), (1, 0), (2, 2), (3, 3), (4, 4)))


# --------------------------------------------------------------------------------------------------
# Helpers


def test_picture_markup():
    text = picture_markup(2, "imgs/a b.png")
    assert text == "Picture 2: <img>imgs/a b.png</img>\n"
    assert parse_markup(text) == [
        PictureSpan(path="imgs/a b.png", number=2, label="Picture 2: "),
        TextSpan(text="\n"),
    ]


def test_grounding_markup():
    box = Box(x1=10, y1=20, x2=30, y2=40)
    assert grounding_markup(box) == "<box>(10,20),(30,40)</box>"
    text = grounding_markup(box, "the cat")
    assert text == "<ref>the cat</ref><box>(10,20),(30,40)</box>"
    assert parse_markup(text) == [RefSpan(text="the cat"), BoxSpan(raw="(10,20),(30,40)", box=box)]
    assert grounding_markup(box, "") == "<ref></ref><box>(10,20),(30,40)</box>"


def test_snippet_short_text_is_whole_and_escaped():
    assert snippet("a\nb\tc\rd", 2) == "a\\nb\\tc\\rd"
    assert snippet("", 0) == ""


def test_snippet_long_text():
    text = "".join(chr(ord("a") + i % 26) for i in range(100))
    middle = snippet(text, 50)
    assert middle == "…" + text[30:90] + "…"
    assert snippet(text, 0) == text[:60] + "…"
    # Near the end the window slides back to keep its width.
    assert snippet(text, 99) == "…" + text[40:]
    assert snippet(text, 50, width=10) == "…" + text[47:57] + "…"


@PROPERTY
@given(st.text(st.characters(exclude_characters="\n\r\t…"), max_size=150), st.data())
def test_snippet_shows_the_offset(text, data):
    offset = data.draw(st.integers(0, max(0, len(text) - 1)))
    out = snippet(text, offset, width=40)
    body = out.removeprefix("…").removesuffix("…")
    assert len(body) == min(40, len(text))
    if not out.startswith("…"):
        start = 0
    elif not out.endswith("…"):
        start = len(text) - len(body)
    else:
        start = offset - 40 // 3  # a window in the middle starts a third of its width before the offset
    assert text[start : start + len(body)] == body
    if text:
        assert start <= offset < start + len(body)
    assert out.startswith("…") == (start > 0)
    assert out.endswith("…") == (start + len(body) < len(text))


def test_box_pixel_mapping_round_trips_and_matches_upstream_drawing():
    box = Box.from_pixels(64, 48, 320, 240, width=640, height=480)
    assert box == Box(x1=100, y1=100, x2=500, y2=500)
    assert box.to_pixels(640, 480) == (64, 48, 320, 240)
    # The far edge clamps to 999; pixel coordinates come back within the image.
    edge = Box.from_pixels(0, 0, 640, 480, width=640, height=480)
    assert (edge.x2, edge.y2) == (999, 999)
    assert edge.to_pixels(640, 480) == (0, 0, 639, 479)
    with pytest.raises(ValueError):
        Box.from_pixels(10, 10, 10, 20, width=640, height=480)  # empty box
