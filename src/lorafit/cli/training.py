"""`lorafit train`: run the recipe, print progress and the summary, say how to resume."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from lorafit.errors import LorafitError
from lorafit.processes import is_main_process
from lorafit.run_folder import RunFolder
from lorafit.run_lock import check_free

from lorafit.cli.app import AllowPickle, SetOption, load_command_config, preflight_run, quiet_libraries, app, starting
from lorafit.cli.launch import (Launch, MasterAddrOption, MasterPortOption, NnodesOption, NodeRankOption, NprocOption,
                                LAUNCHED, check_launch, relaunch)


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
    dry_run: bool = typer.Option(
        False, "--dry-run",
        help="Check everything up to the first optimizer step (config, data, model, one forward and backward on the "
        "largest batch, its memory), then stop without training or writing an artifact.",
    ),
    max_steps: Optional[int] = typer.Option(
        None, "--max-steps", min=1, help="Stop after N optimizer steps: --set train.max_steps=N (replacing train.epochs)."
    ),
    nproc: Optional[int] = NprocOption,
    nnodes: int = NnodesOption,
    node_rank: int = NodeRankOption,
    master_addr: Optional[str] = MasterAddrOption,
    master_port: int = MasterPortOption,
) -> None:
    """Train a LoRA adapter. With no CONFIG, runs the quickstart on the embedded tiny model.

    Exit codes: 0 trained (or --dry-run passed), 1 an error, 3 training diverged (the artifact is written but
    flagged), 130/143 stopped by SIGINT/SIGTERM (resumable); under --nproc, the first failed process's."""
    starting(f"{'checking (dry run)' if dry_run else 'training'} {config or 'the bundled quickstart'}")
    if verify_only:
        if artifact_dir is None:
            raise LorafitError("--verify-only needs --artifact-dir DIR", fix="e.g. --artifact-dir runs/x/name-v0.1.0/final_artifact")
        from lorafit.cli.adapter_commands import verify

        verify(artifact_dir, None, False, allow_pickle, serving=None)
        return
    if max_steps is not None:
        overrides = [*(overrides or []), f"train.max_steps={max_steps}", "train.epochs=null"]
    launch = Launch(nproc, nnodes, node_rank, master_addr, master_port) if nproc is not None else None
    if launch is not None:
        check_launch(launch)  # --nproc 0, a missing --master-addr: before anything is read
    cfg = _checked_config(config, overrides, allow_pickle=allow_pickle)
    if launch is not None:  # the same command in N processes under torchrun; does not return
        relaunch(launch, sys.argv[1:], cfg)
    _run(cfg, overwrite=overwrite, resume=resume, force_resume=force_resume, allow_pickle=allow_pickle,
         data_cache=not no_cache, dry_run=dry_run)


def _checked_config(config: Optional[Path], overrides: Optional[List[str]], *, allow_pickle: bool):
    """The config, after every check that needs no weights, in the command's first seconds: the config and data
    rows (before torch is imported), a live run in the output folder, and the preflight (model folder, plugins,
    row lengths, target modules). Under a launcher only the main process checks (it stops the others if it
    fails), and none of the processes `--nproc` started: the launching process checked before starting them."""
    cfg = load_command_config(config, overrides)
    # Under a launcher the main process holds the lock: not for the others to test.
    if is_main_process() and not os.environ.get(LAUNCHED):
        check_free(Path(cfg.train.output_dir))  # a live run there: say so now, not after minutes of loading
        for warning in preflight_run(cfg, allow_pickle=allow_pickle).warnings:
            typer.secho(f"warning: {warning}", fg=typer.colors.YELLOW, err=True)
    return cfg


def _run(cfg, *, overwrite: bool, resume: Optional[str], force_resume: bool, allow_pickle: bool, data_cache: bool,
         dry_run: bool) -> None:
    """The run itself, its summary and its exit code."""
    quiet_libraries()
    from lorafit.training.health import DIVERGED_EXIT_CODE
    from lorafit.training.progress import Progress
    from lorafit.training.recipe import RunStopped
    from lorafit.training.recipe import train as run_training

    main = is_main_process()  # under --nproc/torchrun the main process alone prints the summary
    try:
        verb = "checking (dry run)" if dry_run else "training"
        typer.echo(f"{verb} {cfg.model.path} -> {cfg.train.output_dir}") if main else None
        result = run_training(cfg, overwrite=overwrite, progress=Progress(), allow_pickle=allow_pickle,
                              data_cache=data_cache, resume=resume, force_resume=force_resume, dry_run=dry_run)
    except RunStopped as stopped:
        typer.secho(f"stopped: {stopped.render()}", fg=typer.colors.YELLOW, err=True)
        typer.echo(f"resume with: {resume_command()}", err=True)
        raise typer.Exit(stopped.exit_code)
    except KeyboardInterrupt:
        typer.secho("\ninterrupted at once (no checkpoint for the current step)", fg=typer.colors.YELLOW, err=True)
        typer.echo(f"resume from the last checkpoint with: {resume_command()}", err=True)
        raise typer.Exit(130)
    if not main:
        return
    if dry_run:
        _print_dry_run(result)
        return
    _print_summary(result)
    if result.health.get("status", "ok") != "ok":
        raise typer.Exit(DIVERGED_EXIT_CODE)


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
    if os.environ.get("LOCAL_WORLD_SIZE") and not any(a.split("=")[0] == "--nproc" for a in kept):
        # a process started by --nproc (or torchrun): the resumed run needs the same number of processes
        kept += ["--nproc", os.environ["LOCAL_WORLD_SIZE"]]
    return shlex.join(["lorafit", *kept, "--resume", "auto"])


