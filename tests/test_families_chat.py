"""Asking a Qwen2-VL / Qwen2.5-VL / Qwen3-VL model (qwenvl_cli/families/hf_vl_chat.py): the prompt is the official
processor's, streaming and stopping work, boxes in each family's convention are read, drawn, scored and saved back
in the data format. The tiny random models answer gibberish, so these tests check the plumbing."""

from __future__ import annotations

import json
from pathlib import Path

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


def test_rows_past_the_tokenizer_and_picture_tokens_are_never_generated(loaded_vl):
    """The tiny models have 1,024 embedding rows for a 914-token tokenizer (as the official 151,936/152,064 rows
    exceed theirs): sampling hot from a random model reaches those rows unless they are suppressed."""
    from qwenvl_cli.families.hf_vl_chat import PICTURE_TOKENS, never_generated, stream_token_ids

    _family, model, tokenizer = loaded_vl["qwen2.5-vl"]
    session = session_for(loaded_vl, "qwen2.5-vl")
    inputs = session.prompt(session.make_query("Hi"))
    pictures = {tokenizer.convert_tokens_to_ids(t) for t in PICTURE_TOKENS}
    suppress = never_generated(model, tokenizer)
    assert pictures <= set(suppress) and max(suppress) == model.config.get_text_config().vocab_size - 1
    hot = GenerationSettings(max_new_tokens=64, temperature=5.0, top_p=1.0, top_k=0, seed=0)
    free = list(stream_token_ids(model, inputs, hot, [], 0))
    assert any(token >= len(tokenizer) or token in pictures for token in free)  # the rows are reachable
    kept = list(stream_token_ids(model, inputs, hot, [], 0, suppress))
    assert len(kept) == 64 and not any(token >= len(tokenizer) or token in pictures for token in kept)


def test_answers_keep_box_tokens_and_drop_control_tokens(loaded_vl):
    from qwenvl_cli.families.hf_vl_chat import PieceDecoder

    tokenizer = loaded_vl["qwen2-vl"][2]
    answer = "<|object_ref_start|>a<|object_ref_end|><|box_start|>(1,2),(3,4)<|box_end|>"
    ids = tokenizer.encode(answer + "<|im_end|>", add_special_tokens=False)
    decoder = PieceDecoder(tokenizer)
    text = "".join(decoder.push(i) for i in ids)
    assert text == answer


# -- boxes in answers ------------------------------------------------------------------------------------------------
# One box on a 320×200 picture: pixels (80, 50)–(240, 150), relative (250, 250)–(750, 750). The tiny Qwen2.5-VL
# budget resizes the picture to 140×84, where the box is (35, 21)–(105, 63).
ANSWERS = {
    "qwen2-vl": "It is <|object_ref_start|>the cat<|object_ref_end|><|box_start|>(250,250),(750,750)<|box_end|>.",
    "qwen2.5-vl": 'Here:\n```json\n[{"bbox_2d": [35, 21, 105, 63], "label": "the cat"}]\n```',
    "qwen3-vl": '```json\n[\n  {"bbox_2d": [250, 250, 750, 750], "label": "the cat"}\n]\n```',
}
PIXELS = [80, 50, 240, 150]


