"""`lorafit train CONFIG --nproc N`: the same command again, under torchrun (``python -m torch.distributed.run``).

lorafit starts no processes of its own making: torchrun starts N copies of ``lorafit train CONFIG ...`` (the
launcher flags removed), sets RANK/WORLD_SIZE/LOCAL_RANK for each, forwards signals to them and stops them all
when one fails; transformers' Trainer and accelerate read those variables. torchrun, not ``accelerate launch``:
``accelerate launch --cpu --num_processes 2`` has been seen to start one process (docs/scaling.md).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import typer

from lorafit.errors import LorafitError

# The launcher options of `lorafit train` (cli/training.py), defined here beside what reads them.
NprocOption = typer.Option(None, "--nproc", min=1, help="Train in N processes on this node (one per GPU) through "
                           "torchrun; how they share the work: distributed.strategy (docs/scaling.md).")
NnodesOption = typer.Option(1, "--nnodes", min=1, help="With --nproc: number of nodes (run the same command on each).")
NodeRankOption = typer.Option(0, "--node-rank", min=0, help="With --nnodes: this node's index, 0 to nnodes-1.")
MasterAddrOption = typer.Option(None, "--master-addr", help="With --nnodes: node 0's address.")
MasterPortOption = typer.Option(29500, "--master-port", help="With --nnodes: a free port on node 0.")

# Flags of `lorafit train` that belong to the launcher; the processes it starts get the command without them.
LAUNCH_FLAGS = ("--nproc", "--nnodes", "--node-rank", "--master-addr", "--master-port")


@dataclass(frozen=True)
class Launch:
    nproc: int
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int = 29500


def check_launch(launch: Launch) -> None:
    if os.environ.get("WORLD_SIZE") is not None:
        raise LorafitError(
            "--nproc given to a process that a launcher started already (WORLD_SIZE is set)",
            why="each of the launcher's processes would start its own group of processes",
            fix="drop --nproc when you run lorafit under torchrun or accelerate launch",
        )
    if launch.nnodes > 1 and not launch.master_addr:
        raise LorafitError(
            f"--nnodes {launch.nnodes} needs --master-addr",
            why="the processes of every node meet at the address of node 0",
            fix="pass --master-addr HOST (node 0's address, the same on every node) and --node-rank 0..N-1",
        )
    if not 0 <= launch.node_rank < launch.nnodes:
        raise LorafitError(f"--node-rank {launch.node_rank}: must be between 0 and --nnodes - 1 ({launch.nnodes - 1})")


def strip_launch_flags(argv: list[str]) -> list[str]:
    """``argv`` without the launcher flags and their values (``--nproc 2`` and ``--nproc=2`` forms).

    >>> strip_launch_flags(["train", "c.yaml", "--nproc", "2", "--master-port=1234", "--resume", "auto"])
    ['train', 'c.yaml', '--resume', 'auto']
    """
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in LAUNCH_FLAGS:
            skip = True
            continue
        if arg.split("=", 1)[0] in LAUNCH_FLAGS:
            continue
        kept.append(arg)
    return kept


def launch_command(launch: Launch, argv: list[str]) -> list[str]:
    """The torchrun command line that runs ``lorafit <argv>`` (the launcher flags removed) in every process."""
    run = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(launch.nproc)]
    if launch.nnodes == 1:
        run.append("--standalone")  # a free local port for the rendezvous: two jobs on one machine do not collide
    else:
        run += ["--nnodes", str(launch.nnodes), "--node_rank", str(launch.node_rank),
                "--master_addr", launch.master_addr, "--master_port", str(launch.master_port)]
    return [*run, "-m", "lorafit", *strip_launch_flags(argv)]


def relaunch(launch: Launch, argv: list[str]) -> None:
    """Replace this process with torchrun running the command in ``launch.nproc`` processes (never returns; a
    launcher mistake exits 1 with what/why/fix)."""
    from lorafit.cli.app import _fail

    try:
        check_launch(launch)
    except LorafitError as error:
        _fail(error)
    command = launch_command(launch, argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(command[0], command)  # torchrun's exit status is the command's: 0, or the first failing process's
