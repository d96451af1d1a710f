"""`validate_data` as a service: several files, clean output, progress, formats."""

from __future__ import annotations

import json

import pytest
from helpers import make_sample
from PIL import Image

from qwenvl_cli.data.validate import ValidateOptions, validate_data
from qwenvl_cli.errors import QwenvlError


def codes(report) -> list[str]:
    return [f.code for f in report.findings]


def test_several_files_are_reported_separately(write_json, write_jsonl):
    good = write_json([make_sample("a"), make_sample("b", "Q", "A")], "good.json")
    bad = write_jsonl([make_sample("a"), {"id": "x", "conversations": []}], "bad.jsonl")
    report = validate_data([good, bad])
    assert [f.format for f in report.files] == ["json", "jsonl"]
    assert [f.samples for f in report.files] == [2, 2]
    assert [f.valid_samples for f in report.files] == [2, 1]
    # Ids are unique per file: "a" in both files is not a duplicate.
    assert codes(report) == ["S108"]
    assert report.findings[0].file == str(bad)
    assert report.exit_code == 1


def test_unreadable_file_beside_a_good_one_exits_2(write_json, tmp_path):
    good = write_json([make_sample()])
    report = validate_data([good, tmp_path / "missing.json"])
    assert report.exit_code == 2
    assert report.files[0].readable and not report.files[1].readable
    assert codes(report) == ["F001"]


def test_output_clean_json_list_keeps_valid_samples_and_their_content(write_json, tmp_path):
    samples = [
        make_sample("keep1", "Picture 1: <img>https://example.com/a.jpg</img>\n图中是什么？", "一只狗。"),
        make_sample("drop", "Where?", "<box>(5,5),(1,1)</box>"),
        make_sample("keep2", "Q only"),
    ]
    path = write_json(samples)
    before = path.read_bytes()
    out = tmp_path / "clean" / "train.clean.json"
    report = validate_data([path], ValidateOptions(output_clean=out))
    assert path.read_bytes() == before
    assert report.clean_output == str(out)
    assert json.loads(out.read_text("utf-8")) == [samples[0], samples[2]]
    strict_out = tmp_path / "strict.jsonl"
    validate_data([path], ValidateOptions(output_clean=strict_out, strict=True))
    kept = [json.loads(line) for line in strict_out.read_text("utf-8").splitlines()]
    assert kept == [samples[0]]  # keep2 ends with a user turn: a warning, fatal under --strict


def test_output_clean_is_not_written_for_an_unreadable_input(tmp_path):
    out = tmp_path / "clean.json"
    report = validate_data([tmp_path / "missing.json"], ValidateOptions(output_clean=out))
    assert report.exit_code == 2
    assert not out.exists()


def test_output_clean_refuses_the_input_path(write_json):
    path = write_json([make_sample()])
    with pytest.raises(QwenvlError, match="is one of the input files"):
        validate_data([path], ValidateOptions(output_clean=path))


def test_progress_hook_sees_reading_and_images(write_json, tmp_path):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    path = write_json([make_sample(f"s{i}", "Picture 1: <img>a.png</img>\nQ", "A") for i in range(3)])
    calls = []
    report = validate_data([path], on_progress=lambda *args: calls.append(args))
    assert report.exit_code == 0
    assert report.images_checked == 1  # three references, one distinct file
    stages = {c[0] for c in calls}
    assert stages == {"read", "images"}
    last_read = [c for c in calls if c[0] == "read"][-1]
    assert last_read[1] == last_read[2]  # reading ends at 100 %
    assert [c for c in calls if c[0] == "images"][-1][1:3] == (1, 1)


def test_bom_and_crlf_are_tolerated(tmp_path):
    path = tmp_path / "windows.jsonl"
    lines = [json.dumps(make_sample("a")), json.dumps(make_sample("b"))]
    path.write_bytes(("\ufeff" + "\r\n".join(lines) + "\r\n").encode("utf-8"))
    report = validate_data([path])
    assert report.exit_code == 0, codes(report)
    assert report.samples == 2


def test_jsonl_line_numbers_count_blank_lines(write_jsonl):
    path = write_jsonl([make_sample("a"), "", "   ", make_sample("a", "Other", "Answer")])
    report = validate_data([path])
    assert codes(report) == ["S105"]
    assert report.findings[0].line == 4
    assert report.findings[0].sample_index == 1


def test_json_list_line_numbers(tmp_path):
    path = tmp_path / "pretty.json"
    path.write_text(json.dumps([make_sample("a"), make_sample("a")], indent=2), "utf-8")
    report = validate_data([path])
    finding = report.findings[0]
    assert finding.code == "S105"
    assert path.read_text("utf-8").splitlines()[finding.line - 1].strip() == "{"
    assert finding.line > 2


def test_image_root_option(write_json, tmp_path):
    images = tmp_path / "elsewhere"
    images.mkdir()
    Image.new("RGB", (8, 8), "blue").save(images / "b.png")
    path = write_json([make_sample("a", "Picture 1: <img>b.png</img>\nQ", "A")])
    assert codes(validate_data([path])) == ["I401"]
    assert validate_data([path], ValidateOptions(image_root=images)).exit_code == 0
    assert validate_data([path], ValidateOptions(check_images=False)).images_checked == 0


def test_findings_are_sorted_by_sample(write_json):
    path = write_json([make_sample("a", "Picture 1: <img>missing.png</img>\nQ", "A"), make_sample("a")])
    report = validate_data([path])
    assert [(f.sample_index, f.code) for f in report.findings] == [(0, "I401"), (1, "S105")]


@pytest.mark.parametrize(
    ("path", "hint"),
    [(" a.png", "Remove the spaces"), ("img\\\\a.png", "forward slashes"), ("nope.png", None)],
)
def test_missing_image_fix_names_the_visible_cause(write_json, path, hint):
    report = validate_data([write_json([make_sample("a", f"Picture 1: <img>{path}</img>\nQ", "A")])])
    (finding,) = report.findings
    assert finding.code == "I401"
    if hint is None:
        assert finding.fix.startswith("Fix the path")
    else:
        assert hint in finding.fix
