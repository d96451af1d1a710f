"""Plain helpers for tests (import with `from helpers import make_sample`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

# Stand-ins for the official remote-code files of a downloaded Qwen-VL folder, written here for the tests (the
# upstream files are not part of this repository): they define the official class names on top of qwenvl's
# native classes, so transformers' trust_remote_code path has real code to follow.
REMOTE_CODE = {
    "configuration_qwen.py": """from qwenvl_cli.model.config import QwenVLConfig


class QWenConfig(QwenVLConfig):
    model_type = "qwen"

    def __post_init__(self, **kwargs):
        auto_map = kwargs.pop("auto_map", None)  # kept, as a remote-code config keeps it (the native one drops it)
        super().__post_init__(**kwargs)
        if auto_map is not None:
            self.auto_map = auto_map
""",
    "modeling_qwen.py": """from qwenvl_cli.model.modeling import QwenVLForCausalLM

from .configuration_qwen import QWenConfig


class QWenLMHeadModel(QwenVLForCausalLM):
    config_class = QWenConfig
""",
    "visual.py": "# stand-in for the official visual.py (the vision tower lives in modeling_qwen.py here)\n",
    "qwen_generation_utils.py": "# stand-in for the official qwen_generation_utils.py\n",
    "tokenization_qwen.py": "# stand-in for the official tokenization_qwen.py\n",
}


def make_sample(sample_id: str = "s0", *turns: str, roles: tuple[str, ...] | None = None) -> dict:
    """A sample with alternating user/assistant turns (or the given roles)."""
    turns = turns or ("Hello", "Hi!")
    roles = roles or tuple("user" if i % 2 == 0 else "assistant" for i in range(len(turns)))
    return {"id": sample_id, "conversations": [{"from": r, "value": v} for r, v in zip(roles, turns, strict=True)]}


def official_layout(models: Path, folder: Path) -> Path:
    """The tiny chat model dressed as a downloaded official folder: remote-code files (REMOTE_CODE),
    tokenizer_config.json with its auto_map, a font, README and licence, config.json's auto_map and a field the
    native config does not model."""
    shutil.copytree(models / "tiny", folder)
    for name, text in REMOTE_CODE.items():
        (folder / name).write_text(text, "utf-8")
    tokenizer_config = {"auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]}}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config), "utf-8")
    (folder / "SimSun.ttf").write_bytes(b"\x00\x01font")
    (folder / "README.md").write_text("# Qwen-VL-Chat\n", "utf-8")
    (folder / "LICENSE").write_text("licence text\n", "utf-8")
    (folder / ".gitattributes").write_text("*.bin filter=lfs\n", "utf-8")
    config = json.loads((folder / "config.json").read_text("utf-8"))
    config["auto_map"] = {
        "AutoConfig": "configuration_qwen.QWenConfig",
        "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel",
    }
    config["use_flash_attn"] = "auto"
    (folder / "config.json").write_text(json.dumps(config), "utf-8")
    return folder
