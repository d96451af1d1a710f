"""--report-to: the Trainer's tracker integrations, offline and in the run folder, each told the qwenvl settings;
a tracker that is not installed is a clear error before anything loads."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from typer.testing import CliRunner

from qwenvl_cli.cli import app
from qwenvl_cli.demo import DEMO_DATA
from qwenvl_cli.errors import QwenvlError
from qwenvl_cli.train import trackers
from qwenvl_cli.train.options import TrainOptions
from qwenvl_cli.train.runner import run_training


@pytest.fixture
def data(tmp_path):
    folder = tmp_path / "data"
    shutil.copytree(DEMO_DATA.parent, folder, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    return folder / "train.json"


def test_report_to_reads_none_one_several_and_refuses_unknown():
    assert TrainOptions(report_to="none").report_to == []
    assert TrainOptions(report_to="wandb").report_to == ["wandb"]
    assert TrainOptions(report_to="WandB, mlflow,wandb").report_to == ["wandb", "mlflow"]
    assert TrainOptions(report_to=["tensorboard", "none"]).report_to == ["tensorboard"]
    with pytest.raises(ValueError, match="comet"):
        TrainOptions(report_to="comet")


def test_the_three_trackers_record_one_run_offline_with_the_qwenvl_settings(models, data, tmp_path, monkeypatch):
    for name in ("WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "MLFLOW_TRACKING_URI", "TENSORBOARD_LOGGING_DIR"):
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "run"
    options = TrainOptions(
        method="lora",
        model=models / "tiny",
        data=data,
        output=out,
        max_steps=2,
        grad_accum=1,
        lora_r=4,
        save_steps=100,
        report_to="tensorboard,wandb,mlflow",
    )
    result = run_training(options)
    assert result.global_step == 2
    # wandb: an offline run under <output>/wandb whose config holds the qwenvl settings and whose history has loss
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    # offline, the config and the history are records in the run's .wandb file (`wandb sync` uploads them)
    recorded = (runs[0] / f"run-{runs[0].name.split('-')[-1]}.wandb").read_bytes()
    assert b"lora_targets" in recorded and b"skip_invalid" in recorded  # qwenvl's own settings
    assert b"train/loss" in recorded
    # mlflow: a local file store under <output>/mlruns, a run with the loss metric and the settings as an artifact
    settings = list((out / "mlruns").rglob("qwenvl_settings.json"))
    assert len(settings) == 1
    assert json.loads(settings[0].read_text("utf-8"))["method"] == "lora"
    run_dir = settings[0].parents[1]
    assert (run_dir / "metrics" / "loss").is_file() or any((out / "mlruns").rglob("loss"))
    # tensorboard: event files with the settings as text
    events = list((out / "tensorboard").rglob("events.out.tfevents.*"))
    assert events and any(b"qwenvl/settings" in path.read_bytes() for path in events)
    # nothing of it leaks into the process for a later run
    assert "WANDB_DIR" not in os.environ and "MLFLOW_TRACKING_URI" not in os.environ
    import wandb

    assert wandb.run is None


def test_a_tracker_that_is_not_installed_is_named_with_its_package(monkeypatch, models, data, tmp_path):
    real = trackers.importlib.util.find_spec
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    with pytest.raises(QwenvlError, match=r"--report-to wandb needs the wandb package") as raised:
        trackers.check_trackers(["tensorboard", "wandb"])
    assert "pip install wandb" in raised.value.fix
    result = CliRunner().invoke(
        app,
        [
            *["train", "--model", str(models / "tiny"), "--data", str(data), "--output", str(tmp_path / "r")],
            *["--method", "lora", "--max-steps", "1", "--report-to", "wandb"],
        ],
    )
    assert result.exit_code == 2 and "needs the wandb package" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "r").exists()  # refused before anything was written


def test_the_users_own_tracker_settings_win(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    with trackers.tracker_environment(["wandb", "mlflow"], tmp_path) as added:
        assert os.environ["WANDB_MODE"] == "online" and os.environ["MLFLOW_TRACKING_URI"].startswith("http://")
        assert added["WANDB_DIR"] == str(tmp_path.resolve()) and "WANDB_MODE" not in added
    assert "WANDB_DIR" not in os.environ
