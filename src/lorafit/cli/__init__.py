"""The `lorafit` command: a thin layer over the Python API, one module per group of commands.

User mistakes (LorafitError) print what/why/fix and exit 1, never a traceback. Anything else is a bug in
lorafit and keeps its traceback so it can be reported. Top layer: may use every package.
"""

from lorafit.cli import (adapter_commands, config_commands, data_commands, doctor, model_commands,  # noqa: F401
                         plan, training)  # each registers its commands on the app
from lorafit.cli.app import app
from lorafit.cli.training import resume_command

__all__ = ["app", "resume_command", "run"]


def run() -> None:
    app()
