"""Several processes on one machine: `qwenvl train --gpus N` (or `--nproc N` on a CPU) re-launches
itself through torchrun, each process running the same training with DDP (NCCL on GPUs, gloo on CPUs).

The parent resolves everything the processes must agree on (the model folder, the data file, the run
folder) before launching, so that the built-in model is built once and every rank writes to one place.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from ..errors import QwenvlError

# Options that only the parent reads.
LAUNCH_FLAGS = ("--gpus", "--nproc")


def is_launched() -> bool:
    """True inside a process that torchrun started."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) when not launched."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def strip_launch_flags(argv: list[str]) -> list[str]:
    """The command line without --gpus/--nproc (and their values)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in LAUNCH_FLAGS:
            skip = True
            continue
        if arg.startswith(tuple(f"{flag}=" for flag in LAUNCH_FLAGS)):
            continue
        out.append(arg)
    return out


def launch_command(processes: int, train_args: list[str], port: int | None = None) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(processes),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(port or free_port()),
        "-m",
        "qwenvl_cli",
        "train",
        *train_args,
    ]


def relaunch(processes: int, argv: list[str], model: Path, data: Path, output: Path, gpus: bool) -> int:
    """Run the training in `processes` processes; returns torchrun's exit code."""
    if gpus:
        import torch

        available = torch.cuda.device_count()
        if available < processes:
            raise QwenvlError(
                f"--gpus {processes} asks for more GPUs than this machine has ({available})",
                "Lower --gpus, or use --nproc to run CPU processes",
            )
    args = strip_launch_flags(argv)
    for flag, value in (("--model", model), ("--data", data), ("--output", output)):
        if flag not in args and not any(a.startswith(flag + "=") for a in args):
            args += [flag, str(value)]
    command = launch_command(processes, args)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    return subprocess.call(command, env=env)
