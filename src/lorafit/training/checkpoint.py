"""Crash-safe checkpoints on disk: the format, the atomic commit, verification, rotation and the resume checks.

A checkpoint is a folder ``<run>/checkpoints/step-NNNNNNNN/``:

    adapter_model.safetensors  adapter_config.json   the adapter at that step (a loadable peft adapter folder)
    training_state.safetensors training_state.json   optimizer, scheduler, scaler, the loop's position and
                                                     counters, guard, best step, objective, and each process's
                                                     RNG and log window: tensors in safetensors, everything else
                                                     in JSON (no pickle)
    metrics_history.jsonl                            the run's metrics up to that step
    checkpoint.json                                  data position, config + resume_config_sha256,
                                                     fingerprints, versions
    manifest.json                                    sha256 and size of every other file, written last

It is written into ``.tmp-step-NNNNNNNN-<pid>/``, every file and the folder fsynced, the manifest last, then renamed
into place, the parent fsynced and the ``latest`` pointer replaced atomically; old checkpoints are deleted only
after that. A folder whose manifest is missing or does not match its files is never resumed from.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path

import torch

from lorafit.errors import LorafitError
from lorafit.hashing import sha256_bytes, sha256_json, token_sequences_digest
from lorafit.run_folder import RunFolder, fsync_dir, write_atomic, write_durable

CHECKPOINTS = RunFolder.CHECKPOINTS
MANIFEST = "manifest.json"
LATEST = "latest"
BEST = "best"
META = "checkpoint.json"
ADAPTER = "adapter_model.safetensors"
STATE_TENSORS = "training_state.safetensors"
STATE_JSON = "training_state.json"
HISTORY = RunFolder.HISTORY
REQUIRED = (ADAPTER, STATE_TENSORS, STATE_JSON, META)
# 2: lorafit's own loop (training/loop.py). 1 was written inside transformers' Trainer (with trainer_state.json):
# its loop counters and sampler state mean nothing to this loop, so it is refused with the reason (require_format).
FORMAT_VERSION = 2

_NAME = re.compile(r"^step-(\d{8})$")


# Every filesystem operation of a save goes through these names, so a test can make each one fail in turn.
_mkdir = Path.mkdir
_rename = os.replace


class CheckpointWriteError(LorafitError):
    """A checkpoint could not be written (a full disk, usually); the previous one is untouched."""


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


# ---------------------------------------------------------------------------------------------- state trees
# Optimizer, scheduler, scaler and RNG states are nested dicts/lists/tuples of tensors and scalars. They are split
# into a JSON tree (tensors replaced by references) and a flat dict of tensors, so nothing needs pickle.


def flatten_state(tree, prefix: str, tensors: dict[str, torch.Tensor]):
    """Return a JSON-able copy of ``tree`` with each tensor moved into ``tensors`` under a dotted key."""
    import numpy as np

    if isinstance(tree, torch.Tensor):
        tensors[prefix] = tree.detach().cpu().contiguous().clone()
        return {"__tensor__": prefix}
    if isinstance(tree, np.ndarray):
        # numpy's RNG key is uint32, which safetensors' torch side does not round-trip: store as int64
        stored = tree.astype(np.int64) if tree.dtype.kind in "ui" else tree.copy()
        tensors[prefix] = torch.from_numpy(stored)
        return {"__ndarray__": prefix, "dtype": str(tree.dtype)}
    if isinstance(tree, (np.integer, np.floating)):
        return tree.item()
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return tree
    if isinstance(tree, tuple):
        return {"__tuple__": [flatten_state(v, f"{prefix}.{i}", tensors) for i, v in enumerate(tree)]}
    if isinstance(tree, list):
        return [flatten_state(v, f"{prefix}.{i}", tensors) for i, v in enumerate(tree)]
    if isinstance(tree, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in tree):
            return {k: flatten_state(v, f"{prefix}.{k}", tensors) for k, v in tree.items()}
        # int keys (optimizer state is keyed by parameter index) would come back as strings from JSON
        return {"__items__": [[k, flatten_state(v, f"{prefix}.{k}", tensors)] for k, v in tree.items()]}
    raise TypeError(f"{prefix}: cannot store a {type(tree).__name__} without pickle")


def unflatten_state(tree, tensors: dict[str, torch.Tensor]):
    if isinstance(tree, list):
        return [unflatten_state(v, tensors) for v in tree]
    if isinstance(tree, dict):
        if "__tensor__" in tree:
            return tensors[tree["__tensor__"]]
        if "__ndarray__" in tree:
            return tensors[tree["__ndarray__"]].numpy().astype(tree["dtype"])
        if "__tuple__" in tree:
            return tuple(unflatten_state(v, tensors) for v in tree["__tuple__"])
        if "__items__" in tree:
            return {k: unflatten_state(v, tensors) for k, v in tree["__items__"]}
        return {k: unflatten_state(v, tensors) for k, v in tree.items()}
    return tree


# ---------------------------------------------------------------------------------------------- commit


def commit_checkpoint(root: Path, step: int, files: dict[str, bytes], *, keep_last: int, keep_best: int = 0,
                      best_mode: str = "min") -> Path:
    """Write ``files`` as checkpoint ``step`` under ``root`` so that a crash at any moment leaves either the
    complete new checkpoint or none of it; then point ``latest`` at it and delete what rotation drops."""
    name = checkpoint_name(step)
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".tmp-{name}-{os.getpid()}"
    final = root / name
    try:
        shutil.rmtree(staging, ignore_errors=True)
        _mkdir(staging)
        manifest = {"format": FORMAT_VERSION, "files": {}}
        for file_name in sorted(files):
            data = files[file_name]
            write_durable(staging / file_name, data)
            manifest["files"][file_name] = {"sha256": sha256_bytes(data), "bytes": len(data)}
        write_durable(staging / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
        fsync_dir(staging)
        if final.exists():  # the same step saved again (a forced resume from an older checkpoint)
            _discard(final, root)
        _rename(staging, final)
        fsync_dir(root)
        write_atomic(root / LATEST, name + "\n")
        rotate(root, keep_last=keep_last, keep_best=keep_best, best_mode=best_mode, protect=final)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        newest = newest_verified(root)
        full = error.errno in (errno.ENOSPC, errno.EDQUOT)
        raise CheckpointWriteError(
            f"could not write checkpoint {name} in {root}: {error.strerror or error}",
            why=("the disk is full; " if full else "")
            + (f"the newest verified checkpoint, {newest.name}, is intact" if newest else "no earlier checkpoint exists"),
            fix=("free disk space" if full else "fix the problem above") + ", then run the same command with --resume auto",
        ) from error
    return final


def _discard(folder: Path, root: Path) -> None:
    """Invalidate first (manifest gone), then delete: a deletion cut short never looks like a valid checkpoint."""
    (folder / MANIFEST).unlink(missing_ok=True)
    fsync_dir(folder)
    shutil.rmtree(folder)
    fsync_dir(root)


# ---------------------------------------------------------------------------------------------- reading


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every checkpoint-named folder, oldest first; verified or not."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return sorted(found)


def checkpoint_problems(folder: Path) -> list[str]:
    """Problems that make ``folder`` unusable as a checkpoint; empty when every file matches its manifest."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        listed = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return [f"{folder / MANIFEST}: missing or unreadable (the save did not finish)"]
    problems = [f"{name}: missing from the manifest" for name in REQUIRED if name not in listed]
    for name, entry in listed.items():
        path = folder / name
        try:
            data = path.read_bytes()
        except OSError:
            problems.append(f"{name}: missing")
            continue
        if len(data) != entry["bytes"] or sha256_bytes(data) != entry["sha256"]:
            problems.append(f"{name}: content does not match its sha256 in the manifest")
    return problems


