"""The run folder: every file name in it, claiming it, and the only code that writes run files into it.

Bottom layer: imports only ``lorafit.errors``, ``lorafit.processes`` and ``lorafit.run_lock``. Every write is crash-safe: a temporary file beside the target,
fsynced, renamed over it (``write_atomic``), so a crash never leaves a half-written file; files get the normal
permissions (``0o666 & ~umask``), not tempfile's private 0600.

Only the main process writes (``RunFolder.main_process``): under a multi-process launcher every process runs the
same recipe, and the others must not race it on the same files. Checkpoints (training/checkpoint.py) are written
by the main process too, with ``write_durable``/``write_atomic`` from here.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
import re
import shutil
import tempfile
from pathlib import Path

from lorafit.errors import LorafitError
from lorafit.processes import is_main_process
from lorafit.run_lock import LOCK_FILE, RunLock


class RunFolder:
    """``<train.output_dir>``: the names of everything a run writes there, and the writer of its files."""

    HISTORY = "metrics_history.jsonl"
    DATA_REPORT = "data_report.json"
    SKIPPED_ROWS = "skipped_rows.jsonl"
    RESULTS = "training_results.json"
    HARNESS = "harness_results.json"  # `lorafit eval --harness` on this run (evaluate/harness.py)
    REPORT = "report.html"
    SAMPLES = "completion_samples.jsonl"  # GRPO: answers sampled at logged steps, with their rewards
    SUMMARY = "training_summary.json"  # written last by a finished run: its presence means every output is complete
    RESULT = "result.json"
    CHECKPOINTS = "checkpoints"
    TENSORBOARD = "tensorboard"
    MERGED = "merged"
    ARTIFACT = "final_artifact"
    # What a tracker writes into the run folder when it runs offline (training/tracking.py).
    TRACKERS = ("mlruns", "wandb")

    def __init__(self, path: Path, *, main_process: bool | None = None):
        self.path = Path(path)
        self.lock: RunLock | None = None  # taken by claim() on the main process, given back by release()
        # The launcher's RANK until the training loop sets the flag from accelerate (lorafit/processes.py).
        self.main_process = is_main_process() if main_process is None else main_process

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __str__(self) -> str:
        return str(self.path)

    @property
    def checkpoints(self) -> Path:
        return self.path / self.CHECKPOINTS

    @property
    def history(self) -> Path:
        return self.path / self.HISTORY

    def artifact_dir(self, name: str, version: str) -> Path:
        return self.path / f"{name}-v{version}" / self.ARTIFACT

    def is_finished(self) -> bool:
        return (self.path / self.SUMMARY).exists()

    # -- writing (main process only)
    def write_json(self, name: str, value) -> Path:
        return self.write_text(name, json.dumps(value, indent=2, sort_keys=False) + "\n")

    def write_text(self, name: str, text: str) -> Path:
        path = self.path / name
        if self.main_process:
            write_atomic(path, text)
        return path

    def write_lines(self, name: str, records: list[dict]) -> Path:
        """A JSON-lines file holding exactly ``records`` (replaces what was there)."""
        return self.write_text(name, "".join(json.dumps(r) + "\n" for r in records))

    def append_line(self, name: str, record: dict) -> None:
        """One JSON line at the end of ``name``. Appends are not atomic; the history a checkpoint carries is
        what a resume restores (``write_lines``), so a torn last line never outlives the next resume."""
        if self.main_process:
            with (self.path / name).open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")

    def remove(self, name: str) -> None:
        if self.main_process:
            (self.path / name).unlink(missing_ok=True)

    # -- claiming
    @classmethod
    def claim(cls, output_dir: str, *, overwrite: bool, notes: list[str] | None = None) -> "RunFolder":
        """Resolve, create and lock the run folder (run_lock.py: a second run into it is refused, naming the
        first; ``release()`` gives it back). Refuses to silently replace a finished run, or to write into a folder
        of other files; ``notes`` receives a warning when the folder lies outside the working directory."""
        given = Path(output_dir).expanduser()
        if given.is_symlink():
            raise LorafitError(
                f"{output_dir}: the output folder is a symbolic link",
                why="outputs must stay inside the folder you named, not wherever a link points",
                fix="use a real folder",
            )
        path = given.resolve()
        if path.exists() and not path.is_dir():
            raise LorafitError(f"{path}: exists and is not a folder", fix="choose another train.output_dir")
        run = cls(path)
        foreign = run.foreign_entries()
        if foreign and not overwrite:
            raise LorafitError(
                f"{path}: is not empty and holds no lorafit run ({', '.join(foreign[:5])}"
                + (", ..." if len(foreign) > 5 else "") + ")",
                why="a run writes checkpoints, reports and artifacts here, beside files it does not know",
                fix="choose an empty or new folder (--set train.output_dir=runs/NAME), or pass --overwrite to "
                "write into it anyway (its files are left alone)",
            )
        if run.main_process:
            path.mkdir(parents=True, exist_ok=True)
            run.lock = RunLock.acquire(path)  # before the finished-run check: a run finishing now is seen finished
        try:
            if run.is_finished() and not overwrite:
                raise LorafitError(
                    f"{path}: holds a finished run already",
                    why="a new run would replace its adapter and metrics",
                    fix="pass --overwrite, or choose another folder with --set train.output_dir=runs/NAME",
                )
        except BaseException:
            run.release()
            raise
        escaped = _outside_working_dir(Path(output_dir), path)
        if escaped and notes is not None:
            notes.append(f"train.output_dir {output_dir!r} resolves to {path}, outside the working directory")
        if run.main_process and overwrite:
            run.remove(cls.SUMMARY)  # from here on, the folder no longer claims to be complete
        return run

    def release(self) -> None:
        """Give the run folder's lock back (the end of the process does too, however it ends)."""
        if self.lock is not None:
            lock, self.lock = self.lock, None
            lock.release()

    def foreign_entries(self) -> list[str]:
        """Entries of a non-empty folder that holds nothing lorafit writes; empty for a run folder or a new one."""
        if not self.path.is_dir():
            return []
        entries = sorted(p.name for p in self.path.iterdir())
        known = {self.HISTORY, self.DATA_REPORT, self.SKIPPED_ROWS, self.RESULTS, self.REPORT, self.SUMMARY,
                 self.SAMPLES, self.RESULT, self.CHECKPOINTS, self.TENSORBOARD, self.MERGED, LOCK_FILE, *self.TRACKERS}
        if any(name in known or _ARTIFACT_FOLDER.match(name) for name in entries):
            return []
        return entries


