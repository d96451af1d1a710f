"""Several processes: `qwenvl train --gpus N` (or `--nproc N` on a CPU) re-launches itself through torchrun,
each process running the same training with DDP/DeepSpeed/FSDP (NCCL on GPUs, gloo on CPUs).

Several machines, two ways:

- torchrun on every node: the same command on each machine with `--nnodes N --node-rank R --master-addr
  <node 0's address> --master-port P` (static rendezvous: node 0 listens on P, the others connect to it);
- the DeepSpeed launcher, started once: `--hostfile FILE` (lines `hostname slots=GPUS`) reaches the other
  machines over ssh (pdsh) and starts `qwenvl train` on each.

The parent resolves everything the processes must agree on (the model folder, the data file, the run
folder) before launching, so that the built-in model is built once and every rank writes to one place.
With several machines the run folder must be on storage they share; global rank 0 writes it.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import QwenvlError

# Options that only the parent reads (with a value each).
LAUNCH_FLAGS = ("--gpus", "--nproc", "--nnodes", "--node-rank", "--master-addr", "--master-port", "--hostfile")
DEFAULT_MASTER_PORT = 29500  # torchrun's default; several nodes must agree on it
_HOST_LINE = re.compile(r"^(?P<host>[A-Za-z0-9_.\-\[\]:]+)\s+slots\s*=\s*(?P<slots>\d+)\s*$")


@dataclass(frozen=True)
class LaunchPlan:
    """How many processes where: `processes` per node on `nnodes` nodes, or the hosts of a hostfile."""

    processes: int = 1
    gpus: bool = False
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None
    hostfile: Path | None = None

    @property
    def needed(self) -> bool:
        """Whether this plan takes a launcher (more than one process, or another machine)."""
        return self.processes > 1 or self.nnodes > 1 or self.hostfile is not None

    def describe(self) -> str:
        if self.hostfile is not None:
            hosts = read_hostfile(self.hostfile)
            slots = sum(n for _, n in hosts)
            return f"{_processes(slots)} on {len(hosts)} host(s) of {self.hostfile} with the DeepSpeed launcher"
        where = "GPUs" if self.gpus else "CPU, gloo"
        if self.nnodes > 1:
            return (
                f"{_processes(self.processes)} on node {self.node_rank} of {self.nnodes} with torchrun ({where}), "
                f"rendezvous at {self.master_addr}:{self.master_port or DEFAULT_MASTER_PORT}"
            )
        return f"{_processes(self.processes)} with torchrun ({where})"


def _processes(n: int) -> str:
    return f"{n} process" if n == 1 else f"{n} processes"


def is_launched() -> bool:
    """True inside a process that torchrun (or the DeepSpeed launcher) started."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) when not launched."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def read_hostfile(path: Path) -> list[tuple[str, int]]:
    """(host, slots) per line of a DeepSpeed hostfile; blank lines and `#` comments are skipped."""
    try:
        text = Path(path).read_text("utf-8")
    except OSError as exc:
        raise QwenvlError(
            f"cannot read the hostfile {path} ({exc.strerror or exc})",
            "Pass a file with one `hostname slots=GPUS` line per machine",
        ) from None
    hosts: list[tuple[str, int]] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = _HOST_LINE.match(line)
        if match is None or int(match["slots"]) < 1:
            raise QwenvlError(
                f"{path} line {number} is not `hostname slots=N` with N ≥ 1: {raw.strip()!r}",
                "Write one machine per line, e.g. `worker-1 slots=8`",
            )
        hosts.append((match["host"], int(match["slots"])))
    if not hosts:
        raise QwenvlError(f"the hostfile {path} names no machine", "Add one `hostname slots=GPUS` line per machine")
    return hosts


def check_plan(plan: LaunchPlan, output_given: bool) -> None:
    """Refuse launch settings that cannot work, before anything is loaded."""
    if plan.hostfile is not None and plan.nnodes > 1:
        raise QwenvlError(
            "--hostfile and --nnodes are two ways to reach several machines, and both were given",
            "Use --hostfile (the DeepSpeed launcher starts every node), or --nnodes/--node-rank on each node",
        )
    if plan.hostfile is not None:
        read_hostfile(plan.hostfile)
    if not 0 <= plan.node_rank < plan.nnodes:
        raise QwenvlError(
            f"--node-rank {plan.node_rank} is outside 0..{plan.nnodes - 1} for --nnodes {plan.nnodes}",
            "Number the machines 0, 1, … --nnodes − 1; node 0 is the one at --master-addr",
        )
    if plan.nnodes > 1 and not plan.master_addr:
        raise QwenvlError(
            f"--nnodes {plan.nnodes} needs --master-addr",
            "Give every node the address of node 0 (e.g. --master-addr 10.0.0.1), and the same --master-port",
        )
    if (plan.nnodes > 1 or plan.hostfile is not None) and not output_given:
        raise QwenvlError(
            "several machines need one run folder, and no --output was given",
            "Pass --output on storage every machine shares (the default name has the start time in it)",
        )
    if plan.master_port is not None and not 1 <= plan.master_port <= 65535:
        raise QwenvlError(f"--master-port {plan.master_port} is not a port number", "Pick a port in 1..65535")


