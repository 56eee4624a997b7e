"""Commands that prepare a run: config validate/show, data inspect, init-tiny-model."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from lorafit.cli.app import (SetOption, _load, _preflight, _quiet_libraries, app, config_app, data_app,
                             starting)


@config_app.command("validate")
def config_validate(config: Path = typer.Argument(..., help="Config file."), overrides: Optional[List[str]] = SetOption) -> None:
    """Exit 0 if CONFIG, its data and its model folder pass every check that loads no weights, 1 with the problem
    if not: the config, every data row, the model folder's files, plugin modules (found, not imported), row
    lengths (tokenizer.json, no template) and target module names (config.json on the meta device). Says what it
    could not check."""
    starting(f"validating {config}")
    report = _preflight(_load(config, overrides))
    typer.echo(f"{config}: valid\n{report.render()}")


@config_app.command("show")
def config_show(
    config: Optional[Path] = typer.Argument(None, help="Config file. Omitted: the bundled quickstart."),
    overrides: Optional[List[str]] = SetOption,
) -> None:
    """Print the resolved config (every default filled in, paths resolved) as YAML."""
    starting(f"resolving {config or 'the bundled quickstart'}")
    typer.echo(_load(config, overrides, check_data=False).to_yaml(), nl=False)


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

    cfg = _load(config, overrides)  # a config or data mistake answers before the heavy imports
    _quiet_libraries()
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


@app.command("init-tiny-model")
def init_tiny_model(
    out_dir: Path = typer.Argument(..., help="Folder to create."),
    seed: int = typer.Option(0, help="Weights and tokenizer are a pure function of this seed."),
) -> None:
    """Write the embedded tiny Llama model and its BPE tokenizer (with chat template) to OUT_DIR."""
    starting(f"writing the embedded tiny model to {out_dir}")
    _quiet_libraries()
    from lorafit.model.tiny import write_tiny_model

    written = write_tiny_model(out_dir, seed=seed)
    typer.echo(f"wrote tiny model and tokenizer to {written}")


