"""`lorafit train CONFIG --nproc N`: the same command again, in N processes under torchrun's launcher.

lorafit starts no processes of its own making: torchrun's elastic launcher (``torch.distributed.run``, called in
this process) starts N copies of ``lorafit train CONFIG ...`` (the launcher flags removed), sets
RANK/WORLD_SIZE/LOCAL_RANK for each, forwards signals to them and stops them all when one fails; accelerate reads
those variables. torchrun, not ``accelerate launch``: ``accelerate launch --cpu --num_processes 2`` has been seen
to start one process (docs/scaling.md).

Before anything starts, N is checked against this machine: the GPUs of a GPU run, the CPU cores, and the memory
each process needs (the planner's peak for one process, plus the ~0.5 GiB a process takes to import torch,
transformers and peft): 64 processes on a 2-core, 23 GiB machine once ran it out of memory and took six other
runs with them. Calling the launcher here rather than exec-ing torchrun lets a failed process end in one clean
line with the process's own exit status (1, 3 diverged, 130/143 stopped), not torch-elastic's traceback.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import typer

from lorafit.errors import LorafitError

# The launcher options of `lorafit train` (cli/training.py), defined here beside what reads them.
# No typer `min`: --nproc 0 is refused by check_launch with exit 1 and the reason, as every other launcher mistake.
NprocOption = typer.Option(None, "--nproc", help="Train in N processes on this node (one per GPU) through "
                           "torchrun; how they share the work: distributed.strategy (docs/scaling.md).")
NnodesOption = typer.Option(1, "--nnodes", min=1, help="With --nproc: number of nodes (run the same command on each).")
NodeRankOption = typer.Option(0, "--node-rank", min=0, help="With --nnodes: this node's index, 0 to nnodes-1.")
MasterAddrOption = typer.Option(None, "--master-addr", help="With --nnodes: node 0's address.")
MasterPortOption = typer.Option(29500, "--master-port", help="With --nnodes: a free port on node 0.")

# Set for the processes `--nproc` starts: the launching process has already printed the first line and run the
# checks that need no weights (cli/training.py), so they do not repeat them.
LAUNCHED = "LORAFIT_LAUNCHED"

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
    if launch.nproc < 1:
        raise LorafitError(f"--nproc {launch.nproc}: the number of processes must be at least 1",
                           fix="--nproc N with N from 1 to the number of GPUs (or CPU cores) of this machine; "
                           "leave it out for one process")
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


@dataclass(frozen=True)
class Machine:
    """What --nproc is checked against: this node's GPUs, CPU cores and available memory."""

    gpus: int
    cores: int
    available_bytes: int | None

    @classmethod
    def here(cls) -> "Machine":
        import torch

        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return cls(torch.cuda.device_count() if torch.cuda.is_available() else 0, cores, _available_memory())


# What one training process holds before its model: the interpreter with torch, transformers, peft and
# accelerate imported (measured ~0.45 GiB RSS on the CPU machine, torch 2.13 / transformers 5.23).
PROCESS_BYTES = 2**29
GIB = 2**30


