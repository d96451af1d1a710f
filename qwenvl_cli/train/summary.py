"""The finished run folder: the final model or adapter (with the tokenizer files), loss.png, and the
manifest qwenvl_run.json, written last (a folder without it is not a finished run)."""

from __future__ import annotations

import json
import os
import platform
import shutil
from datetime import datetime, timezone
from pathlib import Path

from .. import __version__
from ..schemas import RunManifest
from .options import RunSetup
from .presets import PRESETS

RUN_MANIFEST = "qwenvl_run.json"


def package_versions() -> dict[str, str]:
    """The versions of the packages a run depends on, for the manifest."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "accelerate", "deepspeed", "bitsandbytes", "gptqmodel"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def write_run_folder(model, setup: RunSetup, prepared, identity, result, losses, state_dict=None):
    """Write the final model and the manifest (last) into the run folder; each file lands atomically.
    `state_dict` is the gathered state of a DeepSpeed run (the model's own parameters may be shards)."""
    options, family, rules, model_dir = setup.options, setup.family, setup.rules, setup.model_dir
    output, quant, generation = setup.output, setup.quant, setup.generation
    staging = output / f".final-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        if PRESETS[rules.method].lora:
            model.save_pretrained(staging, state_dict=state_dict)
            family.copy_tokenizer(model_dir, staging)
            (staging / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", "utf-8")
        else:
            family.save_model(model, staging, model_dir, generation, dtype=rules.precision, state_dict=state_dict)
            lacking = [name for name, lack in family.consumers(staging).items() if lack is not None]
            if lacking:  # the base folder did not ship their files (a built-in model, a stripped copy)
                result.notes.append(
                    f"the fine-tuned model does not load in {'; '.join(lacking)}: the base folder has no "
                    "remote-code/tokenizer files to carry over (train from the downloaded official folder)"
                )
        if setup.pixels:  # the trained folder's processor makes the pictures the run trained on
            family.record_pixels(staging, setup.pixels)
        curve = None
        if losses:
            from ..charts import loss_curve_png

            title = f"{rules.method} · {Path(options.data).name}"
            loss_curve_png(losses, staging / "loss.png", title=title, evaluations=result.evaluations)
            curve = str(output / "loss.png")
        for path in staging.iterdir():
            os.replace(path, output / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    manifest = RunManifest(
        qwenvl_version=__version__,
        method=rules.method,
        precision=rules.precision,
        base_model=identity["base_model"],
        base_fingerprint=identity["base_fingerprint"],
        chat_format=generation.get("chat_format", "chatml"),
        quantisation=quant,
        modules_to_save=list(rules.modules_to_save),
        data_file=identity["data_file"],
        data_sha256=identity["data_sha256"],
        samples=len(prepared.samples),
        dropped_samples=prepared.dropped_too_long,
        arguments=json.loads(options.model_dump_json()),
        packages=package_versions(),
        global_step=result.global_step,
        final_loss=result.final_loss,
        processes=result.processes,
        evaluations=result.evaluations,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    tmp = output / f".{RUN_MANIFEST}.tmp"
    tmp.write_text(manifest.model_dump_json(indent=2) + "\n", "utf-8")
    os.replace(tmp, output / RUN_MANIFEST)
    return curve
