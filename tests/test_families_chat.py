"""Asking a Qwen2-VL / Qwen2.5-VL / Qwen3-VL model (qwenvl_cli/families/hf_vl_chat.py): the prompt is the official
processor's, streaming and stopping work, boxes in each family's convention are read, drawn, scored and saved back
in the data format. The tiny random models answer gibberish, so these tests check the plumbing."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from qwenvl_cli.demo import DEMO_DATA
from qwenvl_cli.families import family_for
from qwenvl_cli.schemas import GenerationSettings

NEW = ("qwen2-vl", "qwen2.5-vl", "qwen3-vl")
GREEDY = GenerationSettings(max_new_tokens=6)


@pytest.fixture(scope="module")
def loaded_vl(vl_models):
    """name → (family, model, tokenizer), each tiny model loaded once."""
    out = {}
    for name in NEW:
        family = family_for(vl_models / name)
        model, tokenizer = family.load(vl_models / name, "fp32", "cpu")
        out[name] = (family, model, tokenizer)
    return out


def session_for(loaded_vl, name, image_root=DEMO_DATA.parent, system=None):
    family, model, tokenizer = loaded_vl[name]
    processor = family.processor(tokenizer, model.config, image_root, system)
    return family.chat_session(model, processor, {})


@pytest.mark.parametrize("name", NEW)
def test_the_prompt_is_the_official_processors_with_its_chat_template(vl_models, loaded_vl, tmp_path, name):
    Image.new("RGB", (320, 200), (200, 30, 30)).save(tmp_path / "wide.png")
    family, _model, _tokenizer = loaded_vl[name]
    session = session_for(loaded_vl, name, tmp_path)
    session.history = [(session.make_query("What colour?", ["wide.png"]), "Red.")]
    query = session.make_query("And this one?", [str(DEMO_DATA.parent / "images" / "shapes_00.png")])
    assert query.startswith("Picture 2: <img>")
    ours = session.prompt(query)

    official = family.load_processor(vl_models / name)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\nWhat colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Red."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\nAnd this one?"}]},
    ]
    text = official.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, add_vision_id=True)
    pictures = [
        Image.open(tmp_path / "wide.png").convert("RGB"),
        Image.open(DEMO_DATA.parent / "images" / "shapes_00.png").convert("RGB"),
    ]
    expected = official(text=[text], images=pictures, return_tensors="pt")
    assert text.endswith("<|im_start|>assistant\n")
    assert ours["input_ids"].tolist() == expected["input_ids"].tolist()
    assert torch.equal(ours["image_grid_thw"], expected["image_grid_thw"])
    assert torch.equal(ours["pixel_values"], expected["pixel_values"])
    if "mm_token_type_ids" in expected:
        assert ours["mm_token_type_ids"].tolist() == expected["mm_token_type_ids"].tolist()


@pytest.mark.parametrize("name", NEW)
def test_streaming_equals_ask_greedy_repeats_and_stopping_keeps_nothing(loaded_vl, name):
    session = session_for(loaded_vl, name)
    pieces = list(session.stream("What is it?", ["images/shapes_00.png"], GREEDY))
    streamed = session.history[-1]
    assert streamed[0] == "Picture 1: <img>images/shapes_00.png</img>\nWhat is it?"
    assert "".join(pieces).strip() == streamed[1] and len(pieces) >= 1
    session.history.clear()
    assert session.ask("What is it?", ["images/shapes_00.png"], GREEDY) == streamed[1]
    session.history.clear()
    assert session.ask("What is it?", ["images/shapes_00.png"], GREEDY) == streamed[1]  # greedy twice
    # a follow-up question builds on the history (the picture numbering continues)
    session.ask("And this?", ["images/shapes_01.png"], GREEDY)
    assert session.history[-1][0].startswith("Picture 2: <img>images/shapes_01.png</img>")

    session.history.clear()
    stream = session.stream("What is it?", ["images/shapes_00.png"], GenerationSettings(max_new_tokens=200))
    next(stream)
    stream.close()  # stopping early: the generation thread ends and no exchange is kept
    assert session.history == []
    assert not [t for t in __import__("threading").enumerate() if t.name == "qwenvl-generate"]


def test_sampling_with_a_seed_repeats_and_settings_reach_generate(loaded_vl, monkeypatch):
    session = session_for(loaded_vl, "qwen2.5-vl")
    sampled = GenerationSettings(max_new_tokens=8, temperature=1.5, top_p=0.9, top_k=50, seed=3)
    first = session.ask("Hi", settings=sampled)
    session.history.clear()
    assert session.ask("Hi", settings=sampled) == first
    seen = {}
    model = session.model
    original = model.generate

    def spy(**kwargs):
        seen.update(kwargs)
        return original(**kwargs)

    monkeypatch.setattr(model, "generate", spy)
    session.ask("Hi", settings=GenerationSettings(max_new_tokens=3, repetition_penalty=1.3))
    assert seen["do_sample"] is False and seen["max_new_tokens"] == 3 and seen["repetition_penalty"] == 1.3
    tokenizer = session.processor.tokenizer
    assert set(seen["eos_token_id"]) == {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}


def test_answers_keep_box_tokens_and_drop_control_tokens(loaded_vl):
    from qwenvl_cli.families.hf_vl_chat import PieceDecoder

    tokenizer = loaded_vl["qwen2-vl"][2]
    answer = "<|object_ref_start|>a<|object_ref_end|><|box_start|>(1,2),(3,4)<|box_end|>"
    ids = tokenizer.encode(answer + "<|im_end|>", add_special_tokens=False)
    decoder = PieceDecoder(tokenizer)
    text = "".join(decoder.push(i) for i in ids)
    assert text == answer
