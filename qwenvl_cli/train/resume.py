"""Resuming a run: its identity (method, base model, data, …) recorded beside the checkpoints, compared on
--resume, and the checkpoint to continue from."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import QwenvlError
from .options import TrainOptions
from .presets import PRESETS, ResolvedRules

RUN_IDENTITY = "run.json"


def latest_checkpoint(checkpoints: Path) -> Path | None:
    """The newest checkpoint that finished saving (the Trainer writes trainer_state.json last)."""
    complete = [p for p in checkpoints.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    return max(complete, key=lambda p: int(p.name.split("-")[-1]), default=None)


def run_identity(
    options: TrainOptions, model_dir: Path, fingerprint: str, rules: ResolvedRules, data_sha: str, quant: str | None
) -> dict:
    """What a resumed run must share with the run that wrote the checkpoints (the data file's path aside)."""
    return {
        "method": rules.method,
        "base_model": str(model_dir.resolve()),
        "base_fingerprint": fingerprint,
        "quantisation": quant,
        "data_file": str(options.data.resolve()),
        "data_sha256": data_sha,
        "max_length": options.max_length,
        "packing": options.packing,
        "lora_r": options.lora_r if PRESETS[rules.method].lora else None,
        "lora_targets": options.lora_targets if PRESETS[rules.method].lora else None,
        # None when not given, as in the checkpoints of runs written before these options existed
        "min_pixels": options.min_pixels,  # the samples' picture spans
        "max_pixels": options.max_pixels,
        # the optimizer's parameter groups (their count) differ with --vision-lr/--merger-lr
        "part_learning_rates": True if options.vision_lr is not None or options.merger_lr is not None else None,
    }


def resume_point(options: TrainOptions, checkpoints: Path, identity: dict) -> Path | None:
    if options.resume is None:
        return None
    if options.resume == "auto":
        target = latest_checkpoint(checkpoints)
        if target is None:
            return None  # nothing to resume: a fresh start
    else:
        target = Path(options.resume)
        if not (target / "trainer_state.json").is_file():
            raise QwenvlError(
                f"{target} is not a complete checkpoint (no trainer_state.json)",
                "Pass a checkpoints/checkpoint-N folder of a run, or --resume auto",
            )
    recorded_path = checkpoints / RUN_IDENTITY
    if recorded_path.is_file():
        recorded = json.loads(recorded_path.read_text("utf-8"))
        changed = [
            f"{key}: {recorded.get(key)!r} → {identity[key]!r}"
            for key in identity
            if key != "data_file" and recorded.get(key) != identity[key]
        ]
        if changed:
            raise QwenvlError(
                "cannot resume: the run changed since its checkpoints were written (" + "; ".join(changed) + ")",
                "Resume with the same method, model and data, or start a new run with another --output",
            )
    return target