def newest_verified(root: Path) -> Path | None:
    for _, folder in reversed(list_checkpoints(root)):
        if not checkpoint_problems(folder):
            return folder
    return None


def read_meta(folder: Path) -> dict:
    return json.loads((folder / META).read_text(encoding="utf-8"))


def clean_staging(root: Path) -> list[str]:
    """Remove the staging folders of saves that were cut short (by a kill or a full disk)."""
    removed = []
    if root.is_dir():
        for item in root.iterdir():
            if item.name.startswith(".tmp-step-") and item.is_dir():
                shutil.rmtree(item, ignore_errors=True)
                removed.append(item.name)
    return removed


# ---------------------------------------------------------------------------------------------- rotation


def rotate(root: Path, *, keep_last: int, keep_best: int, best_mode: str, protect: Path) -> list[str]:
    """Delete verified checkpoints beyond the newest ``keep_last`` and the ``keep_best`` best ones."""
    verified = [(step, folder) for step, folder in list_checkpoints(root) if not checkpoint_problems(folder)]
    keep = {folder for _, folder in verified[-keep_last:]} | {protect}
    scored = []
    for step, folder in verified:
        score = read_meta(folder).get("best_metric_value")
        if score is not None:
            scored.append((score if best_mode == "min" else -score, step, folder))
    best = [folder for _, _, folder in sorted(scored)[:keep_best]]
    keep |= set(best)
    if best:
        write_atomic(root / BEST, best[0].name + "\n")
    removed = []
    for _, folder in verified:
        if folder not in keep:
            _discard(folder, root)
            removed.append(folder.name)
    return removed


# ---------------------------------------------------------------------------------------------- resume checks

# Keys that may differ between the run that wrote a checkpoint and the run that resumes it: they do not change
# what is trained (where the run folder is, which trackers see it, how the result is named).
# Where the data and the base model live is not compared either: their content is, by fingerprint (a moved file
# with the same bytes resumes; a changed tokenizer or template changes the tokenised-data fingerprint).
RESUME_IGNORED = ("train.output_dir", "tracking.report_to", "artifact.name", "artifact.version", "artifact.license",
                  "data.train", "data.eval", "model.path")