def strip_launch_flags(argv: list[str]) -> list[str]:
    """The command line without the launch options (and their values)."""
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


def launch_command(plan: LaunchPlan, train_args: list[str]) -> list[str]:
    """The launcher's command line that runs `qwenvl train <train_args>` as `plan` says."""
    if plan.hostfile is not None:
        command = [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(plan.hostfile)]
        if plan.master_addr:
            command += ["--master_addr", plan.master_addr]
        command += ["--master_port", str(plan.master_port or DEFAULT_MASTER_PORT)]
        # LOCAL_RANK arrives in the environment; `--local_rank=N` would be an unknown option of `qwenvl train`
        return [*command, "--no_local_rank", "--module", "qwenvl_cli", "train", *train_args]
    several = plan.nnodes > 1
    port = plan.master_port or (DEFAULT_MASTER_PORT if several else free_port())
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        str(plan.nnodes),
        "--node_rank",
        str(plan.node_rank),
        "--nproc_per_node",
        str(plan.processes),
        "--master_addr",
        plan.master_addr or "127.0.0.1",
        "--master_port",
        str(port),
        "-m",
        "qwenvl_cli",
        "train",
        *train_args,
    ]


def train_argv(options, known: set[str] | frozenset[str]) -> list[str]:
    """`qwenvl train`'s flags for resolved TrainOptions: the model, data and run folder always, every other
    option where it differs from the default (flags of `known` option names only; never --dry-run). What
    the launched processes get, and what --dry-run shows: the values a YAML --config set are spelled out."""
    from .options import TrainOptions

    defaults = TrainOptions()
    args: list[str] = []
    for name in TrainOptions.model_fields:
        value = getattr(options, name)
        if name == "dry_run" or name not in known or value is None:
            continue
        if value == getattr(defaults, name) and name not in ("model", "data", "output"):
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else f"--no-{flag[2:]}")
            continue
        args += [flag, ",".join(value) if isinstance(value, list) else str(value)]
    return args


def shown(command: list[str]) -> str:
    """A command as one could paste it into a shell."""
    return shlex.join(command)


def relaunch(plan: LaunchPlan, args: list[str]) -> int:
    """Run `qwenvl train <args>` as `plan` says (in one process too: FSDP needs a process group); returns
    the launcher's exit code."""
    if plan.gpus and plan.hostfile is None:
        import torch

        available = torch.cuda.device_count()
        if available < plan.processes:
            raise QwenvlError(
                f"--gpus {plan.processes} asks for more GPUs than this machine has ({available})",
                "Lower --gpus, or use --nproc to run CPU processes",
            )
    command = launch_command(plan, args)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(plan.processes, 1))))
    try:
        return subprocess.call(command, env=env)
    except KeyboardInterrupt:
        return 130


def plan_run(options, given: set[str], plan: LaunchPlan):
    """Settle a `qwenvl train` call before anything runs: the built-in demo's settings when neither --model nor
    --data was given (under the options in `given`), the plan checked and the defaults (model, data, run
    folder) resolved once, so that the plan, the launched processes and the run agree. Returns (options,
    what to announce about the built-in demo or None); inside launched processes the options arrive resolved already."""
    from .defaults import demo_options, resolve_defaults

    announcement = None
    if options.model is None and options.data is None:
        options = demo_options(options, given)
        announcement = (
            f"{options.method} fine-tuning of the tiny model on synthetic colour questions "
            f"({options.data}), {options.max_steps} steps of {options.batch_size}, held-out pictures asked every "
            f"{options.eval_every} steps. Pass --model and --data to train your own."
        )
    if is_launched():
        return options, None
    check_plan(plan, output_given=options.output is not None)
    return resolve_defaults(options), announcement


def process_group_plan(options, plan: LaunchPlan) -> LaunchPlan | None:
    """The plan to relaunch with, or None to train in this process: a plan of several processes, and FSDP on
    one GPU (FSDP runs in a process group, even of one)."""
    if is_launched():
        return None
    if plan.needed:
        return plan
    if options.engine == "fsdp":
        import torch

        if torch.cuda.is_available():
            return replace(plan, gpus=True)
    return None


def planned_command(plan: LaunchPlan, options, known: set[str]) -> str:
    """What `qwenvl train` will run: itself, or the launcher that starts it in every process."""
    args = train_argv(options, known)
    return shown(launch_command(plan, args) if plan.needed else ["qwenvl", "train", *args])