def test_parsing_each_convention_and_malformed_answers_never_raise():
    from qwenvl_cli.grounding import answer_boxes, to_data_markup, to_pixels, to_relative

    (tokens,) = answer_boxes(ANSWERS["qwen2-vl"], "tokens")
    assert tokens.label == "the cat" and tokens.numbers == (250, 250, 750, 750)
    (absolute,) = answer_boxes(ANSWERS["qwen2.5-vl"], "absolute")
    assert absolute.numbers == (35, 21, 105, 63)
    assert to_pixels(absolute.numbers, "absolute", 320, 200, (84, 140)) == tuple(PIXELS)
    assert to_relative(absolute.numbers, "absolute", (84, 140)) == (250, 250, 750, 750)
    assert to_pixels((250, 250, 750, 750), "relative", 320, 200) == tuple(PIXELS)
    two = answer_boxes('{"bbox_2d": [1, 2, 3, 4]} and {"bbox_2d": [5.5, 6, 7, 8], "label": "b"}', "relative")
    assert [(b.label, b.numbers) for b in two] == [(None, (1, 2, 3, 4)), ("b", (5.5, 6, 7, 8))]
    for broken in ('{"bbox_2d": [1, 2, 3', '{"bbox_2d": [1, 2, 3]}', '{"bbox_2d": "x"}', "{{{", "<|box_start|>(1,2)"):
        assert answer_boxes(broken, "relative") == [] and answer_boxes(broken, "tokens") == []
    assert to_data_markup(ANSWERS["qwen2.5-vl"], "absolute", (84, 140)) == (
        "Here:\n<ref>the cat</ref><box>(250,250),(750,750)</box>"
    )
    assert to_data_markup(ANSWERS["qwen3-vl"], "relative") == "<ref>the cat</ref><box>(250,250),(750,750)</box>"
    assert to_data_markup(ANSWERS["qwen2-vl"], "tokens") == "It is <ref>the cat</ref><box>(250,250),(750,750)</box>."
    assert to_data_markup("No boxes.", "relative") == "No boxes."


@pytest.fixture
def wide(tmp_path) -> Path:
    Image.new("RGB", (320, 200), (255, 255, 255)).save(tmp_path / "wide.png")
    return tmp_path / "wide.png"


def conversation_for(loaded_vl, name, image_root):
    from qwenvl_cli.chat import Conversation
    from qwenvl_cli.inference import LoadedModel

    family, model, tokenizer = loaded_vl[name]
    return Conversation(LoadedModel(model, tokenizer, {}, "cpu", "fp32", family), image_root)


@pytest.mark.parametrize("name", NEW)
def test_each_familys_boxes_are_drawn_at_the_pictures_pixels_and_saved_as_data_markup(loaded_vl, wide, tmp_path, name):
    from qwenvl_cli.chat import BOX_COLOURS
    from qwenvl_cli.schemas import Sample

    conversation = conversation_for(loaded_vl, name, wide.parent)
    conversation.session.history = [(conversation.session.make_query("Where is the cat?", ["wide.png"]), ANSWERS[name])]
    result = conversation.grounding(ANSWERS[name], tmp_path / "drawn")
    (box,) = result.boxes
    assert box.box_pixels == PIXELS and box.box_norm1000 == [250, 250, 750, 750] and box.ref == "the cat"
    assert box.convention == ("resized-pixels" if name == "qwen2.5-vl" else "relative-1000")
    assert box.box_model == ([35, 21, 105, 63] if name == "qwen2.5-vl" else [250, 250, 750, 750])
    drawn = Image.open(result.image_with_boxes).convert("RGB")
    assert drawn.size == (320, 200)
    assert drawn.getpixel((80, 100)) == BOX_COLOURS[0] and drawn.getpixel((239, 100)) == BOX_COLOURS[0]
    assert drawn.getpixel((75, 100)) == (255, 255, 255) and drawn.getpixel((160, 100)) == (255, 255, 255)

    saved = json.loads(conversation.save(tmp_path / "chat.json").read_text())
    answer = saved[0]["conversations"][1]["value"]
    assert "<ref>the cat</ref><box>(250,250),(750,750)</box>" in answer
    Sample.model_validate(saved[0])