def _flat(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def resume_differences(saved: dict, current: dict) -> list[str]:
    """Human-readable list of what changed between a checkpoint's run and this one: config, data, base model."""
    lines = []
    old, new = _flat(saved["config"]), _flat(current["config"])
    for key in sorted(set(old) | set(new)):
        if key in RESUME_IGNORED or old.get(key) == new.get(key):
            continue
        lines.append(f"config {key}: {old.get(key, '(absent)')!r} -> {new.get(key, '(absent)')!r}")
    for kind in ("data", "base_model"):
        before, after = saved["fingerprints"][kind], current["fingerprints"][kind]
        if isinstance(before, dict):
            for key in sorted(set(before) | set(after)):
                if before.get(key) != after.get(key):
                    lines.append(f"{kind} {key}: {str(before.get(key, '(absent)'))[:16]} -> {str(after.get(key, '(absent)'))[:16]}")
        elif before != after:
            lines.append(f"{kind}: {before[:16]} -> {after[:16]}")
    return lines


def config_hash(config_dict: dict) -> str:
    trimmed = {k: v for k, v in _flat(config_dict).items() if k not in RESUME_IGNORED}
    return sha256_json(trimmed)


def dataset_fingerprint(dataset) -> str:
    """sha256 of the tokenised examples in order: changes with the data files, the tokenizer or the template."""
    # Triplet examples hold more than one row (training/objectives.py): every sequence they hold counts.
    return token_sequences_digest(seq for example in dataset.examples
                                  for seq in (example.token_sequences if hasattr(example, "token_sequences")
                                              else (example.input_ids, example.labels)))


def find_resume_point(root: Path, resume: str | None, *, overwrite: bool) -> Path | None:
    """Which checkpoint a run starts from: None (fresh) or a verified folder. Cleans up cut-short saves first.

    ``resume`` is None (start fresh: refused when checkpoints exist, unless ``overwrite`` deletes them), "auto"
    (the newest verified checkpoint, or fresh when there is none) or a checkpoint folder.
    """
    clean_staging(root)
    if overwrite and resume is None:
        if root.exists():
            shutil.rmtree(root)
        return None
    if resume is None:
        if list_checkpoints(root):
            newest = newest_verified(root)
            raise LorafitError(
                f"{root.parent}: holds checkpoints of an unfinished run"
                + (f" (newest verified: {newest.name})" if newest else ""),
                why="starting fresh here would mix two runs' checkpoints",
                fix="pass --resume auto to continue it, or --overwrite to delete it and start again",
            )
        return None
    if resume == "auto":
        folder = newest_verified(root)
        skipped = [p.name for s, p in list_checkpoints(root) if folder is None or s > int(folder.name[5:])]
        if skipped:
            import warnings

            warnings.warn(f"ignoring checkpoints that do not verify: {', '.join(skipped)}", stacklevel=2)
        return folder
    folder = Path(resume).expanduser().resolve()
    problems = checkpoint_problems(folder) if folder.is_dir() else [f"{folder}: no such folder"]
    if problems:
        raise LorafitError(
            f"--resume {resume}: not a complete checkpoint",
            details=problems,
            why="a checkpoint without a valid manifest may be half-written; lorafit never resumes from one",
            fix=f"use --resume auto to take the newest verified checkpoint in {root}",
        )
    return folder


def require_format(folder: Path) -> None:
    """Refuse a checkpoint of another format before anything is loaded, naming what to do instead."""
    found = read_meta(folder).get("format")
    if found != FORMAT_VERSION:
        raise LorafitError(
            f"cannot resume from {folder}: it is a format-{found} checkpoint, this lorafit reads format {FORMAT_VERSION}",
            why="format-1 checkpoints were written inside transformers' Trainer (trainer_state.json); lorafit now runs "
            "its own training loop, whose position and counters they do not hold, so a resume would not be exact",
            fix="finish that run with the lorafit version that started it, or start a new run (--overwrite, or another "
            "train.output_dir); its adapter_model.safetensors is a complete peft adapter you can load meanwhile",
        )


def check_resume(folder: Path, identity: dict, *, force: bool) -> list[str]:
    """Refuse to resume a checkpoint written by a different config, data or base model unless ``force``.
    Returns the differences (recorded in the run's metadata when forced)."""
    saved = read_meta(folder)
    differences = resume_differences(saved, identity)
    if differences and not force:
        raise LorafitError(
            f"cannot resume from {folder}: the run changed since this checkpoint",
            details=differences,
            why="the optimizer, schedule and data position in the checkpoint belong to the old settings",
            fix="restore the old config/data/model, start a new run (another output_dir or --overwrite), "
            "or pass --force-resume to continue anyway (recorded in the checkpoint and training_summary.json)",
        )
    return differences


def read_history(folder: Path) -> list[dict]:
    text = (folder / HISTORY).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]
