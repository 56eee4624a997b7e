"""The run folder: claiming it, and writing files into it so a crash never leaves a half-written one."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from lorafit.errors import LorafitError

# Written last by a finished run: its presence means every other output is complete.
DONE_MARKER = "training_summary.json"


def claim_run_dir(output_dir: str, *, overwrite: bool) -> Path:
    """Resolve and create the run folder; refuse to silently replace a finished run."""
    path = Path(output_dir).expanduser()
    if path.is_symlink():
        raise LorafitError(
            f"{output_dir}: the output folder is a symbolic link",
            why="outputs must stay inside the folder you named, not wherever a link points",
            fix="use a real folder",
        )
    path = path.resolve()
    if path.exists() and not path.is_dir():
        raise LorafitError(f"{path}: exists and is not a folder", fix="choose another train.output_dir")
    if (path / DONE_MARKER).exists() and not overwrite:
        raise LorafitError(
            f"{path}: holds a finished run already",
            why="a new run would replace its adapter and metrics",
            fix="pass --overwrite, or choose another folder with --set train.output_dir=runs/NAME",
        )
    path.mkdir(parents=True, exist_ok=True)
    if overwrite:
        (path / DONE_MARKER).unlink(missing_ok=True)  # from here on, the folder no longer claims to be complete
    return path


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


def write_durable(path: Path, data: bytes) -> None:
    """Write a new file and fsync it (no rename: for files inside a staging folder that is renamed as a whole)."""
    with open(path, "xb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write to a temporary file beside ``path``, fsync, then rename over it."""
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_json(path: Path, value) -> None:
    write_atomic(path, json.dumps(value, indent=2, sort_keys=False) + "\n")
