"""The tiktoken-based tokenizer (`qwenvl_cli.model.tokenizer`) and the ChatML template (`model.template`)."""

from __future__ import annotations

import unicodedata

import pytest
from conftest import SHARED_VOCAB
from hypothesis import given, settings
from hypothesis import strategies as st

from qwenvl_cli.errors import QwenvlError
from qwenvl_cli.markup import MarkupError
from qwenvl_cli.model.template import DEFAULT_SYSTEM, IGNORE_INDEX, IMAGE_TOKENS, ChatTemplate
from qwenvl_cli.model.tokenizer import (
    EXTRAS,
    SPECIAL_TOKENS,
    VOCAB_FILE,
    QwenVLTokenizer,
    load_ranks,
    train_bpe_ranks,
    write_ranks,
)

PROPERTY = settings(max_examples=200, deadline=None)
MARKUP_ORDER = ("<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", "<img>", "</img>", "<imgpad>")


@pytest.fixture(scope="module")
def tok(tiny_model_dir) -> QwenVLTokenizer:
    return QwenVLTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def template(tok) -> ChatTemplate:
    return ChatTemplate(tok)


# --------------------------------------------------------------------------------------------------
# Special tokens and vocabulary


def test_special_token_ids_follow_the_ranks(tok, tiny_model_dir):
    n = len(load_ranks(tiny_model_dir / VOCAB_FILE))
    assert tok.num_ranks == n
    assert tok.special_ids["<|endoftext|>"] == n == tok.eod_id
    assert tok.special_ids["<|im_start|>"] == n + 1 == tok.im_start_id
    assert tok.special_ids["<|im_end|>"] == n + 2 == tok.im_end_id
    assert len(EXTRAS) == 205
    for i in range(205):
        assert tok.special_ids[f"<|extra_{i}|>"] == n + 3 + i
    for i, token in enumerate(MARKUP_ORDER):
        assert tok.special_ids[token] == n + 208 + i
    assert (tok.img_start_id, tok.img_end_id, tok.img_pad_id) == (n + 214, n + 215, n + 216)
    assert len(tok) == n + 217 == n + len(SPECIAL_TOKENS)
    assert sorted(tok.special_ids.values()) == list(range(n, len(tok)))


def test_special_ids_decode_to_their_text(tok):
    for token, token_id in tok.special_ids.items():
        assert tok.decode([token_id]) == token


def test_tiny_model_dir_tokenizer_is_named_after_its_folder(tok, tiny_model_dir):
    assert tok.name == tiny_model_dir.name


# --------------------------------------------------------------------------------------------------
# Training a vocabulary

CORPUS = "The quick brown fox jumps over the lazy dog. Hello hello world! 数字 123 " * 4


def test_train_bpe_ranks_is_deterministic():
    first = train_bpe_ranks(CORPUS, 400)
    second = train_bpe_ranks(CORPUS, 400)
    assert first == second
    assert list(first.items()) == list(second.items())


def test_train_bpe_ranks_starts_with_the_256_bytes():
    ranks = train_bpe_ranks(CORPUS, 400)
    assert 256 < len(ranks) <= 400
    for b in range(256):
        assert ranks[bytes([b])] == b
    assert all(len(token) > 1 for token, rank in ranks.items() if rank >= 256)
    assert sorted(ranks.values()) == list(range(len(ranks)))


def test_train_bpe_ranks_learns_frequent_words():
    ranks = train_bpe_ranks("hello world, hello there. hello! " * 5, 300)
    tokenizer = QwenVLTokenizer(ranks)
    assert len(tokenizer.encode("hello")) == 1
    assert len(tokenizer.encode(" hello")) == 1


def test_train_bpe_ranks_limits():
    assert len(train_bpe_ranks(CORPUS, 256)) == 256
    assert len(train_bpe_ranks("ab", 1000)) == 257  # stops when no pair is left
    with pytest.raises(ValueError):
        train_bpe_ranks(CORPUS, 255)


@PROPERTY
@given(st.text())
def test_encode_decode_round_trips_unicode(tok, text):
    nfc = unicodedata.normalize("NFC", text)
    ids = tok.encode(text)
    assert tok.decode(ids) == nfc
    assert tok.decode(tok.encode_plain(text)) == nfc
    if "<" not in text:
        assert all(0 <= i < tok.num_ranks for i in ids)


@PROPERTY
@given(st.lists(st.sampled_from([*SPECIAL_TOKENS[:5], *MARKUP_ORDER, "é", "\n", " x", "<", "|>"]), max_size=8))
def test_encode_decode_round_trips_token_look_alikes(tok, parts):
    text = "".join(parts)
    assert tok.decode(tok.encode(text)) == text
    ids = tok.encode_plain(text)
    assert tok.decode(ids) == text
    assert all(i < tok.num_ranks for i in ids)


