"""`lorafit train`: run the recipe, print progress and the summary, say how to resume."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from lorafit import __version__
from lorafit.errors import LorafitError

from lorafit.cli.app import AllowPickle, SetOption, _fail, _load, _quiet_libraries, app


class ConsoleEcho:
    """Progress for people: one line per log step, one per evaluation."""

    def info(self, message: str) -> None:
        typer.echo(message)

    def progress(self, step: int, max_steps: int, values: dict) -> None:
        parts = [f"step {step:>5}/{max_steps}"]
        if "loss" in values:
            parts.append(f"loss {values['loss']:.4f}")
        if "learning_rate" in values:
            parts.append(f"lr {values['learning_rate']:.2e}")
        if "grad_norm" in values:
            parts.append(f"grad {values['grad_norm']:.3f}")
        if "tokens_per_second" in values:
            parts.append(f"{values['tokens_per_second']:,.0f} tok/s")
        if "eval_loss" in values:
            parts.append(f"eval_loss {values['eval_loss']:.4f} (ppl {values['eval_perplexity']:.2f})")
        generated = {k.removeprefix("eval_"): v for k, v in values.items()
                     if k.startswith("eval_") and k not in ("eval_loss", "eval_perplexity")}
        parts += [f"{name} {value:.3f}" for name, value in generated.items()]
        typer.echo("  ".join(parts), file=sys.stdout)



@app.command()
def train(
    config: Optional[Path] = typer.Argument(None, help="Config file (YAML or JSON). Omitted: the bundled quickstart."),
    overrides: Optional[List[str]] = SetOption,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a finished run (its artifact version and checkpoints too)."),
    resume: Optional[str] = typer.Option(
        None, "--resume", metavar="auto|PATH",
        help="Continue from a checkpoint: 'auto' = the newest verified one in train.output_dir (a fresh start if none).",
    ),
    force_resume: bool = typer.Option(
        False, "--force-resume", help="Resume even if the config, data or base model changed (recorded in the summary)."
    ),
    allow_pickle: bool = AllowPickle,
    verify_only: bool = typer.Option(False, "--verify-only", help="Only verify --artifact-dir (same as `lorafit verify`)."),
    artifact_dir: Optional[Path] = typer.Option(None, "--artifact-dir", help="With --verify-only: the artifact to check."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Re-read and re-tokenise the data instead of using the cache."),
) -> None:
    """Train a LoRA adapter. With no CONFIG, runs the quickstart on the embedded tiny model."""
    if verify_only:
        if artifact_dir is None:
            _fail(LorafitError("--verify-only needs --artifact-dir DIR", fix="e.g. --artifact-dir runs/x/name-v0.1.0/final_artifact"))
        from lorafit.cli.adapters import verify

        verify(artifact_dir, None, False, allow_pickle)
        return
    _quiet_libraries()
    from lorafit.training.recipe import RunStopped
    from lorafit.training.recipe import train as run_training

    try:
        cfg = _load(config, overrides)
        typer.echo(f"lorafit {__version__}: training {cfg.model.path} -> {cfg.train.output_dir}")
        result = run_training(cfg, overwrite=overwrite, echo=ConsoleEcho(), allow_pickle=allow_pickle,
                              data_cache=not no_cache, resume=resume, force_resume=force_resume)
    except RunStopped as stopped:
        typer.secho(f"stopped: {stopped.render()}", fg=typer.colors.YELLOW, err=True)
        typer.echo(f"resume with: {resume_command()}", err=True)
        raise typer.Exit(stopped.exit_code)
    except LorafitError as error:
        _fail(error)
        return
    except KeyboardInterrupt:
        typer.secho("\ninterrupted at once (no checkpoint for the current step)", fg=typer.colors.YELLOW, err=True)
        typer.echo(f"resume from the last checkpoint with: {resume_command()}", err=True)
        raise typer.Exit(130)
    _print_summary(result)



def resume_command(argv: Optional[List[str]] = None) -> str:
    """This command line with --resume auto (and without --overwrite or an earlier --resume)."""
    import shlex

    args = list(sys.argv[1:] if argv is None else argv)
    kept, skip = [], False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg == "--resume":
            skip = True
            continue
        if arg == "--overwrite" or arg.startswith("--resume="):
            continue
        kept.append(arg)
    return shlex.join(["lorafit", *kept, "--resume", "auto"])


def _print_summary(result) -> None:
    m = result.metrics
    typer.secho("\ntraining finished", fg=typer.colors.GREEN, bold=True)
    typer.echo(f"  artifact       {result.adapter_dir}")
    if "eval_loss_first" in m:
        typer.echo(
            f"  eval loss      {m['eval_loss_first']:.4f} -> {m['eval_loss_final']:.4f} "
            f"({100 * m['eval_loss_reduction']:.1f}% lower, best {m['eval_loss_best']:.4f} at step {m['eval_best_step']})"
        )
    generation = result.generation
    for name in ("field_presence", "field_accuracy", "json_valid", "rouge_l"):
        base, adapter = generation.get("base", {}).get(name), generation.get("adapter", {}).get(name)
        if base is not None and adapter is not None:
            typer.echo(f"  {name:<14} {base:.3f} -> {adapter:.3f} (base -> adapter, greedy, eval sample)")
    best = result.best
    if best.get("value") is not None and best.get("metric") != "eval_loss":
        typer.echo(f"  best           {best['metric']} {best['value']:.4f} at step {best['step']}")
    if best.get("stopped_early_at") is not None:
        typer.echo(f"  early stop     at step {best['stopped_early_at']} ({best['metric']} did not improve)")
    typer.echo(f"  steps          {m['steps']} ({m['epochs']} epochs) in {m['train_seconds']:.1f} s of training")
    supervised = f", {m['supervised_tokens_per_second']:,.0f} supervised" if m.get("supervised_tokens_per_second") else ""
    typer.echo(f"  throughput     {m['tokens_per_second']:,.0f} tokens/s (non-padding{supervised})")
    if m.get("peak_rss_mb"):
        gpu = f", GPU {m['gpu_allocated_peak_mb']:,.0f} MB allocated" if m.get("gpu_allocated_peak_mb") else ""
        typer.echo(f"  peak memory    {m['peak_rss_mb']:,.0f} MB RSS{gpu}")
    typer.echo(f"  metrics        {result.run_dir / 'metrics_history.jsonl'}")
    typer.echo(f"  verify         lorafit verify {result.adapter_dir}")
    if result.report:
        typer.secho(f"  report         {result.report}", bold=True)


