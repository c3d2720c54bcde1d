"""`rlhfkit launch`: run a stage in one process per GPU, on one node or several, via DeepSpeed.

    rlhfkit launch --gpus 8 -- ppo --config recipes/qa_feedback/paper/ppo_fine_grained.yaml --deepspeed zero2
    rlhfkit launch --num-nodes 2 --hostfile hosts -- sft --config recipes/qa_feedback/paper/sft.yaml --deepspeed zero2

Everything after `--` is the stage and its options, passed on verbatim: each process runs
`python -m rlhfkit.cli STAGE ARGS...` under the `deepspeed` launcher, which sets RANK,
LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT (see rlhfkit.distributed). With a
hostfile the launcher starts the other nodes over passwordless ssh (pdsh) in the same
working directory, so relative paths in the stage's options must exist on every node.
`--dry-run` prints the command instead of running it.

Checked before anything starts (--dry-run included): with more than one process the stage
needs --deepspeed (in its options or its --config file), since each process would otherwise
train its own copy (the stage refuses that at start-up). Checked before running (not with
--dry-run, which may print a command for other machines): one node needs a GPU per process
(torch.cuda.device_count()); without one, the launcher would start CPU processes.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from rlhfkit.cli import STAGES
from rlhfkit.config import opt
from rlhfkit.console import console
from rlhfkit.errors import RlhfkitError

# A hostfile line as the DeepSpeed launcher reads it: `HOSTNAME slots=GPUS`.
HOSTFILE_LINE = re.compile(r"^(\S+)\s+slots=(\d+)$")
LAUNCHABLE_STAGES = [name for name in STAGES if name != "launch"]


@dataclass
class LaunchConfig:
    stage_args: list[str] = opt(
        [], "After `--`: the stage and its options, e.g. `-- ppo --config recipes/qa_feedback/paper/ppo_fine_grained.yaml`.", argument=True,
        panel="Distributed",
    )
    gpus: int = opt(0, "GPUs (processes) per node; 0 = all the node has.", panel="Distributed")
    num_nodes: int = opt(0, "Use the first N hosts of --hostfile; 0 = all of them (1 node without a hostfile).", panel="Distributed")
    hostfile: str | None = opt(None, "Hostfile for several nodes: one `HOSTNAME slots=GPUS` line per node.", panel="Distributed")
    master_addr: str = opt("", "Address of node 0 for the rendezvous (default: DeepSpeed's choice).", panel="Distributed")
    master_port: int = opt(0, "Port of the rendezvous on node 0 (0 = DeepSpeed's default, 29500).", panel="Distributed")
    include: str = opt("", "Only these hosts/GPUs, DeepSpeed syntax: 'worker-0@worker-1:0,2' or 'localhost:0,1'.", panel="Data")
    exclude: str = opt("", "All hosts/GPUs but these (same syntax as --include).", panel="Data")
    dry_run: bool = opt(False, "Print the deepspeed command (one shell-quoted line) and exit.", panel="Output")

    def validate(self) -> None:
        if not self.stage_args:
            raise RlhfkitError(
                "give the stage to run after `--`, e.g. `rlhfkit launch --gpus 8 -- ppo --config "
                "recipes/qa_feedback/paper/ppo_fine_grained.yaml --deepspeed zero2`; "
                f"stages: {', '.join(LAUNCHABLE_STAGES)}"
            )
        stage = self.stage_args[0]
        if stage not in LAUNCHABLE_STAGES:
            raise RlhfkitError(f"unknown stage '{stage}'; stages: {', '.join(LAUNCHABLE_STAGES)}")
        for name in ("gpus", "num_nodes", "master_port"):
            if getattr(self, name) < 0:
                raise RlhfkitError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.master_port > 65535:
            raise RlhfkitError(f"--master-port must be a port number (1-65535), got {self.master_port}")
        if self.include and self.exclude:
            raise RlhfkitError("give --include or --exclude, not both")
        if (self.include or self.exclude) and (self.gpus or self.num_nodes):
            # The DeepSpeed launcher refuses the combination: the filters already say which GPUs.
            raise RlhfkitError("--include/--exclude choose the GPUs themselves: drop --gpus and --num-nodes")
        if self.hostfile is None:
            if self.num_nodes > 1:
                raise RlhfkitError(
                    f"--num-nodes {self.num_nodes} needs --hostfile (one `HOSTNAME slots=GPUS` line per node)"
                )
        else:
            hosts = read_hostfile(self.hostfile)
            if self.num_nodes > len(hosts):
                raise RlhfkitError(
                    f"--num-nodes {self.num_nodes} but {self.hostfile} lists {len(hosts)} host(s): {', '.join(hosts)}"
                )
        if not (self.gpus == 1 and self.hostfile is None) and not stage_uses_deepspeed(self.stage_args):
            raise RlhfkitError(
                f"`{stage}` runs in several processes here but has no --deepspeed in its options or its --config file, so "
                "each process would train its own copy; add it after the stage, e.g. "
                f"`rlhfkit launch ... -- {stage} ... --deepspeed zero2` (zero1, zero2, zero3 or a DeepSpeed JSON)"
            )


class LaunchFailed(RlhfkitError):
    """The launched processes failed; `rlhfkit launch` exits with the launcher's code."""

    def __init__(self, returncode: int):
        super().__init__(f"the deepspeed launcher exited with code {returncode} (see the processes' output above)")
        self.exit_code = returncode