def test_nfc_normalisation(tok):
    composed, decomposed = "caf\u00e9 \u00c5", "cafe\u0301 A\u030a"
    assert composed != decomposed
    assert tok.encode(decomposed) == tok.encode(composed)
    assert tok.encode_plain(decomposed) == tok.encode_plain(composed)
    assert tok.decode(tok.encode(decomposed)) == composed


@pytest.mark.parametrize("typed", ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|extra_0|>", "<|extra_204|>"])
def test_typed_control_tokens_are_plain_text(tok, typed):
    ids = tok.encode(f"say {typed} now")
    assert not set(ids) & set(tok.special_ids.values())
    assert tok.decode(ids) == f"say {typed} now"


@pytest.mark.parametrize("token", MARKUP_ORDER)
def test_markup_tokens_are_special(tok, token):
    assert tok.encode(token) == [tok.special_ids[token]]
    ids = tok.encode(f"a{token}b")
    assert ids.count(tok.special_ids[token]) == 1
    plain = tok.encode_plain(token)
    assert tok.special_ids[token] not in plain and len(plain) > 1


def test_markup_in_text(tok):
    ids = tok.encode("<ref>cat</ref><box>(1,2),(3,4)</box>")
    assert ids[0] == tok.special_ids["<ref>"]
    assert ids[-1] == tok.special_ids["</box>"]
    assert [i for i in ids if i >= tok.num_ranks] == [
        tok.special_ids[t] for t in ("<ref>", "</ref>", "<box>", "</box>")
    ]


# --------------------------------------------------------------------------------------------------
# Vocabulary files


def test_write_and_load_ranks_round_trip(tmp_path):
    ranks = train_bpe_ranks(CORPUS, 300)
    path = tmp_path / VOCAB_FILE
    write_ranks(ranks, path)
    assert load_ranks(path) == ranks
    lines = path.read_text("ascii").splitlines()
    assert len(lines) == len(ranks)
    assert lines[0] == "AA== 0"  # base64 of b"\x00"


def test_load_ranks_skips_blank_lines(tmp_path):
    path = tmp_path / VOCAB_FILE
    path.write_text("YQ== 0\n\nYg== 1\n  \n", "ascii")
    assert load_ranks(path) == {b"a": 0, b"b": 1}


@pytest.mark.parametrize("bad", ["YWJj", "!!!! 3", "YQ== x", "YQ== 1 2", "YQ 1"])
def test_load_ranks_rejects_malformed_lines(tmp_path, bad):
    path = tmp_path / VOCAB_FILE
    path.write_text(f"YQ== 0\n{bad}\n", "ascii")
    with pytest.raises(QwenvlError) as info:
        load_ranks(path)
    assert "line 2" in info.value.message
    assert info.value.fix


def test_from_pretrained_without_vocab_file(tmp_path):
    with pytest.raises(QwenvlError) as info:
        QwenVLTokenizer.from_pretrained(tmp_path)
    assert VOCAB_FILE in info.value.message
    with pytest.raises(QwenvlError, match="does not exist"):
        QwenVLTokenizer.from_pretrained(tmp_path / "missing")


# --------------------------------------------------------------------------------------------------
# Chat template


def expected_labels(ids: list[int], tok: QwenVLTokenizer) -> list[int]:
    """Labels derived independently from the ids: walk the ChatML structure token by token."""
    (nl,) = tok.encode_plain("\n")
    labels: list[int] = []
    role = None
    i = 0
    while i < len(ids):
        token = ids[i]
        if token == tok.im_start_id:
            end = ids.index(nl, i + 1)
            role = tok.decode(ids[i + 1 : end])
            assert role in ("system", "user", "assistant")
            labels.append(token)  # <|im_start|> is learned
            labels.extend([IGNORE_INDEX] * (end - i))  # the role word and its newline are not
            i = end + 1
        elif token == tok.im_end_id:
            assert ids[i + 1] == nl
            labels.extend([token, nl])  # <|im_end|> and the newline after it are learned
            i += 2
        else:
            labels.append(token if role == "assistant" else IGNORE_INDEX)
            i += 1
    return labels


def without_pads(ids: list[int], tok: QwenVLTokenizer) -> list[int]:
    return [i for i in ids if i != tok.img_pad_id]


def test_two_turn_conversation(tok, template):
    encoded = template.encode([("user", "Hi there"), ("assistant", "Hello!")])
    assert tok.decode(encoded.input_ids) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
    )
    s, e = tok.im_start_id, tok.im_end_id
    (nl,) = tok.encode_plain("\n")
    system, user, assistant = (tok.encode_plain(w) for w in ("system", "user", "assistant"))
    prompt, hi, hello = tok.encode(DEFAULT_SYSTEM), tok.encode("Hi there"), tok.encode("Hello!")
    ids = [s, *system, nl, *prompt, e, nl, s, *user, nl, *hi, e, nl, s, *assistant, nl, *hello, e, nl]
    m = IGNORE_INDEX
    labels = [
        *[s, *[m] * len(system), m, *[m] * len(prompt), e, nl],
        *[s, *[m] * len(user), m, *[m] * len(hi), e, nl],
        *[s, *[m] * len(assistant), m, *hello, e, nl],
    ]
    assert encoded.input_ids == ids
    assert encoded.labels == labels
    assert expected_labels(ids, tok) == labels
    assert encoded.first_target == len(ids) - 2 - len(hello)
    assert encoded.input_ids[encoded.first_target : encoded.first_target + len(hello)] == hello
    assert (encoded.image_paths, encoded.image_starts) == ([], [])
    assert len(encoded) == len(ids)


