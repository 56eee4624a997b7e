"""One run at a time per run folder: an OS file lock on ``<output_dir>/.lorafit-run.lock``.

Two runs writing into one folder interleave their metrics (every step twice in metrics_history.jsonl), race on
checkpoints and fail at publish with the wrong advice. ``fcntl.flock`` is the lock: the kernel drops it when the
holder's last file descriptor closes, so a run that is SIGKILLed, runs out of memory or loses its machine never
leaves a stale lock behind (a lock *file* alone would). The file also records who holds it (pid, host, start
time, command line), for the message the second run prints.

Bottom layer: imports only ``lorafit.errors``. POSIX only (fcntl); elsewhere there is no lock and no refusal.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import sys
import time
from pathlib import Path

from lorafit.errors import LorafitError

try:
    import fcntl
except ImportError:  # Windows: no flock; a run there is not protected against a second one
    fcntl = None

LOCK_FILE = ".lorafit-run.lock"


class RunLock:
    """An exclusive, non-blocking lock on a run folder, held until ``release()`` or the end of the process."""

    def __init__(self, folder: Path, fd: int | None):
        self.folder, self._fd = Path(folder), fd

    @classmethod
    def acquire(cls, folder: Path, command: str | None = None) -> "RunLock":
        """Take the folder's lock, or raise LorafitError naming the run that holds it. ``folder`` must exist."""
        path = Path(folder) / LOCK_FILE
        if fcntl is None:
            return cls(folder, None)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # not inherited by programs this process starts
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise held_error(Path(folder), read_holder(path)) from None
            except BaseException:
                os.close(fd)
                raise
            if _same_file(fd, path):
                break
            os.close(fd)  # the holder removed this file as it released it: lock the one at the path now
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "command": command or _this_command()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode("utf-8"), 0)
        return cls(folder, fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Give the folder back and remove the lock file. It is removed while still locked, and ``acquire``
        checks that the file it locked is still the one at the path, so a run that opened the old file just before
        cannot hold it beside a run that locks the new one."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                if _same_file(fd, self.folder / LOCK_FILE):
                    (self.folder / LOCK_FILE).unlink()
            finally:
                os.close(fd)  # drops the lock

    def __del__(self):  # a lock nobody refers to any more is given back, as a file object closes
        try:
            self.release()
        except Exception:  # noqa: BLE001  at interpreter exit: the kernel drops the lock with the process anyway
            pass


def check_free(folder: Path) -> None:
    """Raise LorafitError if a live run holds ``folder``'s lock; take nothing and create nothing. For the first
    second of `lorafit train`, before the minutes of imports that come before the run itself locks the folder."""
    path = Path(folder) / LOCK_FILE
    if fcntl is None or not path.is_file():
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # unreadable: the run's own acquire() will answer
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise held_error(Path(folder), read_holder(path)) from None
    finally:
        os.close(fd)  # closing drops the shared lock if it was taken


def read_holder(path: Path) -> dict:
    """What the holder wrote into the lock file; {} if it has not written it yet (it writes just after locking)."""
    try:
        holder = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def held_error(folder: Path, holder: dict) -> LorafitError:
    who = (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}: "
           f"{holder.get('command', '?')}") if holder else "a process that has not said who it is yet"
    pid = holder.get("pid")
    return LorafitError(
        f"{folder}: another lorafit run is writing into this folder ({who})",
        why="two runs in one folder would interleave their metrics and checkpoints and replace each other's artifact",
        fix=("wait for it to finish" + (f" or stop it (kill {pid})" if pid else "")
             + ", or train into another folder with --set train.output_dir=runs/NAME"),
    )


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _this_command() -> str:
    argv = list(sys.argv)
    if argv and Path(argv[0]).name in ("__main__.py", "lorafit"):
        argv[0] = "lorafit"
    return shlex.join(argv) if argv else sys.executable
