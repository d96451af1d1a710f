"""Launching `qwenvl train` in several processes and on several machines: commands, refusals, FSDP settings,
and a real two-node rendezvous (two `qwenvl train` commands on this one machine, one per "node")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qwenvl_cli.cli import app
from qwenvl_cli.errors import QwenvlError
from qwenvl_cli.families import family_named
from qwenvl_cli.model.presets import init_model
from qwenvl_cli.train.engines import fsdp_config
from qwenvl_cli.train.launch import (
    DEFAULT_MASTER_PORT,
    LaunchPlan,
    check_plan,
    free_port,
    launch_command,
    read_hostfile,
    strip_launch_flags,
    train_argv,
)
from qwenvl_cli.train.runner import TrainOptions, run_training


def _value(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def test_torchrun_command_for_one_node_of_several():
    plan = LaunchPlan(processes=8, gpus=True, nnodes=2, node_rank=1, master_addr="10.0.0.1")
    command = launch_command(plan, ["--method", "lora"])
    assert command[1:3] == ["-m", "torch.distributed.run"]
    assert _value(command, "--nnodes") == "2" and _value(command, "--node_rank") == "1"
    assert _value(command, "--nproc_per_node") == "8"
    assert _value(command, "--master_addr") == "10.0.0.1"
    assert _value(command, "--master_port") == str(DEFAULT_MASTER_PORT)  # every node must agree: not a free port
    assert command[-5:] == ["-m", "qwenvl_cli", "train", "--method", "lora"]


def test_single_node_uses_loopback_and_a_free_port():
    command = launch_command(LaunchPlan(processes=2), [])
    assert _value(command, "--master_addr") == "127.0.0.1" and _value(command, "--nnodes") == "1"
    assert 1 <= int(_value(command, "--master_port")) <= 65535


def test_hostfile_goes_through_the_deepspeed_launcher(tmp_path):
    hosts = tmp_path / "hosts.txt"
    hosts.write_text("# two machines\nworker-1 slots=8\nworker-2 slots=8  # the second\n\n")
    assert read_hostfile(hosts) == [("worker-1", 8), ("worker-2", 8)]
    plan = LaunchPlan(hostfile=hosts, master_addr="worker-1", master_port=29555)
    command = launch_command(plan, ["--engine", "deepspeed"])
    assert command[1:3] == ["-m", "deepspeed.launcher.runner"]
    assert _value(command, "--hostfile") == str(hosts) and _value(command, "--master_port") == "29555"
    # LOCAL_RANK comes in the environment; a --local_rank argument would be an unknown option of qwenvl train
    assert "--no_local_rank" in command
    assert command[command.index("--module") + 1 :] == ["qwenvl_cli", "train", "--engine", "deepspeed"]
    assert "16 processes on 2 host(s)" in plan.describe()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("worker-1 8\n", "line 1 is not `hostname slots=N`"),
        ("worker-1 slots=0\n", "line 1 is not `hostname slots=N` with N ≥ 1"),
        ("# nothing\n\n", "names no machine"),
    ],
)
def test_bad_hostfiles_are_refused_with_the_line(tmp_path, text, message):
    hosts = tmp_path / "hosts"
    hosts.write_text(text)
    with pytest.raises(QwenvlError, match=message):
        read_hostfile(hosts)


def test_a_missing_hostfile_is_named(tmp_path):
    with pytest.raises(QwenvlError, match=r"cannot read the hostfile .*nope"):
        read_hostfile(tmp_path / "nope")


@pytest.mark.parametrize(
    ("plan", "output_given", "message"),
    [
        (LaunchPlan(nnodes=2, node_rank=2, master_addr="a"), True, r"--node-rank 2 is outside 0\.\.1"),
        (LaunchPlan(nnodes=2), True, "--nnodes 2 needs --master-addr"),
        (LaunchPlan(nnodes=2, master_addr="a"), False, "several machines need one run folder"),
        (LaunchPlan(nnodes=2, master_addr="a", hostfile=Path("h")), True, "--hostfile and --nnodes"),
        (LaunchPlan(processes=2, master_port=70000), True, "--master-port 70000 is not a port"),
    ],
)
def test_launch_settings_that_cannot_work_are_refused(plan, output_given, message):
    with pytest.raises(QwenvlError, match=message):
        check_plan(plan, output_given)


def test_launch_flags_are_dropped_from_a_command_line():
    argv = ["--gpus", "4", "--nnodes=2", "--node-rank", "1", "--master-addr", "h", "--master-port=1", "--lr", "1"]
    assert strip_launch_flags(argv) == ["--lr", "1"]


def test_processes_get_every_resolved_option_as_a_flag():
    options = TrainOptions(
        method="full", model=Path("m"), data=Path("d.json"), output=Path("o"), train_vit=True, lr=2e-4, max_steps=5
    )
    known = set(TrainOptions.model_fields) - {"weight_decay"}
    args = train_argv(options.model_copy(update={"weight_decay": 0.5}), known)
    assert args == [
        "--method", "full", "--model", "m", "--data", "d.json", "--output", "o",
        "--max-steps", "5", "--lr", "0.0002", "--train-vit",
    ]  # fmt: skip
    targets = train_argv(TrainOptions(lora_targets=["c_attn", "w1"], gradient_checkpointing=False), known)
    assert targets[targets.index("--lora-targets") + 1] == "c_attn,w1"


def test_dry_run_prints_the_launch_command(tmp_path):
    out = tmp_path / "run"
    args = ["train", "--dry-run", "--nproc", "2", "--nnodes", "2", "--node-rank", "1", "--master-addr", "10.1.2.3"]
    result = CliRunner().invoke(app, [*args, "--output", str(out)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    assert "torch.distributed.run --nnodes 2 --node_rank 1 --nproc_per_node 2 --master_addr 10.1.2.3" in text
    assert f"--output{out}" in "".join(text.split()) and not out.exists()  # long paths wrap anywhere


def test_cli_refuses_several_nodes_without_an_address(tmp_path):
    result = CliRunner().invoke(app, ["train", "--nnodes", "2", "--output", str(tmp_path / "r")])
    assert result.exit_code == 2 and "--nnodes 2 needs --master-addr" in result.output
    assert "Traceback" not in result.output


def test_fsdp_is_refused_without_a_gpu_rather_than_quietly_becoming_ddp(tmp_path):
    with pytest.raises(QwenvlError, match="--engine fsdp needs GPUs") as caught:
        run_training(TrainOptions(method="lora", engine="fsdp", output=tmp_path / "r", max_steps=1))
    assert "--engine deepspeed --zero 3" in caught.value.fix
    planned = run_training(TrainOptions(method="full", engine="fsdp", output=tmp_path / "r", dry_run=True))
    assert planned.engine == "FSDP full shard"


def test_fsdp_settings_are_accepted_by_the_trainer(tmp_path):
    from transformers import TrainingArguments

    settings = fsdp_config(
        TrainOptions(engine="fsdp", gradient_checkpointing=True, offload=True), family_named("qwen-vl")
    )
    arguments = TrainingArguments(output_dir=str(tmp_path), fsdp=True, fsdp_config=settings, use_cpu=True)
    plugin = arguments.fsdp_plugin_args
    assert plugin["fsdp_version"] == 2 and plugin["state_dict_type"] == "FULL_STATE_DICT"
    assert plugin["transformer_cls_names_to_wrap"] == "QwenBlock,VisionBlock"
    assert plugin["activation_checkpointing"] is True and plugin["cpu_offload"] is True


@pytest.mark.slow
def test_two_nodes_meet_at_the_master_and_write_one_run(tmp_path):
    """Two `qwenvl train` commands, one per node (both on this machine, node 0 at 127.0.0.1)."""
    init_model("tiny", tmp_path / "tiny", seed=0)
    port, out = free_port(), tmp_path / "run"
    env = {**os.environ, "QWENVL_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    common = ["--model", str(tmp_path / "tiny"), "--output", str(out), "--max-steps", "2", "--grad-accum", "1"]
    common += ["--lora-r", "4", "--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port", str(port)]
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "qwenvl_cli", "train", *common, "--node-rank", str(rank)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=400) for node in nodes]
    for node, (_, err) in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, err[-3000:]
    assert "on node 1 of 2 with torchrun" in outputs[1][1]
    manifest = json.loads((out / "qwenvl_run.json").read_text())
    assert manifest["processes"] == 2 and manifest["global_step"] == 2
    assert (out / "adapter_model.safetensors").is_file()


def test_no_model_and_no_data_plan_the_built_in_demo(tmp_path, monkeypatch):
    monkeypatch.setenv("QWENVL_CACHE_DIR", str(tmp_path / "cache"))
    result = CliRunner().invoke(app, ["train", "--dry-run", "--lr", "0.001"])
    assert result.exit_code == 0, result.output
    text = "".join(result.stdout.split())
    assert "full(fp32,DDP)" in text  # the demo trains in full
    for flag in ("--max-steps300", "--batch-size8", "--lr0.001", "--eval-samples40", "--eval-data"):
        assert flag in text, flag  # demo settings, except --lr which was given
    assert (tmp_path / "cache" / "data" / "colours-v1" / "eval.json").is_file()
    assert "built-in demo" in result.stderr
