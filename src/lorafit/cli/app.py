"""The typer app, its sub-apps and what every command shares: loading a config, failing cleanly, quieting
library chatter."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import List, Optional

import typer

from lorafit import __version__
from lorafit.errors import LorafitError
from lorafit.processes import is_main_process


class LorafitTyper(typer.Typer):
    """A typer app whose every command turns a LorafitError (a user mistake, said with what, why and fix) into its
    message on stderr and exit 1: the one place that does it, so no command can let a traceback through
    (tests/test_cli_errors.py runs every registered command with bad input)."""

    def command(self, *args, **kwargs):
        register = super().command(*args, **kwargs)

        def decorator(function):
            @functools.wraps(function)  # typer reads the signature and annotations through __wrapped__
            def failing_cleanly(*call_args, **call_kwargs):
                try:
                    return function(*call_args, **call_kwargs)
                except LorafitError as error:
                    _fail(error)

            register(failing_cleanly)
            return function

        return decorator


app = LorafitTyper(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Fine-tune causal language models with LoRA adapters from one YAML file.",
)
config_app = LorafitTyper(no_args_is_help=True, help="Check and print configs.")
app.add_typer(config_app, name="config")
data_app = LorafitTyper(no_args_is_help=True, help="Look at what the data layer makes of a config's data.")
app.add_typer(data_app, name="data")

SetOption = typer.Option(None, "--set", help="Override a config key, e.g. --set train.learning_rate=1e-4 (repeatable).")


def starting(what: str) -> None:
    """Every command's first line, on stderr, before any heavy import: at once, the user sees it runs and what it
    does (torch and transformers take seconds to minutes to import on a busy machine). Under a launcher only the
    main process says it, and not when `--nproc` started it (the launching process said it)."""
    if is_main_process() and not os.environ.get("LORAFIT_LAUNCHED"):
        typer.echo(f"lorafit {__version__}: {what}", err=True)


def _fail(error: LorafitError) -> None:
    typer.secho(f"error: {error.render()}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


def quiet_libraries() -> None:
    """Library chatter (progress bars while writing shards, advisory warnings) hides lorafit's own lines; the
    Python API gets the same quiet (model/quiet.py)."""
    from lorafit.model.quiet import quiet_libraries

    quiet_libraries()


def preflight_run(config, *, allow_pickle: bool = False):
    """What can be checked before any weight loads (model/preflight.py): the model folder's files, plugin modules,
    row lengths, target module names. Raises the first problem; returns what was and was not checked."""
    from lorafit.model.preflight import preflight

    return preflight(config, allow_pickle=allow_pickle)


def load_command_config(config: Optional[Path], overrides: Optional[List[str]], *, check_data: bool = True):
    """The validated config, and (``check_data``) every data row parsed. Imports no torch: call it before
    ``quiet_libraries`` so that a config or data mistake is reported in about a second."""
    from lorafit.config import default_config_path, load_config

    loaded = load_config(config or default_config_path(), overrides or [])
    if check_data:
        from lorafit.data.precheck import check_config_sources

        check_config_sources(loaded)
    return loaded


@app.callback(invoke_without_command=True)
def main(version: bool = typer.Option(False, "--version", help="Print the version and exit.")) -> None:
    if version:
        typer.echo(f"lorafit {__version__}")
        raise typer.Exit(0)


AllowPickle = typer.Option(False, "--allow-pickle", help="Accept pickle (.bin/.pt) weights. They can run code: trusted files only.")