def read_hostfile(path: str) -> dict[str, int]:
    """Host name → GPU slots, in file order, from an MPI-style hostfile (`#` comments allowed)."""
    if not Path(path).is_file():
        raise RlhfkitError(f"--hostfile {path}: file not found")
    hosts: dict[str, int] = {}
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = HOSTFILE_LINE.match(line)
        if match is None:
            raise RlhfkitError(f"{path}:{number}: expected `HOSTNAME slots=GPUS`, got '{line}'")
        if match[1] in hosts:
            raise RlhfkitError(f"{path}:{number}: host {match[1]} is listed twice")
        hosts[match[1]] = int(match[2])
    if not hosts:
        raise RlhfkitError(f"{path}: no hosts (expected `HOSTNAME slots=GPUS` lines)")
    return hosts


def stage_uses_deepspeed(stage_args: list[str]) -> bool:
    """Whether the stage's options set --deepspeed: on the command line, or in its --config
    file (a YAML/JSON mapping with a `deepspeed` key)."""
    for i, arg in enumerate(stage_args):
        if arg == "--deepspeed" or arg.startswith("--deepspeed="):
            return True
        config = arg.removeprefix("--config=") if arg.startswith("--config=") else (
            stage_args[i + 1] if arg == "--config" and i + 1 < len(stage_args) else None)
        if config is not None and Path(config).is_file():
            try:
                data = yaml.safe_load(Path(config).read_text(encoding="utf-8"))
            except yaml.YAMLError:
                continue  # the stage reports its own config's errors
            if isinstance(data, dict) and data.get("deepspeed"):
                return True
    return False


def check_gpus(cfg: LaunchConfig) -> None:
    """One node: a GPU for every process (the launcher would start CPU processes without)."""
    if cfg.hostfile is not None:
        return
    import torch

    available = torch.cuda.device_count()
    if available == 0:
        raise RlhfkitError(
            "no GPU is visible here (torch.cuda.device_count() is 0): `rlhfkit launch` runs one process per GPU; "
            f"on this machine run the stage itself (`rlhfkit {cfg.stage_args[0]} ...`)"
        )
    if cfg.gpus > available:
        raise RlhfkitError(f"--gpus {cfg.gpus} but this machine has {available} GPU(s)")


def deepspeed_executable() -> str:
    """The `deepspeed` launcher of the Python environment rlhfkit runs in (then the one on PATH)."""
    beside_python = Path(sys.executable).parent / "deepspeed"
    if beside_python.is_file():
        return str(beside_python)
    on_path = shutil.which("deepspeed")
    if on_path is None:
        raise RlhfkitError("the `deepspeed` launcher is not installed here: pip install deepspeed")
    return on_path


def launch_command(cfg: LaunchConfig) -> list[str]:
    """The `deepspeed` command line that runs the configured stage in every process."""
    cmd = [deepspeed_executable()]
    if cfg.num_nodes:
        cmd += ["--num_nodes", str(cfg.num_nodes)]
    if cfg.gpus:
        cmd += ["--num_gpus", str(cfg.gpus)]
    if cfg.hostfile is not None:
        cmd += ["--hostfile", cfg.hostfile]
    if cfg.include:
        cmd += ["--include", cfg.include]
    if cfg.exclude:
        cmd += ["--exclude", cfg.exclude]
    if cfg.master_addr:
        cmd += ["--master_addr", cfg.master_addr]
    if cfg.master_port:
        cmd += ["--master_port", str(cfg.master_port)]
    # --no_local_rank: the launcher would otherwise append `--local_rank=N`, which the
    # stage's command does not take; processes read LOCAL_RANK from the environment.
    return cmd + ["--no_local_rank", "--module", "rlhfkit.cli", *cfg.stage_args]


def run_launch(cfg: LaunchConfig) -> list[str]:
    """Run a stage in one process per GPU (one or more nodes) under the DeepSpeed launcher.

    Put the stage and its options after `--`, for example

    \b
    rlhfkit launch --gpus 8 -- ppo --config recipes/qa_feedback/paper/ppo_fine_grained.yaml --deepspeed zero2
    rlhfkit launch --num-nodes 2 --hostfile hosts -- sft --config recipes/qa_feedback/paper/sft.yaml --deepspeed zero2
    """
    cmd = launch_command(cfg)
    if cfg.dry_run:
        print(shlex.join(cmd))
        return cmd
    check_gpus(cfg)
    console.print(f"launching: {shlex.join(cmd)}", markup=False, highlight=False, soft_wrap=True)
    returncode = subprocess.run(cmd, check=False).returncode
    if returncode != 0:
        raise LaunchFailed(returncode)
    return cmd
