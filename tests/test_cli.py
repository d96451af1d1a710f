"""The `qwenvl` command line: through Typer's runner, and once as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import make_sample
from typer.testing import CliRunner

from qwenvl_cli import __version__
from qwenvl_cli.cli import app
from qwenvl_cli.demo import DEMO_BROKEN, DEMO_DATA

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args), env={"COLUMNS": "160", "NO_COLOR": "1"})


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"qwenvl {__version__}"


def test_help_lists_only_working_commands():
    result = invoke("--help")
    assert result.exit_code == 0
    for built in ("validate-data", "init-model", "train", "data", "eval", "merge", "chat", "profile", "serve-ui"):
        assert built in result.stdout


def test_validate_help_has_an_example():
    result = invoke("validate-data", "--help")
    assert result.exit_code == 0
    assert "qwenvl validate-data train.json" in result.stdout
    assert "--output-clean" in result.stdout


def test_no_path_checks_the_bundled_demo():
    result = invoke("validate-data")
    assert result.exit_code == 0, result.output
    assert "14 samples" in result.stdout
    assert "no errors" in result.stdout


def test_demo_broken_file_reports_and_exits_1():
    result = invoke("validate-data", str(DEMO_BROKEN))
    assert result.exit_code == 1
    for code in ("S113", "S105", "F004", "B302", "B303", "M201", "I401", "I404", "M205", "M204", "S116"):
        assert code in result.stdout, code
    assert "Rename `human` to `user`" in result.stdout
    assert "--output-clean FILE writes the 2 valid samples" in result.stdout


def test_json_format_is_the_report(tmp_path):
    result = invoke("validate-data", str(DEMO_BROKEN), "--format", "json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["exit_code"] == 1
    assert report["samples"] == 12
    assert report["valid_samples"] == 2
    assert report["counts"]["S113"] == 2
    finding = next(f for f in report["findings"] if f["code"] == "S105")
    assert finding["sample_id"] == "fine"
    assert finding["line"] == 3
    assert finding["severity"] == "error"


def test_output_clean_via_cli(tmp_path):
    out = tmp_path / "clean.jsonl"
    before = DEMO_BROKEN.read_bytes()
    result = invoke("validate-data", str(DEMO_BROKEN), "--output-clean", str(out))
    assert result.exit_code == 1
    assert DEMO_BROKEN.read_bytes() == before
    ids = [json.loads(line)["id"] for line in out.read_text("utf-8").splitlines()]
    assert ids == ["fine", "ends_with_user"]
    # The clean file itself validates (warnings only).
    again = invoke("validate-data", str(out), "--image-root", str(DEMO_DATA.parent))
    assert again.exit_code == 0, again.output
    assert "1 warning" in again.stdout


def test_strict_makes_warnings_fatal(write_json):
    path = write_json([make_sample("a", "only a question")])
    assert invoke("validate-data", str(path)).exit_code == 0
    assert invoke("validate-data", str(path), "--strict").exit_code == 1


def test_missing_file_exits_2_without_traceback(tmp_path):
    result = invoke("validate-data", str(tmp_path / "nope.json"))
    assert result.exit_code == 2
    assert "F001" in result.stdout
    assert "Traceback" not in result.output


def test_output_clean_onto_input_is_refused(write_json):
    path = write_json([make_sample()])
    before = path.read_bytes()
    result = invoke("validate-data", str(path), "--output-clean", str(path))
    assert result.exit_code == 2
    assert "is one of the input files" in result.stderr
    assert "the input is never modified" in result.stderr
    assert path.read_bytes() == before


def test_model_without_vocab_is_a_clear_error(tmp_path, write_json):
    path = write_json([make_sample()])
    result = invoke("validate-data", str(path), "--model", str(tmp_path))
    assert result.exit_code == 2
    assert "has no config.json and no qwen.tiktoken" in result.stderr
    assert "Traceback" not in result.output


def test_bad_option_value_exits_2():
    result = invoke("validate-data", "--max-length", "-5")
    assert result.exit_code == 2


def test_length_histogram_in_text_output(write_json, tiny_model_dir):
    long_answer = "word " * 400
    path = write_json([make_sample("a"), make_sample("b", "Q", long_answer)])
    result = invoke("validate-data", str(path), "--model", str(tiny_model_dir), "--max-length", "64")
    assert result.exit_code == 0, result.output  # too long but still learnable: a warning
    assert "Token lengths" in result.stdout
    assert "L503" in result.stdout
    assert "█" in result.stdout


@pytest.mark.slow
def test_real_subprocess(tmp_path):
    """The installed console entry point, as a user runs it."""
    env = {**os.environ, "COLUMNS": "120", "NO_COLOR": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "qwenvl_cli", "validate-data", str(DEMO_BROKEN), "--format", "json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 1, done.stderr
    assert json.loads(done.stdout)["valid_samples"] == 2
    missing = subprocess.run(
        [sys.executable, "-m", "qwenvl_cli", "validate-data", str(tmp_path / "x.json")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert missing.returncode == 2
    assert "Traceback" not in missing.stderr + missing.stdout


def test_cuda_memory_segments_grow_unless_the_user_chose(monkeypatch):
    """`qwenvl` asks PyTorch for expandable CUDA segments (less fragmentation), and keeps a user's setting."""
    import os
    import subprocess
    import sys

    probe = "import os, sys; sys.argv = ['qwenvl', '--version']\nfrom qwenvl_cli import cli\ntry:\n    cli.main()\n"
    probe += "except SystemExit:\n    pass\nprint(os.environ.get('PYTORCH_CUDA_ALLOC_CONF'))"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")}
    ours = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert ours.stdout.strip().splitlines()[-1] == "expandable_segments:True"
    env["PYTORCH_CUDA_ALLOC_CONF"] = "max_split_size_mb:128"
    theirs = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert theirs.stdout.strip().splitlines()[-1] == "max_split_size_mb:128"
    newer_name = dict(env, PYTORCH_ALLOC_CONF="max_split_size_mb:64")  # PyTorch's newer name for the setting
    del newer_name["PYTORCH_CUDA_ALLOC_CONF"]
    theirs = subprocess.run([sys.executable, "-c", probe], env=newer_name, capture_output=True, text=True, check=True)
    assert theirs.stdout.strip().splitlines()[-1] == "None"