# -- eval --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NEW)
def test_eval_scores_grounding_in_the_familys_convention_and_exact_answers(loaded_vl, wide, monkeypatch, name):
    from qwenvl_cli.evaluate import evaluate
    from qwenvl_cli.families.hf_vl_chat import VisionChatSession

    wrong = {  # right numbers read in another convention: off the box
        "qwen2-vl": ANSWERS["qwen2-vl"].replace("(250,250),(750,750)", "(35,21),(105,63)"),
        "qwen2.5-vl": ANSWERS["qwen2.5-vl"].replace("35, 21, 105, 63", "250, 250, 750, 750"),
        "qwen3-vl": ANSWERS["qwen3-vl"].replace("250, 250, 750, 750", "35, 21, 105, 63"),
    }
    answers = {"Where is the cat?": ANSWERS[name], "And again?": wrong[name], "What colour?": "White."}

    def ask(self, text, images=(), settings=None):
        return answers[text.splitlines()[-1]]

    monkeypatch.setattr(VisionChatSession, "ask", ask)
    sample = {
        "id": "s",
        "conversations": [
            {"from": "user", "value": "Picture 1: <img>wide.png</img>\nWhere is the cat?"},
            {"from": "assistant", "value": "<ref>the cat</ref><box>(250,250),(750,750)</box>"},
            {"from": "user", "value": "And again?"},
            {"from": "assistant", "value": "<ref>the cat</ref><box>(250,250),(750,750)</box>"},
            {"from": "user", "value": "What colour?"},
            {"from": "assistant", "value": "white"},
        ],
    }
    family, model, tokenizer = loaded_vl[name]
    processor = family.processor(tokenizer, model.config, image_root=wide.parent)
    report = evaluate(model, processor, [sample], family=family)
    assert (report.grounding_n, report.grounding_correct, report.exact_n, report.exact_correct) == (2, 1, 1, 1)
    assert report.worst[0].prediction == wrong[name] and report.worst[0].iou < 0.5
    assert report.mean_iou == pytest.approx((1.0 + report.worst[0].iou) / 2, abs=1e-3)


def test_eval_runs_on_a_family_model(loaded_vl):
    from qwenvl_cli.evaluate import evaluate

    family, model, tokenizer = loaded_vl["qwen3-vl"]
    processor = family.processor(tokenizer, model.config, image_root=DEMO_DATA.parent)
    samples = json.loads(DEMO_DATA.read_text())[:1]
    report = evaluate(model, processor, samples, GenerationSettings(max_new_tokens=4), family=family)
    assert report.questions == sum(1 for t in samples[0]["conversations"] if t["from"] == "assistant")


# -- the CLI and merge --verify ----------------------------------------------------------------------------------------
def test_cli_chat_json_one_shot_on_a_family_model(vl_models, tmp_path):
    from typer.testing import CliRunner

    from qwenvl_cli.cli import app

    picture = DEMO_DATA.parent / "images" / "shapes_00.png"
    args = ["chat", "--model", str(vl_models / "qwen2.5-vl"), "--image", str(picture), "--prompt", "What?"]
    result = CliRunner().invoke(app, [*args, "--json", "--max-new-tokens", "4", "--save-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert isinstance(answer["answer"], str) and answer["boxes"] == [] and answer["first_token_seconds"] is not None


def test_merge_verify_passes_on_a_family_lora_run(vl_models, tmp_path):
    from typer.testing import CliRunner

    from qwenvl_cli.cli import app
    from qwenvl_cli.train.options import TrainOptions
    from qwenvl_cli.train.runner import run_training

    run = tmp_path / "run"
    options = TrainOptions(
        method="lora", model=vl_models / "qwen2.5-vl", data=DEMO_DATA, output=run, max_steps=2, batch_size=2,
        grad_accum=1, lr=2e-2, lora_r=8, save_steps=2,
    )  # fmt: skip
    run_training(options)
    args = ["merge", str(run), "--output", str(tmp_path / "merged"), "--verify", "--format", "json"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    verification = json.loads(result.stdout)["verification"]
    assert verification["passed"] and [p["name"] for p in verification["prompts"]] == ["text", "image"]
    assert verification["prompts"][1]["tokens"] > verification["prompts"][0]["tokens"] + 4
