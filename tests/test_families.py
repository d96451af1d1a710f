"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL (qwenvl_cli/families/hf_vl.py): the tiny presets load in plain transformers,
the template's picture spans and boxes follow each family's conventions (docs/families.md), and training (full and
LoRA) runs, learns and writes folders that transformers and peft load back. The tiny models are built once."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from qwenvl_cli.demo import DEMO_DATA
from qwenvl_cli.errors import QwenvlError
from qwenvl_cli.families import NOT_YET, family_for
from qwenvl_cli.grounding import (
    absolute_to_relative,
    clamp_relative,
    json_box,
    pixels_to_relative,
    relative_to_absolute,
    smart_resize,
    special_token_box,
)

NEW = ("qwen2-vl", "qwen2.5-vl", "qwen3-vl")
CLASSES = {
    "qwen2-vl": ("Qwen2VLForConditionalGeneration", "Qwen2VLProcessor"),
    "qwen2.5-vl": ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor"),
    "qwen3-vl": ("Qwen3VLForConditionalGeneration", "Qwen3VLProcessor"),
}


def turns_of(sample: dict) -> list[tuple[str, str]]:
    return [(turn["from"], turn["value"]) for turn in sample["conversations"]]


def template_for(folder: Path, image_root: Path = DEMO_DATA.parent):
    family = family_for(folder)
    return family, family.template(family.tokenizer(folder), image_root=image_root)


# -- grounding conversions (docs/families.md §4's worked example) ------------------------------------------------
def test_worked_example_box_in_each_convention():
    width, height = 1000, 750
    relative = pixels_to_relative((200, 150, 600, 525), width, height)
    assert relative == (200, 200, 600, 700)
    resized = {m: smart_resize(height, width, 28, 3136, m) for m in (451584, 12845056, 50176)}
    assert resized == {451584: (560, 756), 12845056: (756, 1008), 50176: (168, 252)}
    assert relative_to_absolute(relative, 756, 560) == (151, 112, 454, 392)
    assert relative_to_absolute(relative, 1008, 756) == (202, 151, 605, 529)
    assert relative_to_absolute(relative, 252, 168) == (50, 34, 151, 118)
    assert smart_resize(height, width, 32, 65536, 16777216) == (736, 992)
    assert clamp_relative((200, 200, 600, 700)) == (200, 200, 600, 700) == clamp_relative((200, 200, 600, 700))
    assert clamp_relative((-3, 0, 1004, 999)) == (0, 0, 1000, 999)
    assert absolute_to_relative((151, 112, 454, 392), 756, 560) == (200, 200, 601, 700)  # rounding loss
    assert relative_to_absolute((0, 0, 999, 999), 112, 112) == (0, 0, 111, 111)  # clamped to W′−1
    assert special_token_box(relative, "cat") == (
        "<|object_ref_start|>cat<|object_ref_end|><|box_start|>(200,200),(600,700)<|box_end|>"
    )
    assert json_box((151, 112, 454, 392), "cat") == '{"bbox_2d": [151, 112, 454, 392], "label": "cat"}'
    assert json_box((1, 2, 3, 4), None) == '{"bbox_2d": [1, 2, 3, 4]}'


# -- presets and recognition ---------------------------------------------------------------------------------------
def test_presets_load_in_plain_transformers(vl_models):
    from transformers import AutoModelForImageTextToText

    from qwenvl_cli.cli import Preset
    from qwenvl_cli.families.hf_vl import image_only_processor_class

    assert {"tiny-qwen2-vl", "tiny-qwen2.5-vl", "tiny-qwen3-vl", "tiny"} <= {p.value for p in Preset}
    assert "qwen3_vl_moe" in NOT_YET and not {"qwen2_vl", "qwen2_5_vl", "qwen3_vl"} & set(NOT_YET)
    for name in NEW:
        folder = vl_models / name
        family = family_for(folder)
        assert family.name == name
        model_class, processor_class = CLASSES[name]
        config = json.loads((folder / "config.json").read_text())
        assert config["architectures"] == [model_class] and config["text_config"]["hidden_size"] <= 64
        assert json.loads((folder / "processor_config.json").read_text())["processor_class"] == processor_class
        model = AutoModelForImageTextToText.from_pretrained(folder)
        assert type(model).__name__ == model_class
        assert model.config.text_config.num_hidden_layers == 2 and model.config.vision_config.depth == 2
        assert model.config.text_config.vocab_size <= 2048
        processor = image_only_processor_class(processor_class).from_pretrained(folder)
        assert isinstance(processor, getattr(__import__("transformers"), processor_class))
        assert processor.tokenizer.convert_tokens_to_ids("<|image_pad|>") == config["image_token_id"]
        assert family.consumers(folder) and all(v is None for v in family.consumers(folder).values())
        assert not family.is_base_model(folder)