# <artifact.name>-v<artifact.version>: a published (or half-published) artifact's version folder.
_ARTIFACT_FOLDER = re.compile(r"^.+-v\d[^/]*$")


def _outside_working_dir(given: Path, resolved: Path) -> bool:
    """A relative output_dir that climbs out of the working directory (``runs/../../elsewhere``); an absolute path
    is where the user said, so it is not flagged."""
    return not given.is_absolute() and not resolved.is_relative_to(Path.cwd().resolve())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def public_mode(path: Path) -> None:
    """Give a file (0o666) or folder (0o777) made by tempfile the permissions a plain ``open``/``mkdir`` would
    have given it: tempfile makes them private (0600/0700), which hides a published artifact from its group."""
    path = Path(path)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~_umask())


def public_tree(folder: Path) -> None:
    """``public_mode`` for a folder and everything below it (safetensors, like tempfile, writes files 0600)."""
    folder = Path(folder)
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            public_mode(path)


def fsync_dir(folder: Path) -> None:
    """Make a folder's entries (new names, renames) durable; a file's fsync does not cover its name."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path, *, files: bool = True) -> None:
    """fsync every file below ``folder`` (unless files=False) and every folder, so a rename publishes data on disk."""
    folder = Path(folder)
    if files:
        for path in folder.rglob("*"):
            if path.is_file():
                with path.open("rb") as handle:
                    os.fsync(handle.fileno())
    for path in [*(p for p in folder.rglob("*") if p.is_dir()), folder]:
        fsync_dir(path)


def publish_folder(staging: Path, target: Path, *, replace: bool = False) -> None:
    """The one way a folder built in ``staging`` appears at ``target``: every file and folder fsynced, one rename,
    the parent fsynced, so after a crash ``target`` is whole (old or new), never a mix. An existing ``target`` must
    be empty, or (``replace``) is moved aside first and deleted only once the new one is in place."""
    target = Path(target)
    fsync_tree(staging)
    aside = None
    if replace and target.exists():
        aside = Path(tempfile.mkdtemp(prefix=f".{target.name}-replaced-", dir=target.parent))
        os.rename(target, aside / target.name)
    os.replace(staging, target)  # onto an empty folder it succeeds; onto a non-empty one it raises OSError
    fsync_dir(target.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def write_durable(path: Path, data: bytes) -> None:
    """Write a new file and fsync it (no rename: for files inside a staging folder that is renamed as a whole)."""
    with open(path, "xb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


@contextmanager
def atomic_path(path: Path):
    """The one atomic file writer: yields a temporary path beside ``path`` for the caller (or a library) to write;
    when the block ends, the file gets normal permissions, is fsynced, renamed over ``path`` and the folder fsynced
    (so the new name is durable too). If the block raises, the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as handle:
            os.fchmod(handle.fileno(), 0o666 & ~_umask())
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write ``data`` to ``path`` through ``atomic_path``: all of it or, after a crash, the old file."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)


def write_json(path: Path, value) -> None:
    """For files outside a run folder's own (inside an artifact being staged); run files go through RunFolder."""
    write_atomic(path, json.dumps(value, indent=2, sort_keys=False) + "\n")
