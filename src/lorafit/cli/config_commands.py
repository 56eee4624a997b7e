"""`lorafit config validate` and `lorafit config show`: check a config (and what it points at) without loading
weights, and print it resolved."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from lorafit.cli.app import SetOption, config_app, load_command_config, preflight_run, starting


@config_app.command("validate")
def config_validate(config: Path = typer.Argument(..., help="Config file."), overrides: Optional[List[str]] = SetOption) -> None:
    """Exit 0 if CONFIG, its data and its model folder pass every check that loads no weights, 1 with the problem
    if not: the config, every data row, the model folder's files, plugin modules (found, not imported), row
    lengths (tokenizer.json, no template) and target module names (config.json on the meta device). Says what it
    could not check."""
    starting(f"validating {config}")
    report = preflight_run(load_command_config(config, overrides))
    typer.echo(f"{config}: valid\n{report.render()}")


@config_app.command("show")
def config_show(
    config: Optional[Path] = typer.Argument(None, help="Config file. Omitted: the bundled quickstart."),
    overrides: Optional[List[str]] = SetOption,
) -> None:
    """Print the resolved config (every default filled in, paths resolved) as YAML."""
    starting(f"resolving {config or 'the bundled quickstart'}")
    typer.echo(load_command_config(config, overrides, check_data=False).to_yaml(), nl=False)
