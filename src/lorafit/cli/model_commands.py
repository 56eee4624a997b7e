"""`lorafit init-tiny-model`: write the embedded tiny model and its tokenizer to a folder."""

from __future__ import annotations

from pathlib import Path

import typer

from lorafit.cli.app import app, quiet_libraries, starting


@app.command("init-tiny-model")
def init_tiny_model(
    out_dir: Path = typer.Argument(..., help="Folder to create."),
    seed: int = typer.Option(0, help="Weights and tokenizer are a pure function of this seed."),
) -> None:
    """Write the embedded tiny Llama model and its BPE tokenizer (with chat template) to OUT_DIR."""
    starting(f"writing the embedded tiny model to {out_dir}")
    quiet_libraries()
    from lorafit.model.tiny import write_tiny_model

    written = write_tiny_model(out_dir, seed=seed)
    typer.echo(f"wrote tiny model and tokenizer to {written}")
