"""Every registered `lorafit` command, given a user mistake, exits non-zero with a message and no traceback
(issue 20: the CLI's error handling lives in one place, cli/app.py's LorafitTyper). The commands are enumerated
from the app itself, so a new command without a case here fails the first test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from lorafit.cli import app


def _commands(command, prefix=()) -> list[tuple[str, ...]]:
    subcommands = getattr(command, "commands", None)
    if subcommands:
        return [name for key, sub in subcommands.items() for name in _commands(sub, (*prefix, key))]
    return [prefix]


REGISTERED = _commands(typer.main.get_command(app))

# A user mistake for each command. {bad} is a config with an unknown key, {empty} an empty folder, {full} a folder
# that already holds a file.
MISTAKES = {
    ("verify",): ["{empty}"],
    ("eval",): ["--adapter", "{empty}", "--data", "{empty}/missing.jsonl"],
    ("report",): ["{empty}"],
    ("merge",): ["{empty}", "--out", "{empty}/merged"],
    ("generate",): ["--adapter", "{empty}", "--prompt", "hi"],
    ("chat",): ["--adapter", "{empty}"],
    ("plan",): ["{bad}"],
    ("doctor",): ["{bad}"],
    ("init-tiny-model",): ["{full}"],
    ("train",): ["{bad}"],
    ("config", "validate"): ["{bad}"],
    ("config", "show"): ["{bad}"],
    ("data", "inspect"): ["{bad}"],
    ("export", "gguf"): ["{empty}", "--out", "{empty}/adapter.gguf"],
}


def test_every_registered_command_has_a_mistake_case():
    assert sorted(REGISTERED) == sorted(MISTAKES), "add the new command to MISTAKES"


@pytest.mark.parametrize("command", sorted(MISTAKES), ids=" ".join)
def test_a_user_mistake_is_a_message_and_exit_1_never_a_traceback(command, tmp_path):
    empty, full = tmp_path / "empty", tmp_path / "full"
    empty.mkdir()
    full.mkdir()
    (full / "keep.txt").write_text("mine\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {epochs: 1}\nmodle: {path: x}\n")
    args = [a.format(bad=bad, empty=empty, full=full) for a in MISTAKES[command]]
    previous = Path.cwd()
    os.chdir(tmp_path)
    try:
        result = CliRunner().invoke(app, [*command, *args], input="")
    finally:
        os.chdir(previous)
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"lorafit {' '.join(command)}: raised {result.exception!r}")
    assert result.exit_code == 1, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    assert "error:" in result.stderr or "fail" in result.output.lower(), result.output
    assert (full / "keep.txt").read_text() == "mine\n"  # nothing of the user's was touched


def test_the_launchers_rank_is_read_in_one_place():
    """One main-process notion (issue 20): lorafit/processes.py reads RANK; accelerate decides once the loop runs."""
    import lorafit

    src = Path(lorafit.__file__).parent
    readers = sorted(str(p.relative_to(src)) for p in src.rglob("*.py")
                     if '"RANK"' in p.read_text(encoding="utf-8"))
    assert readers == ["processes.py"], readers
