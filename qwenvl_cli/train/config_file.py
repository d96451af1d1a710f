"""`qwenvl train --config run.yaml`: options from a YAML file, under the flags given on the command line,
made into `TrainOptions`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import QwenvlError
from .options import TrainOptions


def read_config(config: Path) -> dict[str, Any]:
    """The option names (dashes as underscores) and values of a YAML --config file."""
    import yaml

    try:
        loaded = yaml.safe_load(config.read_text("utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise QwenvlError(f"cannot read {config} ({exc})", "Pass a YAML file of option: value lines") from None
    if not isinstance(loaded, dict):
        raise QwenvlError(f"{config} is not a mapping of options", "Write one `option: value` per line")
    return {str(key).replace("-", "_"): value for key, value in loaded.items()}


def merge_config(values: dict[str, Any], given: set[str], config: Path) -> dict[str, Any]:
    """`values` (every flag, given or default) with the file's options in place of the flags not `given`."""
    merged = dict(values)
    for name, value in read_config(config).items():
        if name not in values:
            raise QwenvlError(f"{config} sets unknown option {name!r}", "Use the names of qwenvl train's flags")
        if name not in given:
            merged[name] = value
    return merged


def train_options(values: dict[str, Any], given: set[str], config: Path | None = None) -> TrainOptions:
    """TrainOptions from flag values (enum members or plain values; --lora-targets as "a,b,c"), with a
    --config file's options under the flags that were `given`."""
    from enum import Enum

    if config is not None:
        values = merge_config(values, given, config)
    values = {key: (value.value if isinstance(value, Enum) else value) for key, value in values.items()}
    if isinstance(values.get("lora_targets"), str):
        values["lora_targets"] = [name.strip() for name in values["lora_targets"].split(",") if name.strip()]
    return TrainOptions(**values)