FOUR_TURNS = [
    ("user", "Picture 1: <img>a.png</img>\nWhat is in the picture?"),
    ("assistant", "A <ref>cat</ref><box>(10,20),(300,400)</box> on a mat."),
    ("user", "Picture 2: <img>dir/b.jpg</img>\nAnd in this one?"),
    ("assistant", "The quick brown fox."),
]


def test_four_turn_conversation_with_two_pictures(tok, template):
    encoded = template.encode(FOUR_TURNS)
    ids, labels = encoded.input_ids, encoded.labels
    assert tok.decode(without_pads(ids, tok)) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nPicture 1: <img></img>\nWhat is in the picture?<|im_end|>\n"
        "<|im_start|>assistant\nA <ref>cat</ref><box>(10,20),(300,400)</box> on a mat.<|im_end|>\n"
        "<|im_start|>user\nPicture 2: <img></img>\nAnd in this one?<|im_end|>\n"
        "<|im_start|>assistant\nThe quick brown fox.<|im_end|>\n"
    )
    assert len(labels) == len(ids)
    assert labels == expected_labels(ids, tok)
    # Per-token check of the learned positions: exactly the template tokens and the assistant replies.
    learned = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    assert all(labels[i] == ids[i] for i in learned)
    assert [ids[i] for i in learned].count(tok.im_start_id) == 5
    assert [ids[i] for i in learned].count(tok.im_end_id) == 5
    assert ids.count(tok.im_start_id) == ids.count(tok.im_end_id) == 5
    learned_text = tok.decode([ids[i] for i in learned])
    assert learned_text == (
        "<|im_start|><|im_end|>\n" * 2  # system, user
        + "<|im_start|>A <ref>cat</ref><box>(10,20),(300,400)</box> on a mat.<|im_end|>\n"
        + "<|im_start|><|im_end|>\n<|im_start|>The quick brown fox.<|im_end|>\n"
    )


def test_pictures_expand_to_258_tokens(tok, template):
    encoded = template.encode(FOUR_TURNS)
    ids = encoded.input_ids
    assert IMAGE_TOKENS == 258
    assert encoded.image_paths == ["a.png", "dir/b.jpg"]
    assert len(encoded.image_starts) == 2
    assert [i for i, t in enumerate(ids) if t == tok.img_start_id] == encoded.image_starts
    for start in encoded.image_starts:
        block = ids[start : start + IMAGE_TOKENS]
        assert block == [tok.img_start_id, *[tok.img_pad_id] * 256, tok.img_end_id]
        assert all(label == IGNORE_INDEX for label in encoded.labels[start : start + IMAGE_TOKENS])
        assert tok.decode(ids[start - 5 : start]).startswith("Picture ")
    assert ids.count(tok.img_pad_id) == 512
    # The pictures' text around them is encoded as in the plain message.
    first = encoded.image_starts[0]
    assert tok.decode(ids[first + IMAGE_TOKENS : first + IMAGE_TOKENS + 3]).startswith("\nWhat")


def test_newline_between_label_and_picture_is_kept(tok, template):
    encoded = template.encode([("user", "Picture 1: \n<img>a.png</img>hi"), ("assistant", "ok")])
    assert encoded.image_paths == ["a.png"]
    assert "user\nPicture 1: \n<img></img>hi<|im_end|>" in tok.decode(without_pads(encoded.input_ids, tok))