def _available_memory() -> int | None:
    """MemAvailable (what can be allocated without swapping out others), else free pages; None if unknown."""
    try:
        for line in open("/proc/meminfo", encoding="ascii"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def process_bytes(config) -> int | None:
    """Memory one CPU training process needs: the planner's peak for this config (model.dtype as it resolves on
    the CPU, every micro-batch at max_seq_length: no data is tokenised for it) plus the process itself."""
    from lorafit.model.loading import with_resolved_dtype
    from lorafit.model.memory_plan import plan_config

    t = config.train
    try:
        _, plan = plan_config(with_resolved_dtype(config), nproc=1, lengths=[config.data.max_seq_length] * t.batch_size,
                              device="cpu")
    except LorafitError:
        return None  # an architecture the planner cannot model: the cores are still checked
    return plan.peak + PROCESS_BYTES


def check_machine(nproc: int, machine: Machine, worker_bytes: int | None) -> None:
    """Refuse, with the numbers, an --nproc this machine cannot run: more processes than GPUs (a GPU run), than
    CPU cores, or than its available memory holds."""
    fix = "lower --nproc"
    if machine.gpus and nproc > machine.gpus:
        raise LorafitError(f"--nproc {nproc}: this machine has {machine.gpus} GPU{'s' if machine.gpus > 1 else ''}",
                           why="each process trains on one GPU of its own (CUDA_VISIBLE_DEVICES decides which are seen)",
                           fix=f"{fix} to at most {machine.gpus}, or run on more nodes (--nnodes)")
    if nproc > machine.cores:
        raise LorafitError(f"--nproc {nproc}: this machine has {machine.cores} CPU core{'s' if machine.cores > 1 else ''} "
                           "for this process",
                           why="each process needs a core of its own; more processes than cores only wait for each other",
                           fix=f"{fix} to at most {machine.cores}")
    if machine.gpus or worker_bytes is None or machine.available_bytes is None:
        return
    if nproc * worker_bytes > machine.available_bytes:
        fits = max(machine.available_bytes // worker_bytes, 0)
        raise LorafitError(
            f"--nproc {nproc}: {nproc} processes x {worker_bytes / GIB:.2f} GiB = {nproc * worker_bytes / GIB:.1f} GiB, "
            f"but this machine has {machine.available_bytes / GIB:.1f} GiB of memory available",
            why="each process holds its own model, adapter, optimizer state and activations (the planner's peak, "
            f"`lorafit plan`) plus {PROCESS_BYTES / GIB:.1f} GiB of libraries; past the memory, the kernel kills "
            "processes (others' too)",
            fix=(f"{fix} to at most {fits}" if fits else "train in one process") + ", or lower train.batch_size / "
            "data.max_seq_length",
        )


def relaunch(launch: Launch, argv: list[str], config) -> None:
    """Run the command in ``launch.nproc`` processes under torchrun's launcher, and exit with their outcome (never
    returns): 0, or the first failed process's own exit status; a launcher mistake exits 1 with what/why/fix."""
    check_launch(launch)
    check_machine(launch.nproc, Machine.here(), process_bytes(config))
    raise typer.Exit(run_processes(launch, argv))


def run_processes(launch: Launch, argv: list[str]) -> int:
    """torchrun's launcher in this process: its exit status, with a failure said in one line instead of
    torch-elastic's traceback (the failed process printed its own message above)."""
    import logging

    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    command = launch_command(launch, argv)
    args = parse_args(command[command.index("torch.distributed.run") + 1:])
    # Its own log lines (the rendezvous, OMP_NUM_THREADS, "failed (exitcode: 1) local_rank: 0 ...") would bury the
    # processes' messages; the outcome is said below.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    logging.getLogger("torch.distributed.run").setLevel(logging.CRITICAL)
    os.environ[LAUNCHED] = "1"  # the processes inherit it: this one said its first line and checked the config
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        run(args)
    except ChildFailedError as failed:
        rank, failure = failed.get_first_failure()
        code = failure.exitcode
        if code in (3, 130, 143):  # diverged or stopped: the process said so itself
            return code
        if code > 0:
            typer.secho(f"error: process rank {rank} of {launch.nproc * launch.nnodes} exited with status {code} "
                        "(its message is above); the other processes were stopped", fg=typer.colors.RED, err=True)
            return code
        import signal

        name = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
        typer.secho(f"error: process rank {rank} of {launch.nproc * launch.nnodes} was killed by {name}"
                    + (" (most often the kernel's out-of-memory killer; `dmesg` says)" if name == "SIGKILL" else "")
                    + "; the other processes were stopped", fg=typer.colors.RED, err=True)
        typer.echo("  fix: lower --nproc, train.batch_size or data.max_seq_length (`lorafit plan` shows the memory), "
                   "then resume with --resume auto", err=True)
        return 1
    except SignalException as stopped:  # Ctrl-C or SIGTERM: torchrun passed it on to every process
        return 128 + int(stopped.sigval)
    return 0