# -- template: picture spans, labels, boxes ------------------------------------------------------------------------
def test_picture_spans_equal_the_processors_own_count(vl_models, tmp_path):
    Image.new("RGB", (300, 120), (10, 200, 30)).save(tmp_path / "wide.png")
    demo = json.loads(DEMO_DATA.read_text())[0]
    for name in NEW:
        folder = vl_models / name
        family, template = template_for(folder, tmp_path)
        processor = family.load_processor(folder)
        for path in (str(DEMO_DATA.parent / "images" / "shapes_00.png"), "wide.png"):
            encoded = template.encode([("user", f"Picture 1: <img>{path}</img>\nWhat is it?"), ("assistant", "A.")])
            picture = Image.open(path if Path(path).is_absolute() else tmp_path / path).convert("RGB")
            official = processor(text=["<|vision_start|><|image_pad|><|vision_end|>"], images=[picture])
            pads = sum(1 for i in official["input_ids"][0] if i == processor.image_token_id)
            assert encoded.image_lengths == [pads + 2], (name, path)
            start = encoded.image_starts[0]
            assert encoded.input_ids[start] == processor.vision_start_token_id
            assert encoded.input_ids[start + pads + 1] == processor.vision_end_token_id
            assert official["mm_token_type_ids"][0].count(1) == pads if "mm_token_type_ids" in official else True
        encoded = template_for(folder)[1].encode(turns_of(demo))
        tokenizer = processor.tokenizer
        learned = tokenizer.decode(
            [i for i, label in zip(encoded.input_ids, encoded.labels, strict=True) if label != -100]
        )
        assert learned.startswith("There are 2.<|im_end|>\n") and learned.endswith("<|im_end|>\n")
        assert encoded.labels[encoded.first_target] == encoded.input_ids[encoded.first_target]
        rendered = tokenizer.decode(encoded.input_ids)
        has_system = rendered.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
        assert has_system == (name != "qwen3-vl")


def test_boxes_are_written_in_each_familys_convention(vl_models, tmp_path):
    turns = [
        ("user", "Picture 1: <img>images/shapes_00.png</img>\nWhere is the green circle?"),
        ("assistant", "<ref>the green circle</ref><box>(53,80),(415,441)</box>"),
    ]

    def answer(folder):
        family, template = template_for(folder)
        encoded = template.encode(turns)
        ids = [i for i, label in zip(encoded.input_ids, encoded.labels, strict=True) if label != -100]
        return family.tokenizer(folder).decode(ids).removesuffix("<|im_end|>\n")

    assert answer(vl_models / "qwen2-vl") == (
        "<|object_ref_start|>the green circle<|object_ref_end|><|box_start|>(53,80),(415,441)<|box_end|>"
    )
    assert answer(vl_models / "qwen3-vl") == '{"bbox_2d": [53, 80, 415, 441], "label": "the green circle"}'
    # Qwen2.5-VL: absolute pixels of the resized 224² picture: 112² at the tiny preset's 16·28² max_pixels …
    assert answer(vl_models / "qwen2.5-vl") == '{"bbox_2d": [6, 9, 46, 49], "label": "the green circle"}'
    # … and 224² when max_pixels allows the picture's own size
    bigger = tmp_path / "qwen2.5-vl-big"
    shutil.copytree(vl_models / "qwen2.5-vl", bigger)
    for name in ("processor_config.json", "preprocessor_config.json"):
        settings = json.loads((bigger / name).read_text())
        image = settings.get("image_processor", settings)
        image["size"]["longest_edge"] = 64 * 28 * 28
        (bigger / name).write_text(json.dumps(settings))
    assert answer(bigger) == '{"bbox_2d": [12, 18, 93, 99], "label": "the green circle"}'
    with pytest.raises(QwenvlError, match="comes before any picture"):
        template_for(vl_models / "qwen2.5-vl")[1].encode([("user", "Where?"), ("assistant", "<box>(1,2),(3,4)</box>")])


def test_a_cut_inside_a_variable_picture_span_drops_the_sample(vl_models):
    from qwenvl_cli.train.data import prepare_samples

    family, template = template_for(vl_models / "qwen2-vl")
    encoded = template.encode(turns_of(json.loads(DEMO_DATA.read_text())[0]))
    start, span = encoded.image_starts[0], encoded.image_lengths[0]
    assert span == 18  # 112² → 4×4 merged tokens + 2 markers
    with pytest.raises(QwenvlError, match="14 too long"):  # every demo sample's first picture would be cut
        prepare_samples(DEMO_DATA, template, start + 5, family.picture_tokens(), DEMO_DATA.parent)
    kept = prepare_samples(DEMO_DATA, template, len(encoded) - 3, family.picture_tokens(), DEMO_DATA.parent)
    assert kept.samples[0].image_lengths == [span] and len(kept.samples[0]) == len(encoded) - 3


def test_what_is_not_built_yet_is_refused_by_name(vl_models):
    family = family_for(vl_models / "qwen3-vl")
    tokenizer = family.tokenizer(vl_models / "qwen3-vl")
    assert family.processor(tokenizer, None).template.system == ""  # asking is built (tests/test_families_chat.py)
    with pytest.raises(QwenvlError, match="--recipe upstream"):
        family.use_upstream_recipe(None)


