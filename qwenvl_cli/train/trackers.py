"""Experiment trackers (`--report-to tensorboard,wandb,mlflow`): the Trainer's own integrations, set up to write
into the run folder and to work offline, each told the run's qwenvl settings; a tracker that is not installed
is refused before anything loads."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import QwenvlError

# tracker → (the modules transformers looks for, the package to install)
TRACKERS: dict[str, tuple[tuple[str, ...], str]] = {
    "tensorboard": (("tensorboard", "tensorboardX"), "tensorboardX"),
    "wandb": (("wandb",), "wandb"),
    "mlflow": (("mlflow",), "mlflow-skinny"),
}


def check_trackers(report_to: list[str]) -> None:
    """Refuse a tracker whose package is missing (the Trainer would fail later with its own message)."""
    for name in report_to:
        modules, package = TRACKERS[name]
        if not any(importlib.util.find_spec(module) is not None for module in modules):
            raise QwenvlError(
                f"--report-to {name} needs the {package} package, which is not installed",
                f"pip install {package} (or pip install 'qwenvl[trackers]'), or leave {name} out of --report-to",
            )


def tracker_settings(report_to: list[str], output: Path) -> dict[str, str]:
    """The environment each tracker reads, where the user has not set it: everything in the run folder, and
    wandb offline (`wandb sync <output>/wandb/offline-run-*` uploads it later)."""
    output = Path(output).resolve()
    wanted: dict[str, str] = {}
    if "tensorboard" in report_to:
        wanted["TENSORBOARD_LOGGING_DIR"] = str(output / "tensorboard")
    if "wandb" in report_to:
        wanted |= {"WANDB_MODE": "offline", "WANDB_DIR": str(output), "WANDB_PROJECT": "qwenvl"}
        wanted |= {"WANDB_SILENT": "true"}  # wandb's banner would interleave with our progress display
    if "mlflow" in report_to:
        wanted |= {"MLFLOW_EXPERIMENT_NAME": "qwenvl"}
        if "MLFLOW_TRACKING_URI" not in os.environ:  # a local file store needs no server (MLflow 3 asks to opt in)
            wanted |= {"MLFLOW_TRACKING_URI": (output / "mlruns").as_uri(), "MLFLOW_ALLOW_FILE_STORE": "true"}
    return {name: value for name, value in wanted.items() if name not in os.environ}


@contextmanager
def tracker_environment(report_to: list[str], output: Path) -> Iterator[dict[str, str]]:
    """Set `tracker_settings` for the run, and take them away after it (a later run in the same process,
    with another run folder, must not inherit them)."""
    added = tracker_settings(report_to, output)
    if "wandb" in report_to:
        Path(added.get("WANDB_DIR", output)).mkdir(parents=True, exist_ok=True)
    os.environ.update(added)
    try:
        yield added
    finally:
        if "wandb" in report_to and "wandb" in sys.modules:
            import wandb

            if wandb.run is not None:  # the Trainer leaves its wandb run open; the next run must get its own
                wandb.finish()
        for name in added:
            os.environ.pop(name, None)


def record_settings(report_to: list[str], settings: dict[str, Any], callbacks: list) -> None:
    """Give each tracker the run's qwenvl settings (method, model, data, LoRA, engine, …) once the Trainer's
    integration has opened its run (call from on_train_begin, after the integrations' own)."""
    if "wandb" in report_to:
        import wandb

        if wandb.run is not None:
            wandb.config.update({"qwenvl": settings}, allow_val_change=True)
    if "mlflow" in report_to:
        import mlflow

        if mlflow.active_run() is not None:
            mlflow.log_dict(settings, "qwenvl_settings.json")
            mlflow.set_tags({f"qwenvl.{key}": str(settings[key]) for key in ("method", "model", "data")})
    if "tensorboard" in report_to:
        for callback in callbacks:
            writer = getattr(callback, "tb_writer", None)
            if writer is not None:
                writer.add_text("qwenvl/settings", "```\n" + json.dumps(settings, indent=2) + "\n```")
                writer.flush()
