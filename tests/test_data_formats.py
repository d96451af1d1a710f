"""The `messages` data format (LLaMA-Factory / ms-swift): recognised per sample, converted on read, checked."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from qwenvl_cli.data.boxes import CONVENTIONS, BoxError, Pictures, from_internal, to_internal
from qwenvl_cli.data.convert import convert_file
from qwenvl_cli.data.messages import from_messages, to_messages
from qwenvl_cli.data.reader import DataFile
from qwenvl_cli.data.validate import ValidateOptions, validate_data
from qwenvl_cli.errors import QwenvlError


def messages_sample(*contents: str, images=None, **extra) -> dict:
    roles = ["user", "assistant"] * len(contents)
    sample = {"messages": [{"role": r, "content": c} for r, c in zip(roles, contents, strict=False)], **extra}
    if images is not None:
        sample["images"] = images
    return sample


def test_placeholders_become_numbered_pictures_in_order():
    sample = messages_sample("<image><image>Compare them.", "Same.", "And <image>?", "Other.", images=list("abc"))
    converted = from_messages(sample, 4)
    assert converted.problems == []
    assert converted.sample == {
        "id": "sample-4",
        "conversations": [
            {"from": "user", "value": "Picture 1: <img>a</img>\nPicture 2: <img>b</img>\nCompare them."},
            {"from": "assistant", "value": "Same."},
            {"from": "user", "value": "And Picture 3: <img>c</img>\n?"},
            {"from": "assistant", "value": "Other."},
        ],
    }
    assert converted.fields == [0, 1, 2, 3]


def test_an_explicit_id_is_kept():
    assert from_messages(messages_sample("Hi", "Hello", id="x7"), 0).sample["id"] == "x7"


def test_count_mismatch_system_and_video_are_problems():
    sample = messages_sample("<image><image>Q", "A", images=["a.png"])
    assert [p.code for p in from_messages(sample, 0).problems] == ["S120"]
    system = {"messages": [{"role": "system", "content": "Be brief."}, *messages_sample("Q", "A")["messages"]]}
    converted = from_messages(system, 0)
    assert [(p.code, p.field) for p in converted.problems] == [("S121", "messages[0]")]
    assert converted.fields == [1, 2]
    video = messages_sample("<video>What happens?", "A fall.", videos=["v.mp4"])
    assert [p.code for p in from_messages(video, 0).problems] == ["S122", "S122"]
    assert [p.code for p in from_messages(messages_sample("Q", "A", images="a.png"), 0).problems] == ["S123"]


def test_reader_converts_messages_samples_in_json_and_jsonl(write_json, write_jsonl):
    samples = [messages_sample("<image>What?", "A cat.", images=["c.png"]), messages_sample("Hi", "Hello")]
    for path in (write_json(samples), write_jsonl(samples)):
        records = list(DataFile.open(path).records())
        assert records[0].value["conversations"][0]["value"] == "Picture 1: <img>c.png</img>\nWhat?"
        assert records[0].original == samples[0]
        assert records[1].value["id"] == "sample-1"


def test_validate_data_accepts_a_good_messages_file_and_checks_its_pictures(write_json, tmp_path):
    Image.new("RGB", (32, 32), "red").save(tmp_path / "c.png")
    path = write_json([messages_sample("<image>What colour?", "Red.", images=["c.png"])])
    report = validate_data([path])
    assert report.findings == []
    assert report.files[0].valid_samples == 1
    path = write_json([messages_sample("<image>What colour?", "Red.", images=["gone.png"])], "gone.json")
    assert [(f.code, f.field) for f in validate_data([path]).findings] == [("I401", "messages[0].content")]


def test_validate_data_names_the_messages_field(write_jsonl):
    bad_role = {
        "id": "r",
        "messages": [{"role": "user", "content": "Q"}, {"role": "gpt", "content": "A"}],
    }
    system = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}, {"role": "bot"}]}
    bad_box = messages_sample("Where?", "<ref>cat</ref><box>(1,2),(3)</box>")
    mismatch = messages_sample("<image>Q", "A", images=["a.png", "b.png"])
    path = write_jsonl([bad_role, system, bad_box, mismatch])
    report = validate_data([path], ValidateOptions(check_images=False))
    found = {(f.sample_index, f.code, f.sample_id, f.field) for f in report.findings}
    assert (0, "S113", "r", "messages[1].content") in found, found
    assert (1, "S121", "sample-1", "messages[0]") in found
    assert (1, "S113", "sample-1", "messages[2].content") in found  # turn 1 is messages[2] after the system one
    assert (2, "B301", "sample-2", "messages[1].content") in found
    assert (3, "S120", "sample-3", "images") in found
    assert report.files[0].valid_samples == 0


def test_output_clean_keeps_the_messages_format(write_json, tmp_path):
    good = messages_sample("Q", "A", id="g")
    path = write_json([good, messages_sample("<image>Q", "A")])
    out = tmp_path / "clean.json"
    validate_data([path], ValidateOptions(output_clean=out))
    assert json.loads(out.read_text("utf-8")) == [good]


def test_cli_shows_the_field(write_json):
    from typer.testing import CliRunner

    from qwenvl_cli.cli import app

    path = write_json([messages_sample("<video>Q", "A")])
    result = CliRunner().invoke(app, ["validate-data", str(path)])
    assert result.exit_code == 1
    assert "messages[0].content" in result.output
    assert "S122" in result.output


def test_to_messages_and_back_is_the_same_sample():
    from qwenvl_cli.demo import DEMO_DATA

    for sample in json.loads(DEMO_DATA.read_text("utf-8"))[:20]:
        converted = from_messages(to_messages(sample), 0)
        assert converted.problems == []
        assert converted.sample == sample


def test_training_encodes_a_messages_file_as_its_conversations_twin(vl_models, tmp_path):
    """Every family reads the messages format: the same tokens (pictures included) as the internal format."""
    from qwenvl_cli.demo import DEMO_DATA
    from qwenvl_cli.families import family_for
    from qwenvl_cli.train.data import prepare_samples

    samples = json.loads(DEMO_DATA.read_text("utf-8"))[:4]
    twin = tmp_path / "twin.jsonl"
    twin.write_text("".join(json.dumps(to_messages(s)) + "\n" for s in samples), "utf-8")
    original = tmp_path / "original.json"
    original.write_text(json.dumps(samples), "utf-8")
    for name in ("qwen2.5-vl", "qwen3-vl"):
        family = family_for(vl_models / name)
        template = family.template(family.tokenizer(vl_models / name), image_root=DEMO_DATA.parent)
        args = (template, 4096, family.picture_tokens(), DEMO_DATA.parent)
        got = prepare_samples(twin, *args).samples
        want = prepare_samples(original, *args).samples
        assert [s.input_ids for s in got] == [s.input_ids for s in want]
        assert [s.labels for s in got] == [s.labels for s in want]
        assert got[0].image_paths and got[0].image_paths == want[0].image_paths


def test_validate_data_with_a_family_model_counts_tokens_of_a_messages_file(vl_models, tmp_path):
    from typer.testing import CliRunner

    from qwenvl_cli.cli import app
    from qwenvl_cli.demo import DEMO_DATA

    samples = [to_messages(s) for s in json.loads(DEMO_DATA.read_text("utf-8"))[:3]]
    data = tmp_path / "m.json"
    data.write_text(json.dumps(samples), "utf-8")
    args = ["validate-data", str(data), "--model", str(vl_models / "qwen2-vl"), "--image-root", str(DEMO_DATA.parent)]
    result = CliRunner().invoke(app, [*args, "--format", "json", "--max-length", "30"])
    report = json.loads(result.stdout)
    assert report["lengths"]["count"] == 3
    assert report["lengths"]["over_limit"] == 3
    assert {f["code"] for f in report["findings"]} <= {"L501", "L502", "L503"} and report["findings"]


# -- box conventions (docs/families.md §4's worked example: a 1000×750 picture, the box (200,150)-(600,525) px) --
INTERNAL = "<ref>cat</ref><box>(200,200),(600,700)</box>"
EXAMPLE = {
    "qwen-vl": INTERNAL,
    "qwen2-vl": "<|object_ref_start|>cat<|object_ref_end|><|box_start|>(200,200),(600,700)<|box_end|>",
    "qwen2.5-vl": '{"bbox_2d": [202, 151, 605, 529], "label": "cat"}',
    "qwen3-vl": '{"bbox_2d": [200, 200, 600, 700], "label": "cat"}',
    "pixels": "<ref>cat</ref><box>(200,150),(600,525)</box>",
}


def example_picture(folder):
    Image.new("RGB", (1000, 750), "white").save(folder / "p.png")
    return Pictures(folder)


def test_worked_example_to_and_from_every_convention(tmp_path):
    pictures = example_picture(tmp_path)
    for convention, text in EXAMPLE.items():
        assert from_internal(INTERNAL, convention, pictures, "p.png") == (text, "p.png"), convention
        assert to_internal(text, convention, pictures, "p.png") == (INTERNAL, "p.png"), convention
    # The latest picture of the text itself is the one a box refers to.
    text = "Picture 1: <img>p.png</img>\nWhere? " + EXAMPLE["qwen2.5-vl"]
    assert to_internal(text, "qwen2.5-vl", pictures, None)[0] == "Picture 1: <img>p.png</img>\nWhere? " + INTERNAL


def test_a_pixel_box_needs_a_picture_and_a_readable_box(tmp_path):
    pictures = example_picture(tmp_path)
    with pytest.raises(BoxError, match="comes before any picture"):
        to_internal(EXAMPLE["pixels"], "pixels", pictures, None)
    with pytest.raises(BoxError, match="cannot be opened"):
        to_internal(EXAMPLE["qwen2.5-vl"], "qwen2.5-vl", pictures, "gone.png")
    with pytest.raises(BoxError, match="is not a box"):
        to_internal('{"bbox_2d": [1, 2], "label": "x"}', "qwen3-vl", pictures, None)


def test_declared_boxes_are_converted_on_read_and_boxes_overrides(write_jsonl, tmp_path):
    example_picture(tmp_path)
    user = "<image>Where is the cat?"
    samples = [
        messages_sample(user, EXAMPLE["qwen2.5-vl"], images=["p.png"], boxes="qwen2.5-vl"),
        {
            "id": "c",
            "boxes": "pixels",
            "conversations": [
                {"from": "user", "value": "Picture 1: <img>p.png</img>\nWhere?"},
                {"from": "assistant", "value": EXAMPLE["pixels"]},
            ],
        },
    ]
    path = write_jsonl(samples)
    records = list(DataFile.open(path).records())
    assert [r.value["conversations"][1]["value"] for r in records] == [INTERNAL, INTERNAL]
    assert "boxes" not in records[1].value and records[1].original == samples[1]
    overridden = list(DataFile.open(path, boxes="qwen-vl").records())
    assert overridden[1].value["conversations"][1]["value"] == EXAMPLE["pixels"]
    report = validate_data([path])
    assert report.findings == [] and report.files[0].valid_samples == 2


def test_validate_data_reports_unknown_conventions_and_unconvertible_boxes(write_json, tmp_path):
    example_picture(tmp_path)
    unknown = messages_sample("<image>Q", INTERNAL, images=["p.png"], boxes="yolo")
    early = messages_sample("Where?", EXAMPLE["qwen2.5-vl"], boxes="qwen2.5-vl")
    report = validate_data([write_json([unknown, early])])
    found = [(f.sample_index, f.code, f.field) for f in report.findings]
    assert found == [(0, "B310", "boxes"), (1, "B311", "messages[1].content")]
    with pytest.raises(QwenvlError, match="--boxes yolo"):
        validate_data([write_json([])], ValidateOptions(boxes="yolo"))


def test_convert_round_trips_the_demo_data_in_every_convention(tmp_path):
    """Convert to X, read back declared as X: the same internal boxes within the rounding of a pixel grid."""
    from qwenvl_cli.demo import DEMO_DATA

    source = tmp_path / "demo.json"
    samples = json.loads(DEMO_DATA.read_text("utf-8"))[:40]
    source.write_text(json.dumps(samples), "utf-8")
    want = [r.value for r in DataFile.open(source, image_root=DEMO_DATA.parent).records()]
    assert sum(t["value"].count("<box>") for s in want for t in s["conversations"]) > 5
    for convention in CONVENTIONS:
        for fmt in ("conversations", "messages"):
            out = tmp_path / f"{convention}.{fmt}.jsonl"
            summary = convert_file(source, convention, out, fmt=fmt, image_root=DEMO_DATA.parent)
            assert summary.samples == len(samples) and summary.format == fmt
            lines = [json.loads(line) for line in out.read_text("utf-8").splitlines()]
            assert all(line["boxes"] == convention and (fmt in line) for line in lines)
            got = [r.value for r in DataFile.open(out, image_root=DEMO_DATA.parent).records()]
            for a, b in zip(got, want, strict=True):
                assert same_within_one(a["conversations"], b["conversations"]), (convention, a, b)
    assert "bbox_2d" in (tmp_path / "qwen2.5-vl.conversations.jsonl").read_text("utf-8")
    assert "<|box_start|>" in (tmp_path / "qwen2-vl.messages.jsonl").read_text("utf-8")


def same_within_one(got, want) -> bool:
    import re

    number = re.compile(r"\d+")
    for a, b in zip(got, want, strict=True):
        if number.sub("#", a["value"]) != number.sub("#", b["value"]):
            return False
        pairs = zip(number.findall(a["value"]), number.findall(b["value"]), strict=True)
        if any(abs(int(x) - int(y)) > 1 for x, y in pairs):
            return False
    return True


def test_data_convert_command_says_which_budget_and_refuses_bad_input(vl_models, tmp_path):
    from typer.testing import CliRunner

    from qwenvl_cli.cli import app

    example_picture(tmp_path)
    source = tmp_path / "in.json"
    source.write_text(json.dumps([messages_sample("<image>Where?", INTERNAL, images=["p.png"])]), "utf-8")
    out = tmp_path / "out.json"
    result = CliRunner().invoke(app, ["data", "convert", str(source), "--to", "qwen2.5-vl", "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert "official Qwen2.5-VL defaults" in result.output and "1 boxes" in result.output
    written = json.loads(out.read_text("utf-8"))[0]
    assert written["messages"][1]["content"] == EXAMPLE["qwen2.5-vl"] and written["images"] == ["p.png"]
    model = vl_models / "qwen2.5-vl"
    args = ["data", "convert", str(source), "--to", "qwen2.5-vl", "--model", str(model), "--output", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0 and "processor (min_pixels" in result.output
    bad = CliRunner().invoke(app, ["data", "convert", str(source), "--to", "yolo", "--output", str(out)])
    assert bad.exit_code != 0 and "qwen2.5-vl" in bad.output
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps([messages_sample("<image><image>Q", "A", images=["p.png"])]), "utf-8")
    bad = CliRunner().invoke(app, ["data", "convert", str(broken), "--to", "qwen3-vl", "--output", str(out)])
    assert bad.exit_code != 0 and "images" in bad.output and "<image>" in bad.output


def test_validate_data_checks_boxes_against_their_declared_convention(vl_models, write_json, tmp_path):
    from qwenvl_cli.data.boxes import resize_of
    from qwenvl_cli.grounding import smart_resize

    example_picture(tmp_path)
    Image.new("RGB", (2000, 1500), "white").save(tmp_path / "big.png")

    def sample(picture, answer, boxes):
        return messages_sample("<image>Where?", answer, images=[picture], boxes=boxes)

    past = sample("p.png", '{"bbox_2d": [0, 0, 1500, 700], "label": "cat"}', "qwen2.5-vl")
    absolute = sample("p.png", '{"bbox_2d": [0, 0, 1400, 700], "label": "cat"}', "qwen3-vl")
    relative = sample("big.png", "<ref>cat</ref><box>(10,10),(500,400)</box>", "pixels")
    fine = sample("big.png", "<ref>cat</ref><box>(10,10),(1500,1400)</box>", "pixels")
    path = write_json([past, absolute, relative, fine])
    report = validate_data([path])
    found = [(f.sample_index, f.code, f.severity.value) for f in report.findings]
    assert found == [(0, "B312", "error"), (1, "B313", "error"), (2, "B314", "warning")]
    assert "1008×756 resized picture" in report.findings[0].message  # the official budget
    assert "qwenvl data convert" in report.findings[0].fix and "--boxes" in report.findings[1].fix
    # With a Qwen2.5-VL model folder its processor's budget sizes the picture.
    model = vl_models / "qwen2.5-vl"
    (factor, low, high), _ = resize_of(model)
    height, width = smart_resize(750, 1000, factor, low, high)
    report = validate_data([path], ValidateOptions(model=model))
    assert f"{width}×{height} resized picture" in report.findings[0].message


def test_a_ref_without_a_box_stays_text_and_one_ref_may_have_several_boxes(tmp_path):
    pictures = example_picture(tmp_path)
    text = "<ref>the dog</ref> is left of <ref>cat</ref><box>(200,200),(600,700)</box><box>(1,2),(3,4)</box>"
    tokens, _ = from_internal(text, "qwen2-vl", pictures, "p.png")
    assert tokens.startswith("<ref>the dog</ref> is left of <|object_ref_start|>cat<|object_ref_end|><|box_start|>")
    assert tokens.endswith("<|box_end|><|box_start|>(1,2),(3,4)<|box_end|>")
    for convention in CONVENTIONS:
        written, _ = from_internal(text, convention, pictures, "p.png")
        back, _ = to_internal(written, convention, pictures, "p.png")
        assert same_within_one([{"value": back}], [{"value": text}]), (convention, written, back)


def test_training_reads_boxes_declared_by_flag_with_the_models_budget_and_image_root(vl_models, tmp_path):
    """`train --boxes qwen2.5-vl` on a file without `boxes` keys, away from its pictures: the pixel boxes are read
    on the training model's own picture budget under --image-root and learned in its family's convention (Qwen2-VL
    here: relative numbers in box tokens), the same boxes as the original file's within the 112-px grid's rounding."""
    import re

    from qwenvl_cli.demo import DEMO_DATA
    from qwenvl_cli.families import family_for
    from qwenvl_cli.train.data import prepare_samples

    model = vl_models / "qwen2-vl"
    samples = [s for s in json.loads(DEMO_DATA.read_text("utf-8")) if "<box>" in json.dumps(s)][:6]
    original = tmp_path / "original.json"
    original.write_text(json.dumps(samples), "utf-8")
    converted = tmp_path / "converted.jsonl"
    convert_file(original, "qwen2.5-vl", converted, model=model, image_root=DEMO_DATA.parent)
    bare = tmp_path / "data" / "bare.jsonl"  # no `boxes` keys, and not beside the pictures
    bare.parent.mkdir()
    lines = [json.loads(line) for line in converted.read_text("utf-8").splitlines()]
    bare.write_text("".join(json.dumps({k: v for k, v in s.items() if k != "boxes"}) + "\n" for s in lines), "utf-8")

    family = family_for(model)
    tokenizer = family.tokenizer(model)
    template = family.template(tokenizer, image_root=DEMO_DATA.parent)
    args = (template, 4096, family.picture_tokens(), DEMO_DATA.parent)

    def texts(**flags) -> list[str]:
        return [
            tokenizer.decode(s.input_ids) for s in prepare_samples(bare if flags else original, *args, **flags).samples
        ]

    want, got = texts(), texts(boxes="qwen2.5-vl", box_model=model)
    box = re.compile(r"<\|box_start\|>\((\d+),(\d+)\),\((\d+),(\d+)\)<\|box_end\|>")
    assert all("bbox_2d" not in text for text in got) and sum(len(box.findall(t)) for t in got) >= 6
    for a, b in zip(got, want, strict=True):
        assert box.sub("#", a) == box.sub("#", b)
        for x, y in zip(box.findall(a), box.findall(b), strict=True):
            assert all(abs(int(p) - int(q)) <= 1000 / 112 for p, q in zip(x, y, strict=True)), (x, y)
    # without the flag the file is taken as qwen-vl: its JSON boxes stay plain text
    plain = [tokenizer.decode(s.input_ids) for s in prepare_samples(bare, *args).samples]
    assert all("bbox_2d" in text for text in plain)
