"""The typer app, its sub-apps and what every command shares: loading a config, failing cleanly, quieting
library chatter."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import List, Optional

import typer

from lorafit import __version__
from lorafit.errors import LorafitError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Fine-tune causal language models with LoRA adapters from one YAML file.",
)
config_app = typer.Typer(no_args_is_help=True, help="Check and print configs.")
app.add_typer(config_app, name="config")
data_app = typer.Typer(no_args_is_help=True, help="Look at what the data layer makes of a config's data.")
app.add_typer(data_app, name="data")

SetOption = typer.Option(None, "--set", help="Override a config key, e.g. --set train.learning_rate=1e-4 (repeatable).")


def _fail(error: LorafitError) -> None:
    typer.secho(f"error: {error.render()}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


class _DropMessage(logging.Filter):
    """Drops one logger's records whose message starts with ``prefix``; the logger's other records still show."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def _silence_known_noise() -> None:
    """Two known, harmless messages that every command printed, filtered exactly (logger or module, message) at
    their source: any other warning from these libraries still shows. Delete each when its version is gone."""
    # bitsandbytes 0.50.2 on a CPU with AVX512-BF16 tries the optional `kernels` package when imported (peft
    # imports it) and logs this when it is absent; it falls back to its own kernel (docs/hardware.md).
    noisy = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if not any(isinstance(f, _DropMessage) for f in noisy.filters):
        noisy.addFilter(_DropMessage("Failed to load CPU gemm_4bit_forward from kernels-community"))
    # transformers 5.23 deprecates is_gradient_checkpointing; peft 0.21.2 reads it in every get_peft_model.
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning,
                            module=r"transformers\.modeling_utils")


def _quiet_libraries() -> None:
    """Library chatter (progress bars while writing shards, advisory warnings) hides lorafit's own lines."""
    _silence_known_noise()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _load(config: Optional[Path], overrides: Optional[List[str]], *, check_data: bool = True):
    """The validated config, and (``check_data``) every data row parsed. Imports no torch: call it before
    ``_quiet_libraries`` so that a config or data mistake is reported in about a second."""
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


