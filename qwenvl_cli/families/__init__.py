"""Model families: `family_for(folder)` gives the `ModelFamily` that reads, trains and writes a checkpoint
folder, recognised by its config.json `model_type`. Qwen-VL (v1) is the first (`qwen_vl`); Qwen2-VL,
Qwen2.5-VL and Qwen3-VL share one module built on transformers' own classes (`hf_vl`)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import QwenvlError
from .base import ModelFamily
from .hf_vl import Qwen2VLFamily, Qwen3VLFamily, Qwen25VLFamily
from .qwen_vl import QwenVLFamily

FAMILIES: dict[str, ModelFamily] = {
    family.name: family for family in (QwenVLFamily(), Qwen2VLFamily(), Qwen25VLFamily(), Qwen3VLFamily())
}
# Generations recognised by their model_type and refused by name until their family is built
NOT_YET = {
    "qwen3_vl_moe": "Qwen3-VL MoE",
}


def family_named(name: str) -> ModelFamily:
    if name not in FAMILIES:
        raise QwenvlError(f"unknown model family {name!r}", f"Use one of: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_of_preset(preset: str) -> ModelFamily:
    """The family whose `init-model` preset this is."""
    return _family_listing(preset, "presets", "preset")


def profile_family(preset: str) -> ModelFamily:
    """The family whose `qwenvl profile --preset` this is."""
    return _family_listing(preset, "profile_presets", "profile preset")


def _family_listing(name: str, table: str, what: str) -> ModelFamily:
    for family in FAMILIES.values():
        if name in getattr(family, table):
            return family
    known = ", ".join(entry for family in FAMILIES.values() for entry in getattr(family, table))
    raise QwenvlError(f"unknown {what} {name!r}", f"Use one of: {known}")


def family_for(folder: str | Path) -> ModelFamily:
    """The family of the checkpoint in `folder`, from config.json's `model_type` (a folder with only a
    tokenizer: from its tokenizer files)."""
    folder = Path(folder)
    config_file = folder / "config.json"
    if not config_file.is_file():
        for family in FAMILIES.values():  # a tokenizer-only folder (validate-data --model needs no weights)
            if folder.is_dir() and any((folder / name).is_file() for name in family.tokenizer_files):
                return family
        tokenizers = " or ".join(dict.fromkeys(n for family in FAMILIES.values() for n in family.tokenizer_files))
        if not folder.exists():
            raise QwenvlError(
                f"model folder {folder} does not exist",
                "Pass the folder of a checkpoint, or make one with qwenvl init-model",
            )
        raise QwenvlError(
            f"{folder} has no config.json and no {tokenizers}, so it is not a model folder",
            "Pass the folder of a checkpoint (it holds config.json, the tokenizer files and the weights), "
            "or make one with qwenvl init-model",
        )
    try:
        model_type = json.loads(config_file.read_text("utf-8")).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise QwenvlError(
            f"{config_file} is not a JSON object ({exc.__class__.__name__})",
            "Restore config.json from the model's original files",
        ) from None
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    supported = ", ".join(f"{t!r} ({family.title})" for family in FAMILIES.values() for t in family.model_types)
    if model_type in NOT_YET:
        raise QwenvlError(
            f"{folder} holds a {NOT_YET[model_type]} model (model_type {model_type!r}), which qwenvl does not train "
            "or load yet",
            f"Use a Qwen-VL checkpoint (model_type {supported}); the newer generations are the next step",
        )
    raise QwenvlError(
        f"{folder} holds a model of type {model_type!r}, which qwenvl does not train or load",
        f"Use a checkpoint of a supported family: model_type {supported}",
    )


__all__ = ["FAMILIES", "ModelFamily", "family_for", "family_named", "family_of_preset", "profile_family"]
