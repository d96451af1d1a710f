"""Shared fixtures: a tiny tokenizer checkpoint folder built here (no hub), and data-file helpers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qwenvl_cli.demo import DEMO_DATA
from qwenvl_cli.model.tokenizer import VOCAB_FILE, train_bpe_ranks, write_ranks

SHARED_VOCAB = Path(__file__).resolve().parents[1].parent / "shared" / "vocab" / "qwen.tiktoken"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A folder with a small deterministic `qwen.tiktoken` (all it takes to count tokens)."""
    folder = tmp_path_factory.mktemp("tiny-model")
    corpus = DEMO_DATA.read_text("utf-8") + " The quick brown fox jumps over the lazy dog. " * 3
    write_ranks(train_bpe_ranks(corpus, 512), folder / VOCAB_FILE)
    return folder


@pytest.fixture
def write_json(tmp_path):
    """write_json(obj, name="data.json") -> path: dump `obj` as a JSON file in a fresh folder."""

    def write(obj, name: str = "data.json") -> Path:
        path = tmp_path / name
        path.write_text(json.dumps(obj, ensure_ascii=False, indent=1), "utf-8")
        return path

    return write


@pytest.fixture
def write_jsonl(tmp_path):
    """write_jsonl(samples_or_lines, name="data.jsonl") -> path; str items are written as raw lines."""

    def write(items, name: str = "data.jsonl") -> Path:
        path = tmp_path / name
        lines = [item if isinstance(item, str) else json.dumps(item, ensure_ascii=False) for item in items]
        path.write_text("\n".join(lines) + "\n", "utf-8")
        return path

    return write


@pytest.fixture(scope="session")
def official_vocab() -> Path:
    """The official 151,643-rank qwen.tiktoken from shared/ (skips where it is not available)."""
    if not SHARED_VOCAB.is_file():
        pytest.skip(f"{SHARED_VOCAB} is absent")
    return SHARED_VOCAB


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> Path:
    """A folder with the `tiny` chat model and the `tiny-base` base model (seed 0), built once per run."""
    from qwenvl_cli.model.presets import init_model

    root = tmp_path_factory.mktemp("models")
    init_model("tiny", root / "tiny", seed=0)
    init_model("tiny-base", root / "tiny-base", seed=0)
    return root


NEW_FAMILIES = ("qwen2-vl", "qwen2.5-vl", "qwen3-vl")


@pytest.fixture(scope="session")
def vl_models(tmp_path_factory) -> Path:
    """tiny-qwen2-vl, tiny-qwen2.5-vl and tiny-qwen3-vl, each in a folder named after its family (seed 0),
    built once per run."""
    from qwenvl_cli.families import FAMILIES

    root = tmp_path_factory.mktemp("vl-models")
    for name in NEW_FAMILIES:
        family = FAMILIES[name]
        family.init_model(family.generation.preset, root / name, seed=0)
    return root