def _print_dry_run(result) -> None:
    d = result.dry_run
    typer.secho("\ndry run passed: no optimizer step taken, no checkpoint or artifact written", fg=typer.colors.GREEN, bold=True)
    typer.echo("  checked        config, data (audit in data_report.json), model and adapter load")
    typer.echo(f"  largest batch  {d['batch_rows']} rows x {d['longest_row']} tokens: forward + backward in "
               f"{d['forward_backward_seconds']:.2f} s on {d['device']}, loss {d['loss']:.4f}")
    gpu = f", GPU {d['gpu_allocated_peak_mb']:,.0f} MB allocated" if d.get("gpu_allocated_peak_mb") else ""
    typer.echo(f"  peak memory    {d['peak_rss_mb']:,.0f} MB RSS{gpu}")
    typer.echo("  train with     the same command without --dry-run")


def _print_summary(result) -> None:
    m = result.metrics
    if result.health.get("status", "ok") != "ok":
        typer.secho("\ntraining diverged: the adapter did not learn", fg=typer.colors.RED, bold=True)
        for reason in result.health["reasons"]:
            typer.echo(f"  why            {reason}")
        typer.echo("  fix            lower train.learning_rate (10x), set train.max_grad_norm, or add warmup")
    else:
        typer.secho("\ntraining finished", fg=typer.colors.GREEN, bold=True)
    typer.echo(f"  artifact       {result.adapter_dir}")
    diverged = result.health.get("status", "ok") != "ok"
    # GRPO's loss is a policy-gradient surrogate (about 0 on the answers just sampled): its eval_reward says more
    series = m.get("series", {})
    surrogate = "eval_reward" in series
    if surrogate:
        pass
    elif "eval_causal_stability" in series:  # contrastive: its parts, not a combined loss that can go negative
        from lorafit.config.objective import CONTRASTIVE_METRICS

        for part in (p for p in CONTRASTIVE_METRICS if f"eval_{p}" in series):
            s = series[f"eval_{part}"]
            typer.echo(f"  {part:<22} {s['first']:.4f} -> {s['final']:.4f} (first -> final evaluation)")
    elif "eval_loss_first" in m and diverged:  # no "% lower, best at ...": nothing was learned
        typer.echo(f"  eval loss      {m['eval_loss_first']:.4f} -> {m['eval_loss_final']:.4f} (diverged)")
    elif "eval_loss_first" in m:
        change = f"{100 * m['eval_loss_reduction']:.1f}% lower, " if m.get("eval_loss_reduction") is not None else ""
        typer.echo(
            f"  eval loss      {m['eval_loss_first']:.4f} -> {m['eval_loss_final']:.4f} "
            f"({change}best {m['eval_loss_best']:.4f} at step {m['eval_best_step']})"
        )
    elif "eval_loss_final" in m:
        typer.echo(
            f"  eval loss      {m['eval_loss_final']:.4f} final, best {m['eval_loss_best']:.4f} at step "
            f"{m['eval_best_step']} (no evaluation before training: eval.at_start is false)"
        )
    generation = result.generation
    for name in ("field_presence", "field_accuracy", "json_valid", "rouge_l"):
        base, adapter = generation.get("base", {}).get(name), generation.get("adapter", {}).get(name)
        if base is not None and adapter is not None:
            typer.echo(f"  {name:<14} {base:.3f} -> {adapter:.3f} (base -> adapter, greedy, eval sample)")
    echo_answers(generation.get("samples") or [])
    series = m.get("series", {})
    # (the contrastive parts are printed once, above, with their full names)
    for label, name in (("reward margin", "eval_reward_margin"), ("reward acc.", "eval_reward_accuracy"),
                        ("reward", "eval_reward"), ("kl", "eval_kl")):
        if name in series:
            typer.echo(f"  {label:<14} {series[name]['first']:.3f} -> {series[name]['final']:.3f} ({name})")
    attack = getattr(result, "attack", None) or {}
    if attack:
        typer.echo(f"  attack success {attack['base']['attack_success_rate']:.3f} -> "
                   f"{attack['adapter']['attack_success_rate']:.3f} (base -> adapter, {attack['examples']} injections)")
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
    typer.echo(f"  metrics        {result.run_dir / RunFolder.HISTORY}")
    typer.echo(f"  verify         lorafit verify {result.adapter_dir}")
    if result.report:
        typer.secho(f"  report         {result.report}", bold=True)


SHOWN_ANSWERS = 3  # held-out rows the summary shows (report.html shows every sampled row)


def echo_answers(samples: list[dict], width: int = 100) -> None:
    """A few held-out rows with the base's answer next to the adapter's: the difference seen, not only counted."""
    if not samples:
        return

    def line(text: str) -> str:
        text = " ".join(str(text).split())  # one line: a model's newlines and runs of spaces would break the layout
        return text if len(text) <= width else text[:width - 3] + "..."

    typer.echo(f"  held-out answers (base -> adapter, {min(SHOWN_ANSWERS, len(samples))} rows; all in the report)")
    for sample in samples[:SHOWN_ANSWERS]:
        typer.echo(f"    input    {line(sample['prompt'])}")
        typer.echo(f"    base     {line(sample['base']) or '(empty)'}")
        typer.echo(f"    adapter  {line(sample['adapter']) or '(empty)'}")