# -- training ------------------------------------------------------------------------------------------------------
def losses(run: Path) -> list[float]:
    state = json.loads(next((run / "checkpoints").glob("checkpoint-*/trainer_state.json")).read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize("method", ["full", "lora"])
def test_training_learns_and_the_run_folder_loads_back(vl_models, tmp_path, name, method):
    from transformers import AutoModelForImageTextToText

    from qwenvl_cli.train.options import TrainOptions
    from qwenvl_cli.train.runner import run_training

    out = tmp_path / "run"
    options = TrainOptions(
        method=method,
        model=vl_models / name,
        data=DEMO_DATA,
        output=out,
        max_steps=8,
        batch_size=2,
        grad_accum=1,
        lr=1e-2 if method == "full" else 2e-2,
        lora_r=8,
        lr_scheduler="constant",
        weight_decay=0.0,
        save_steps=8,
    )
    result = run_training(options)
    curve = losses(out)
    assert len(curve) == 8 and all(torch.isfinite(torch.tensor(curve)))
    assert curve[-1] < curve[0], curve
    base = AutoModelForImageTextToText.from_pretrained(vl_models / name)
    if method == "full":
        assert {"model.safetensors", "config.json", "tokenizer.json", "generation_config.json"} <= {
            p.name for p in out.iterdir()
        }
        trained = AutoModelForImageTextToText.from_pretrained(out)
        assert type(trained) is type(base)
        changed = {
            key.split(".")[1]
            for key, value in trained.state_dict().items()
            if not torch.equal(value, base.state_dict()[key])
        }
        assert "language_model" in changed
        visual = {k: v for k, v in trained.state_dict().items() if k.startswith("model.visual.blocks.")}
        assert all(torch.equal(v, base.state_dict()[k]) for k, v in visual.items())  # the vision tower stays frozen
        assert not any(
            "merger" in k and torch.equal(v, base.state_dict()[k])
            for k, v in trained.state_dict().items()
            if k.startswith("model.visual.merger") and v.is_floating_point() and v.numel() > 1
        )
    else:
        from peft import PeftModel

        adapter = json.loads((out / "adapter_config.json").read_text())
        assert adapter["target_modules"].startswith(".*language_model")
        loaded = PeftModel.from_pretrained(base, out)
        wrapped = [
            n for n, m in loaded.named_modules() if hasattr(m, "lora_A") and "lora_A" in dict(m.named_children())
        ]
        assert wrapped and not any(".visual." in n for n in wrapped)
        assert (out / "tokenizer.json").is_file()
        from typer.testing import CliRunner

        from qwenvl_cli.cli import app

        merged = tmp_path / "merged"
        folded = CliRunner().invoke(app, ["merge", str(out), "--output", str(merged)], env={"COLUMNS": "160"})
        assert folded.exit_code == 0, folded.output
        reloaded = AutoModelForImageTextToText.from_pretrained(merged)
        ids = torch.tensor([[1, 2, 3, 4]])
        with torch.no_grad():
            expected = loaded.merge_and_unload()(input_ids=ids).logits
            assert torch.allclose(reloaded(input_ids=ids).logits, expected, atol=1e-5)
    assert result.final_loss == curve[-1]


def test_cli_trains_a_tiny_qwen25_vl(vl_models, tmp_path):
    from typer.testing import CliRunner

    from qwenvl_cli.cli import app

    out = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        [
            "train",
            "--model",
            str(vl_models / "qwen2.5-vl"),
            "--data",
            str(DEMO_DATA),
            "--max-steps",
            "2",
            "--grad-accum",
            "1",
            "--output",
            str(out),
        ],
        env={"COLUMNS": "160", "NO_COLOR": "1"},
    )
    assert result.exit_code == 0, result.output
    assert (out / "qwenvl_run.json").is_file() and (out / "adapter_model.safetensors").is_file()


def test_validate_data_with_a_family_model_reports_a_missing_picture_and_counts_the_rest(vl_models, tmp_path):
    """The picture spans of these families need each picture's size; a picture that cannot be opened is the
    picture check's finding, not a stop of the whole report."""
    from typer.testing import CliRunner

    from qwenvl_cli.cli import app

    data = tmp_path / "d.json"
    missing = {"from": "user", "value": "Picture 1: <img>missing.png</img>\nWhat is it?"}
    data.write_text(
        json.dumps(
            [
                {"id": "a", "conversations": [missing, {"from": "assistant", "value": "A cat."}]},
                {
                    "id": "b",
                    "conversations": [{"from": "user", "value": "Hi"}, {"from": "assistant", "value": "Hello."}],
                },
            ]
        ),
        "utf-8",
    )
    model = vl_models / "qwen2.5-vl"
    result = CliRunner().invoke(app, ["validate-data", str(data), "--model", str(model), "--format", "json"])
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    assert [f["code"] for f in report["findings"]] == ["I401"]
    assert report["lengths"]["count"] == 1  # the sample whose picture opened