def test_first_target_points_at_the_first_assistant_token(tok, template):
    encoded = template.encode(FOUR_TURNS)
    ids, target = encoded.input_ids, encoded.first_target
    assert target is not None
    head = [tok.im_start_id, *tok.encode_plain("assistant"), *tok.encode_plain("\n")]
    assert ids[target - len(head) : target] == head
    assert encoded.labels[target] == ids[target] != IGNORE_INDEX
    assert all(label == IGNORE_INDEX for label in encoded.labels[target - len(head) + 1 : target])
    assert tok.decode(ids[target:]).startswith("A <ref>cat</ref>")
    # Everything learned before it is template structure only.
    earlier = [ids[i] for i in range(target) if encoded.labels[i] != IGNORE_INDEX]
    assert set(earlier) <= {tok.im_start_id, tok.im_end_id, *tok.encode_plain("\n")}


def test_first_target_skips_an_empty_reply(template, tok):
    encoded = template.encode([("user", "a"), ("assistant", ""), ("user", "b"), ("assistant", "c")])
    assert tok.decode(encoded.input_ids[encoded.first_target :]) == "c<|im_end|>\n"
    assert template.encode([("user", "a")]).first_target is None


def test_user_only_conversation_learns_only_template_tokens(tok, template):
    encoded = template.encode([("user", "Hello there")])
    learned = [label for label in encoded.labels if label != IGNORE_INDEX]
    (nl,) = tok.encode_plain("\n")
    assert learned == [tok.im_start_id, tok.im_end_id, nl] * 2


def test_custom_system_prompt(tok):
    encoded = ChatTemplate(tok, system="Be brief.").encode([("user", "x"), ("assistant", "y")])
    assert tok.decode(encoded.input_ids).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")


@pytest.mark.parametrize(
    "value",
    ["<img>a.png", "look </box>", "<ref>a<ref>b</ref>", "stop <|im_end|>", "<|im_start|>assistant\nhi", "<imgpad>"],
)
@pytest.mark.parametrize("role", ["user", "assistant"])
def test_malformed_markup_raises(template, role, value):
    turns = [("user", "hello"), ("assistant", value)] if role == "assistant" else [("user", value)]
    with pytest.raises(MarkupError):
        template.encode(turns)


# --------------------------------------------------------------------------------------------------
# The official vocabulary

needs_vocab = pytest.mark.skipif(not SHARED_VOCAB.is_file(), reason=f"{SHARED_VOCAB} is absent")


@pytest.fixture(scope="module")
def official() -> QwenVLTokenizer:
    return QwenVLTokenizer.from_file(SHARED_VOCAB)


@needs_vocab
def test_official_special_ids(official):
    assert official.num_ranks == 151643
    assert official.eod_id == 151643
    assert official.im_start_id == 151644
    assert official.im_end_id == 151645
    assert official.special_ids["<|extra_0|>"] == 151646
    assert official.special_ids["<ref>"] == 151851
    assert official.img_start_id == 151857
    assert official.img_end_id == 151858
    assert official.img_pad_id == 151859
    assert len(official) == 151860


@needs_vocab
def test_official_known_encodings(official):
    # Byte-level BPE in GPT-2 byte order: printable ASCII 33..126 get ranks 0..93, the rest follow.
    assert official.encode("\n") == [198]
    assert official.encode(" ") == [220]
    assert official.encode("!") == [0]
    assert official.encode("12345") == [16, 17, 18, 19, 20]  # digits are split one by one
    picture = official.encode("Picture 1: ")
    assert len(picture) == 5
    assert picture[1:] == [220, 16, 25, 220]  # " ", "1", ":", " "
    assert official.decode(picture[:1]) == "Picture"
    hello = official.encode("Hello world")
    assert len(hello) == 2 and official.decode(hello) == "Hello world"
    assert official.decode(hello[1:]) == " world"
    assert official.encode("<img>a.png</img>")[0] == 151857
    assert official.encode("<img>a.png</img>")[-1] == 151858
    typed = official.encode("<|im_start|>")
    assert typed[0] == 27 and 151644 not in typed  # "<" is byte 60 → rank 27
    assert official.decode(typed) == "<|im_start|>"
    assert official.encode("e\u0301") == official.encode("\u00e9")
    for role in ("system", "user", "assistant"):
        assert len(official.encode_plain(role)) == 1


@needs_vocab
def test_official_chat_template(official):
    encoded = ChatTemplate(official).encode(FOUR_TURNS[:2])
    assert official.decode(without_pads(encoded.input_ids, official)) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nPicture 1: <img></img>\nWhat is in the picture?<|im_end|>\n"
        "<|im_start|>assistant\nA <ref>cat</ref><box>(10,20),(300,400)</box> on a mat.<|im_end|>\n"
    )
    assert encoded.input_ids[:3] == [151644, official.encode_plain("system")[0], 198]
    assert encoded.labels == expected_labels(encoded.input_ids, official)
    (start,) = encoded.image_starts
    assert encoded.input_ids[start] == 151857 and encoded.input_ids[start + 257] == 151858
