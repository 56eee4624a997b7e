"""`lorafit data inspect`: what the data layer makes of a config's data, for the objective's kind of row
(data/prepare.py)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from lorafit.cli.app import SetOption, data_app, load_command_config, quiet_libraries, starting


@data_app.command("inspect")
def data_inspect(
    config: Path = typer.Argument(..., help="Config file."),
    overrides: Optional[List[str]] = SetOption,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document instead of text."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Re-read and re-tokenise instead of using the cache."),
) -> None:
    """Per source: rows, skips, token lengths, supervision, padding; the audit; one example with trained tokens
    marked. Exit 1 if the data is invalid or the audit fails (as `lorafit train` would)."""
    starting(f"inspecting the data of {config}")
    import json

    cfg = load_command_config(config, overrides)  # a config or data mistake answers before the heavy imports
    quiet_libraries()
    from lorafit.data import prepare, use_configured_template
    from lorafit.model.loading import load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(cfg.model, resolve_model_path(cfg.model))
    use_configured_template(tokenizer, cfg.data)
    report = prepare.inspect(cfg, tokenizer, use_cache=not no_cache)
    if as_json:
        typer.echo(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        typer.echo(prepare.render(report, colour=sys.stdout.isatty()))
    if report["audit"] and report["audit_enforced"]:
        raise typer.Exit(1)
