"""`qwenvl eval`: IoU, answer matching, box extraction, scoring, the evaluation loop and the command."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from qwenvl_cli.cli import app
from qwenvl_cli.data.synth import synthesize
from qwenvl_cli.demo import DEMO_BROKEN
from qwenvl_cli.errors import QwenvlError
from qwenvl_cli.evaluate import answer_matches, evaluate, evaluate_folder, extract_boxes, iou, score
from qwenvl_cli.families import family_named
from qwenvl_cli.model.presets import init_model, tiny_ranks
from qwenvl_cli.model.processor import QwenVLProcessor
from qwenvl_cli.model.tokenizer import QwenVLTokenizer
from qwenvl_cli.schemas import Box

QWEN_VL = family_named("qwen-vl")


def box(x1: int, y1: int, x2: int, y2: int) -> Box:
    return Box(x1=x1, y1=y1, x2=x2, y2=y2)


def grounded(ref: str, *boxes: Box) -> str:
    return f"<ref>{ref}</ref>" + "".join(f"<box>{b.to_text()}</box>" for b in boxes)


# --------------------------------------------------------------------------------------------------
# Metrics


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        (box(0, 0, 100, 100), box(0, 0, 100, 100), 1.0),
        (box(0, 0, 100, 100), box(50, 0, 150, 100), 1 / 3),  # half of each overlaps
        (box(0, 0, 100, 100), box(0, 0, 50, 50), 0.25),  # contained
        (box(0, 0, 100, 100), box(100, 0, 200, 100), 0.0),  # touching edges
        (box(0, 0, 10, 10), box(500, 500, 900, 900), 0.0),  # far apart
        (box(100, 100, 300, 300), box(100, 100, 300, 250), 0.75),
    ],
)
def test_iou(a, b, expected):
    assert iou(a, b) == pytest.approx(expected)
    assert iou(b, a) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("pred", "ref", "matches"),
    [
        ("Red.", "Red.", True),
        ("red", "Red.", True),
        ("  RED. \n", "red", True),
        ("There are 2", "There are 2.", True),
        ("Red..", "Red", False),  # one final period only
        ("Red, mostly.", "Red.", False),
        ("There are  2.", "There are 2.", False),  # inner spaces count
        ("", "Red.", False),
    ],
)
def test_answer_matches(pred, ref, matches):
    assert answer_matches(pred, ref) is matches


def test_extract_boxes_pairs_each_ref_with_the_boxes_that_follow_it():
    text = (
        "<ref>the cat</ref><box>(1,2),(30,40)</box><box>(5,6),(70,80)</box> and "
        "<box>(10,10),(20,20)</box> then <ref>a dog</ref><box>(0,0),(999,999)</box>"
    )
    assert extract_boxes(text) == [
        ("the cat", box(1, 2, 30, 40)),
        ("the cat", box(5, 6, 70, 80)),
        (None, box(10, 10, 20, 20)),
        ("a dog", box(0, 0, 999, 999)),
    ]


@pytest.mark.parametrize(
    "text",
    [
        "Red.",
        "<ref>x</ref><box>(500,500),(100,100)</box>",  # corners swapped
        "<box>(1.5,2),(30,40)</box>",  # fractions
        "<box>(1,2),(3000,40)</box>",  # pixels, out of range
        "<ref>x<box>(1,2),(30,40)",  # unclosed tags
    ],
)
def test_extract_boxes_skips_what_is_not_a_valid_box_and_never_raises(text):
    assert extract_boxes(text) == []


def test_extract_boxes_keeps_the_valid_boxes_of_a_malformed_answer():
    assert extract_boxes("<ref>x</ref><box>(1,2),(30,40)</box></ref>") == [("x", box(1, 2, 30, 40))]


def test_score_exact_match():
    assert score("red", "Red.").model_dump() == {"kind": "exact", "correct": True, "iou": None}
    assert not score("Blue.", "Red.").correct


def test_score_grounding_is_acc_at_05():
    ref = grounded("the red square", box(0, 0, 100, 100))
    hit = score(grounded("the red square", box(0, 0, 100, 50)), ref)  # IoU exactly 0.5
    assert hit.kind == "grounding" and hit.correct and hit.iou == 0.5
    miss = score(grounded("the red square", box(0, 0, 100, 49)), ref)
    assert not miss.correct and miss.iou == 0.49
    assert score(grounded("another name", box(0, 0, 100, 100)), ref).correct  # ref text is not compared
    assert score("<box>(0,0),(100,100)</box><box>(500,500),(600,600)</box>", ref).correct  # extras are free
    nothing = score("It is red.", ref)
    assert nothing.kind == "grounding" and not nothing.correct and nothing.iou == 0.0


def test_score_needs_every_reference_box_matched():
    ref = grounded("two squares", box(0, 0, 100, 100), box(500, 500, 600, 600))
    one = score(grounded("two squares", box(0, 0, 100, 100)), ref)
    assert not one.correct and one.iou == 0.0
    both = score(grounded("two squares", box(500, 500, 600, 600), box(0, 0, 100, 90)), ref)
    assert both.correct and both.iou == 0.9


# --------------------------------------------------------------------------------------------------
# The loop, with a model whose answers are known


class ScriptedModel(torch.nn.Module):
    """Answers the n-th prompt with the n-th reply, token by token, then `<|im_end|>`; keeps the prompts."""

    def __init__(self, tokenizer: QwenVLTokenizer, replies: list[str]):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # generation asks the parameters for the device
        self.tokenizer, self.replies = tokenizer, list(replies)
        self.prompts: list[list[int]] = []
        self.pending: list[int] = []

    def forward(self, input_ids, pixel_values=None, cache=None, use_cache=False, **_):
        if input_ids.shape[1] > 1:  # a prompt; decode steps pass one token
            self.prompts.append(input_ids[0].tolist())
            self.pending = [*self.tokenizer.encode(self.replies.pop(0)), self.tokenizer.im_end_id]
        logits = torch.zeros(1, input_ids.shape[1], len(self.tokenizer))
        logits[0, -1, self.pending.pop(0)] = 10.0
        return type("Output", (), {"logits": logits})()


@pytest.fixture(scope="module")
def tokenizer() -> QwenVLTokenizer:
    return QwenVLTokenizer(tiny_ranks(), name="tiny")


def test_evaluate_scores_known_answers(tokenizer, tmp_path):
    Image.new("RGB", (32, 32), "red").save(tmp_path / "a.png")
    square = grounded("the red square", box(100, 100, 300, 300))
    samples = [
        {
            "id": "a",
            "conversations": [
                {"from": "user", "value": "Picture 1: <img>a.png</img>\nWhat colour is the square?"},
                {"from": "assistant", "value": "Red."},
                {"from": "user", "value": "Where is the red square?"},
                {"from": "assistant", "value": square},
            ],
        },
        {
            "id": "b",
            "conversations": [
                {"from": "user", "value": "How many shapes are there?"},
                {"from": "assistant", "value": "There are 2."},
                {"from": "user", "value": "Where is the blue circle?"},
                {"from": "assistant", "value": grounded("the blue circle", box(0, 0, 100, 100))},
                {"from": "user", "value": "A trailing question nobody answered"},
            ],
        },
        {"id": "c", "conversations": [{"from": "user", "value": "Hello"}, {"from": "assistant", "value": "Hi."}]},
    ]
    replies = [
        "red",  # a:1 right (case, period)
        grounded("the red square", box(100, 100, 300, 250)),  # a:3 IoU 0.75, right
        "There are 3.",  # b:1 wrong
        grounded("the blue circle", box(50, 50, 150, 150)),  # b:3 IoU 2500/17500, wrong
        "Hi.",  # c:1 right
    ]
    model = ScriptedModel(tokenizer, replies)
    processor = QwenVLProcessor(tokenizer, 28, image_root=tmp_path)
    calls = []
    report = evaluate(
        model, processor, samples, progress=lambda done, total: calls.append((done, total)), family=QWEN_VL
    )

    assert (report.samples, report.questions, report.correct, report.accuracy) == (3, 5, 3, 0.6)
    assert (report.exact_n, report.exact_correct, report.exact_match) == (3, 2, 0.6667)
    assert (report.grounding_n, report.grounding_correct, report.acc_at_50) == (2, 1, 0.5)
    assert report.mean_iou == pytest.approx((0.75 + 1 / 7) / 2, abs=1e-4)
    assert [(w.sample_id, w.turn, w.kind) for w in report.worst] == [("b", 1, "exact"), ("b", 3, "grounding")]
    assert report.worst[0].prediction == "There are 3." and report.worst[0].reference == "There are 2."
    assert report.worst[1].iou == pytest.approx(1 / 7, abs=1e-4)
    assert calls == [(i, 5) for i in range(1, 6)]
    assert not model.replies  # one prompt per question

    # Each turn is asked after the *reference* history, in the training layout.
    history = [("user", samples[0]["conversations"][0]["value"]), ("assistant", "Red.")]
    expected = processor.encode_prompt([*history, ("user", "Where is the red square?")])["input_ids"][0].tolist()
    assert model.prompts[1] == expected
    assert model.prompts[4] == processor.encode_prompt([("user", "Hello")])["input_ids"][0].tolist()


def test_evaluate_with_nothing_to_score(tokenizer):
    report = evaluate(ScriptedModel(tokenizer, []), QwenVLProcessor(tokenizer, 28), [], family=QWEN_VL)
    assert (report.questions, report.accuracy, report.exact_match, report.acc_at_50, report.mean_iou) == (
        0,
        None,
        None,
        None,
        None,
    )


# --------------------------------------------------------------------------------------------------
# End to end on a real tiny model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    init_model("tiny", root / "model", seed=0)
    synthesize(root / "data", 8, seed=4, image_size=64, eval_fraction=0.25)
    return root


def test_evaluate_folder_on_a_tiny_model(tiny):
    data = tiny / "data" / "train.json"
    report = evaluate_folder(tiny / "model", data, limit=3, max_new_tokens=4)
    first = json.loads(data.read_text())[:3]
    answers = [t["value"] for s in first for t in s["conversations"][1::2]]
    assert report.samples == 3
    assert report.questions == len(answers)
    assert report.grounding_n == sum("<box>" in a for a in answers)
    assert report.exact_n == report.questions - report.grounding_n
    assert 0 <= report.correct <= report.questions and len(report.worst) <= 5
    assert report.model == str(tiny / "model") and report.data == str(data) and report.adapter is None


def test_evaluate_folder_applies_a_lora_adapter(tiny):
    from peft import LoraConfig, get_peft_model

    from qwenvl_cli.model.checkpoint import load_checkpoint

    model, _ = load_checkpoint(tiny / "model")
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "w1", "w2"])
    get_peft_model(model, config).save_pretrained(tiny / "adapter")  # B = 0: the model's answers are unchanged
    data = tiny / "data" / "eval.json"
    plain = evaluate_folder(tiny / "model", data, limit=1, max_new_tokens=4)
    adapted = evaluate_folder(tiny / "model", data, tiny / "adapter", limit=1, max_new_tokens=4)
    assert adapted.adapter == str(tiny / "adapter")
    assert [w.prediction for w in adapted.worst] == [w.prediction for w in plain.worst]
    assert adapted.questions == plain.questions

    args = ["eval", "--model", str(tiny / "model"), "--adapter", str(tiny / "adapter"), "--data", str(data)]
    result = runner.invoke(app, [*args, "--limit", "1", "--max-new-tokens", "2", "--format", "json"], env=ENV)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["adapter"] == str(tiny / "adapter")  # nothing else on stdout


@pytest.mark.parametrize(
    ("files", "words"),
    [
        ({}, "has no adapter_config.json"),
        ({"adapter_config.json": '{"peft_type": "LORA"}'}, "has no adapter_model.safetensors"),  # never the hub
        ({"adapter_model.safetensors": "junk"}, "has no adapter_config.json"),
    ],
)
def test_evaluate_folder_refuses_a_folder_that_is_not_an_adapter(tiny, tmp_path, files, words):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(QwenvlError, match=words) as caught:
        evaluate_folder(tiny / "model", tiny / "data" / "eval.json", adapter_dir=tmp_path)
    assert caught.value.exit_code == 2 and "--adapter" in str(caught.value)


def test_evaluate_folder_refuses_a_damaged_adapter(tiny, tmp_path):
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2, "target_modules": ["c_attn"]}')
    (tmp_path / "adapter_model.safetensors").write_bytes(b"junk")
    with pytest.raises(QwenvlError, match="cannot be applied") as caught:
        evaluate_folder(tiny / "model", tiny / "data" / "eval.json", adapter_dir=tmp_path, limit=1)
    assert "check that the adapter's files are complete" in str(caught.value)


def test_evaluate_folder_refuses_invalid_data_listing_the_first_errors(tiny):
    with pytest.raises(QwenvlError) as caught:
        evaluate_folder(tiny / "model", DEMO_BROKEN)
    message = str(caught.value)
    assert "data error" in message and "S113" in message and "qwenvl validate-data" in message


@pytest.mark.parametrize(("kwargs", "words"), [({"limit": 0}, "--limit 0"), ({"max_new_tokens": 0}, "--max-new")])
def test_evaluate_folder_refuses_bad_numbers(tiny, kwargs, words):
    with pytest.raises(QwenvlError, match=words):
        evaluate_folder(tiny / "model", tiny / "data" / "eval.json", **kwargs)


# --------------------------------------------------------------------------------------------------
# The command

runner = CliRunner()
ENV = {"COLUMNS": "160", "NO_COLOR": "1"}


def test_cli_eval_text_and_json(tiny):
    args = ["eval", "--model", str(tiny / "model"), "--data", str(tiny / "data" / "eval.json"), "--limit", "2"]
    text = runner.invoke(app, [*args, "--max-new-tokens", "3"], env=ENV)
    assert text.exit_code == 0, text.output
    assert "exact match" in text.stdout and "grounding Acc@0.5" in text.stdout and "2 samples" in text.stdout

    as_json = runner.invoke(app, [*args, "--max-new-tokens", "3", "--format", "json"], env=ENV)
    assert as_json.exit_code == 0, as_json.output
    report = json.loads(as_json.stdout)
    assert report["samples"] == 2 and report["questions"] == report["exact_n"] + report["grounding_n"]


def test_cli_eval_bad_adapter_exits_2_without_a_traceback(tiny, tmp_path):
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    args = ["eval", "--model", str(tiny / "model"), "--data", str(tiny / "data" / "eval.json")]
    result = runner.invoke(app, [*args, "--adapter", str(tmp_path)], env=ENV)
    assert result.exit_code == 2
    assert "adapter_config.json" in result.output and "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_cli_eval_help_has_examples():
    result = runner.invoke(app, ["eval", "--help"], env=ENV)
    assert result.exit_code == 0
    assert "qwenvl eval --model models/tiny --data data/shapes/eval.json" in result.stdout
    assert "Acc@0.5" in result.stdout
