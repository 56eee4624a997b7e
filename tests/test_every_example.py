"""`lorafit plan` and `lorafit doctor` exit 0 on every shipped example config (issue 20's "Done when"): a config we
ship is one a user runs first, and both commands must understand every objective in it."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO
from typer.testing import CliRunner

from lorafit.cli import app

EXAMPLES = sorted((REPO / "examples").rglob("*.yaml"))


def test_the_examples_are_found():
    names = {p.relative_to(REPO / "examples").as_posix() for p in EXAMPLES}
    assert {"quickstart.yaml", "preference/dpo.yaml", "contrastive/config.yaml", "grpo/ages.yaml"} <= names


@pytest.mark.parametrize("command", ["plan", "doctor"])
def test_plan_and_doctor_accept_every_shipped_example(command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # doctor writes a probe into the output folder: keep it out of the repository
    failures = []
    for config in EXAMPLES:
        result = CliRunner().invoke(app, [command, str(config), "--set", f"train.output_dir={tmp_path / config.stem}"])
        raised = result.exception is not None and not isinstance(result.exception, SystemExit)
        if result.exit_code != 0 or raised:
            failures.append(f"{config.relative_to(REPO)}: exit {result.exit_code}\n{result.output[-1500:]}")
    assert not failures, "\n\n".join(failures)
    assert not list(Path(REPO / "examples").rglob("runs"))  # nothing written beside the examples
