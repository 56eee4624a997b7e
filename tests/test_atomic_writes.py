"""One atomic writer (issue 20): files through run_folder.atomic_path, folders through run_folder.publish_folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import lorafit
from lorafit.run_folder import atomic_path, publish_folder, write_atomic


def test_a_written_file_is_whole_public_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "out.bin"
    write_atomic(target, b"old")
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        tmp.write_bytes(b"new contents")
    assert target.read_bytes() == b"new contents"
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    target = tmp_path / "out.bin"
    write_atomic(target, b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("the writer died")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def _staged(tmp_path, text: str) -> Path:
    staging = tmp_path / f".staging-{text}"
    staging.mkdir()
    (staging / "a.txt").write_text(text)
    return staging


def test_a_published_folder_appears_whole(tmp_path):
    staging = _staged(tmp_path, "a")
    publish_folder(staging, tmp_path / "final")
    assert (tmp_path / "final" / "a.txt").read_text() == "a" and not staging.exists()


def test_publishing_replaces_only_when_asked_and_leaves_nothing_aside(tmp_path):
    publish_folder(_staged(tmp_path, "old"), tmp_path / "final")
    refused = _staged(tmp_path, "new")
    with pytest.raises(OSError):  # a non-empty target without replace: the old one stays as it was
        publish_folder(refused, tmp_path / "final")
    assert (tmp_path / "final" / "a.txt").read_text() == "old"
    publish_folder(refused, tmp_path / "final", replace=True)
    assert (tmp_path / "final" / "a.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]  # the old copy set aside is gone


# The checkpoint writer keeps a module-level rename that tests replace to simulate a crash mid-rename.
ALLOWED = {"run_folder.py", "training/checkpoint.py"}


def test_no_module_renames_files_into_place_by_hand():
    src = Path(lorafit.__file__).parent
    by_hand = sorted(str(p.relative_to(src)) for p in src.rglob("*.py")
                     if any(call in p.read_text(encoding="utf-8") for call in ("os.replace(", "os.rename("))
                     and str(p.relative_to(src)) not in ALLOWED)
    assert by_hand == [], f"use run_folder.atomic_path / publish_folder in {by_hand}"
