"""What `qwenvl train` uses where nothing was given: the built-in tiny model and data, the demo's settings,
a fresh run folder."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from .options import TrainOptions


def builtin_model_dir() -> Path:
    """The tiny model, built once into the cache (seeded: the same on every machine)."""
    from ..data.images import default_cache_dir
    from ..families import family_of_preset

    folder = default_cache_dir() / "models" / "tiny"
    if not (folder / "model.safetensors").is_file():
        family_of_preset("tiny").init_model("tiny", folder, seed=0, force=True)
    return folder


# `qwenvl train` with neither --model nor --data runs the built-in demo: full fine-tuning of the tiny model on
# synthetic one-shape pictures with colour questions, asked on held-out pictures every 100 steps — settings
# under which a random model visibly learns in a minute or two of CPU. Options given explicitly win.
DEMO_SETTINGS: dict[str, Any] = {
    "method": "full",
    "max_steps": 300,
    "batch_size": 8,
    "grad_accum": 1,
    "lr": 2e-3,
    "warmup_steps": 5,
    "save_steps": 100,
    "eval_every": 100,
    "eval_samples": 40,
}
DEMO_DATA_SETTINGS = {"n": 840, "seed": 0, "image_size": 56, "eval_fraction": 40 / 840, "max_shapes": 1}


def builtin_data_dir() -> Path:
    """The built-in training data (train.json, eval.json, images/), synthesised once into the cache."""
    from ..data.images import default_cache_dir
    from ..data.synth import synthesize

    folder = default_cache_dir() / "data" / "colours-v1"
    if not (folder / "eval.json").is_file():
        synthesize(folder, questions=["colour"], force=True, **DEMO_DATA_SETTINGS)
    return folder


def demo_options(options: TrainOptions, given: set[str]) -> TrainOptions:
    """The built-in demo's settings (DEMO_SETTINGS, the built-in data with its held-out half) under the
    options in `given`, which were set explicitly."""
    folder = builtin_data_dir()
    update: dict[str, Any] = {key: value for key, value in DEMO_SETTINGS.items() if key not in given}
    update["data"] = folder / "train.json"
    if "eval_data" not in given:
        update["eval_data"] = folder / "eval.json"
    return options.model_copy(update=update)


def resolve_defaults(options: TrainOptions) -> TrainOptions:
    """Fill in the built-in model, the built-in data and a fresh run folder where they were not given."""
    update: dict[str, Any] = {}
    if options.data is None:
        update["data"] = builtin_data_dir() / "train.json"
    if options.model is None:
        update["model"] = builtin_model_dir()
    if options.output is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        update["output"] = Path("runs") / f"{options.method}-{stamp}"
    return options.model_copy(update=update) if update else options
