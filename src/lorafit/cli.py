"""The `lorafit` command: a thin layer over the Python API.

User mistakes (LorafitError) print what/why/fix and exit 1, never a traceback. Anything else is a bug in
lorafit and keeps its traceback so it can be reported.
"""

from __future__ import annotations

import os
import sys
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


def _quiet_libraries() -> None:
    """Library chatter (progress bars while writing shards, advisory warnings) hides lorafit's own lines."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _load(config: Optional[Path], overrides: Optional[List[str]]):
    from lorafit.config import default_config_path, load_config

    return load_config(config or default_config_path(), overrides or [])


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


@app.callback(invoke_without_command=True)
def main(version: bool = typer.Option(False, "--version", help="Print the version and exit.")) -> None:
    if version:
        typer.echo(f"lorafit {__version__}")
        raise typer.Exit(0)


AllowPickle = typer.Option(False, "--allow-pickle", help="Accept pickle (.bin/.pt) weights. They can run code: trusted files only.")


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
        verify(artifact_dir, None, False, allow_pickle)
        return
    _quiet_libraries()
    from lorafit.recipe import RunStopped
    from lorafit.recipe import train as run_training

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


@app.command()
def verify(
    artifact_dir: Path = typer.Argument(..., help="A final_artifact folder."),
    base: Optional[Path] = typer.Option(None, "--base", help="Also check the adapter against this base model folder."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    allow_pickle: bool = AllowPickle,
) -> None:
    """Check an artifact: checksums, safetensors headers, finite values, shapes vs config and base. Exit 0 or 1."""
    import json

    from lorafit.verify import verify_artifact

    report = verify_artifact(artifact_dir, base, allow_pickle=allow_pickle)
    if as_json:
        typer.echo(json.dumps(report.as_dict(), indent=2))
    else:
        for warning in report.warnings:
            typer.secho(f"warning: {warning}", fg=typer.colors.YELLOW, err=True)
        if report.ok:
            checked = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in report.checked.items())
            typer.secho(f"OK {artifact_dir} ({checked})", fg=typer.colors.GREEN)
        else:
            typer.secho(f"FAILED {artifact_dir}: {len(report.problems)} problem(s)", fg=typer.colors.RED, err=True)
            for problem in report.problems:
                typer.echo(f"  {problem}", err=True)
    raise typer.Exit(0 if report.ok else 1)


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


@app.command("eval")
def eval_command(
    data: List[Path] = typer.Option(..., "--data", help="Held-out data file (repeatable; each file is a source)."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="Adapter folder, or a finished run folder."),
    model: Optional[Path] = typer.Option(None, "--model", help="A plain model folder; with --adapter, the base to load it on."),
    metrics: Optional[str] = typer.Option(None, "--metrics", help="Comma-separated subset, e.g. loss,json_valid,field_accuracy. Default: all."),
    baseline: bool = typer.Option(False, "--baseline", help="Also evaluate the base without the adapter, with deltas."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Generate answers for at most N examples (spread over the data)."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1, help="Longest generated answer, in tokens."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Examples per forward pass."),
    max_seq_length: int = typer.Option(1024, "--max-seq-length", min=1, help="Longer examples are truncated for the loss."),
    as_json: bool = typer.Option(False, "--json", help="Print the full result as JSON."),
) -> None:
    """Loss, perplexity and generation metrics of an adapter (or a model) on held-out data."""
    _quiet_libraries()
    from lorafit import metrics as metric_defs
    from lorafit.evaluate import run_eval

    chosen = tuple(m.strip() for m in metrics.split(",") if m.strip()) if metrics else metric_defs.LOSS_METRICS + metric_defs.GENERATION_METRICS
    try:
        result = run_eval(adapter=adapter, model=model, data=data, metrics=chosen, baseline=baseline, limit=limit,
                          max_new_tokens=max_new_tokens, batch_size=batch_size, max_seq_length=max_seq_length)
    except LorafitError as error:
        _fail(error)
        return
    if as_json:
        import json

        typer.echo(json.dumps({k: v for k, v in result.items()}, indent=2, default=str))
        return
    from lorafit.evaluate import format_eval

    typer.echo(format_eval(result))


@app.command("report")
def report_command(run_dir: Path = typer.Argument(..., help="A run folder (train.output_dir).")) -> None:
    """Rebuild RUN_DIR/report.html from the run's metrics files."""
    from lorafit.report import write_report

    try:
        path = write_report(run_dir)
    except LorafitError as error:
        _fail(error)
        return
    typer.echo(f"wrote {path}")


@config_app.command("validate")
def config_validate(config: Path = typer.Argument(..., help="Config file."), overrides: Optional[List[str]] = SetOption) -> None:
    """Exit 0 if CONFIG is valid, 1 with every problem listed if not."""
    try:
        _load(config, overrides)
    except LorafitError as error:
        _fail(error)
    typer.echo(f"{config}: valid")


@config_app.command("show")
def config_show(
    config: Optional[Path] = typer.Argument(None, help="Config file. Omitted: the bundled quickstart."),
    overrides: Optional[List[str]] = SetOption,
) -> None:
    """Print the resolved config (every default filled in, paths resolved) as YAML."""
    try:
        typer.echo(_load(config, overrides).to_yaml(), nl=False)
    except LorafitError as error:
        _fail(error)


@data_app.command("inspect")
def data_inspect(
    config: Path = typer.Argument(..., help="Config file."),
    overrides: Optional[List[str]] = SetOption,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document instead of text."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Re-read and re-tokenise instead of using the cache."),
) -> None:
    """Per source: rows, skips, token lengths, supervision, padding; the audit; one example with trained tokens
    marked. Exit 1 if the data is invalid or the audit fails (as `lorafit train` would)."""
    _quiet_libraries()
    import json

    from lorafit.data.inspect import build_report, render_text
    from lorafit.modeling import load_tokenizer, resolve_model_path

    try:
        cfg = _load(config, overrides)
        tokenizer = load_tokenizer(cfg.model, resolve_model_path(cfg.model))
        report = build_report(cfg, tokenizer, use_cache=not no_cache)
    except LorafitError as error:
        _fail(error)
        return
    if as_json:
        typer.echo(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        typer.echo(render_text(report, colour=sys.stdout.isatty()))
    if report["audit"] and report["audit_enforced"]:
        raise typer.Exit(1)


@app.command("init-tiny-model")
def init_tiny_model(
    out_dir: Path = typer.Argument(..., help="Folder to create."),
    seed: int = typer.Option(0, help="Weights and tokenizer are a pure function of this seed."),
) -> None:
    """Write the embedded tiny Llama model and its BPE tokenizer (with chat template) to OUT_DIR."""
    _quiet_libraries()
    from lorafit.tiny_model import write_tiny_model

    try:
        written = write_tiny_model(out_dir, seed=seed)
    except LorafitError as error:
        _fail(error)
        return
    typer.echo(f"wrote tiny model and tokenizer to {written}")


@app.command()
def merge(
    artifact_dir: Path = typer.Argument(..., help="Adapter folder (adapter_config.json + adapter_model.safetensors)."),
    out: Path = typer.Option(..., "--out", help="Folder to create for the merged model (must not exist, or be empty)."),
    dtype: str = typer.Option("bf16", "--dtype", help="Precision of the merged weights on disk: bf16, fp16 or fp32."),
    base: Optional[Path] = typer.Option(None, "--base", help="Base model folder (default: adapter_config.json's base_model_name_or_path)."),
) -> None:
    """Merge an adapter into a full-precision reload of its base: a standalone model with checks and checksums."""
    _quiet_libraries()
    from lorafit.merge import merge_adapter

    try:
        report = merge_adapter(artifact_dir, out, dtype=dtype, base=base, echo=typer.echo)
    except LorafitError as error:
        _fail(error)
        return
    typer.secho(f"merged model written to {out.resolve()}", fg=typer.colors.GREEN)
    typer.echo(f"  logits vs adapter-on-base  max {report['max_abs_logit_diff']:.3g}  mean {report['mean_abs_logit_diff']:.3g}"
               f"  (tolerance {report['tolerance']:g} for {report['dtype']})")
    gap = report.get("quantization_gap")
    if gap and "max_abs_logit_diff" in gap:
        typer.echo(f"  quantization gap (adapter on {gap['quant']['bits']}-bit base vs merged reference)  "
                   f"max {gap['max_abs_logit_diff']:.3g}  mean {gap['mean_abs_logit_diff']:.3g}")


def _generator(adapter: Optional[Path], model: Optional[Path], base: Optional[Path], dtype: str):
    from lorafit.generate import check_dtype, load_generator

    return load_generator(adapter=adapter, model=model, base=base, dtype=check_dtype(dtype))


AdapterOption = typer.Option(None, "--adapter", help="Adapter folder, run on its base.")
ModelOption = typer.Option(None, "--model", help="Standalone model folder (e.g. from `lorafit merge`).")
BaseOption = typer.Option(None, "--base", help="With --adapter: base model folder (default: from adapter_config.json).")
DtypeOption = typer.Option("fp32", "--dtype", help="Precision to run in: fp32, bf16 or fp16.")


@app.command()
def generate(
    adapter: Optional[Path] = AdapterOption,
    model: Optional[Path] = ModelOption,
    prompt: Optional[str] = typer.Option(None, "--prompt", help="One user message."),
    file: Optional[Path] = typer.Option(None, "--file", help='JSONL of {"prompt": ...} or {"messages": [...]}; prints JSONL.'),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1, help="Stop after this many new tokens."),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 = greedy (deterministic)."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed (temperature > 0)."),
    base: Optional[Path] = BaseOption,
    dtype: str = DtypeOption,
) -> None:
    """Reply to a prompt (or each line of a file) with the chat template; stops at the end-of-turn token."""
    _quiet_libraries()
    import json

    from lorafit.generate import read_prompts

    try:
        if (prompt is None) == (file is None):
            raise LorafitError("give exactly one of --prompt TEXT or --file prompts.jsonl")
        conversations = read_prompts(file) if file is not None else [[{"role": "user", "content": prompt}]]
        generator = _generator(adapter, model, base, dtype)
        for messages in conversations:
            reply = generator.reply(messages, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
            if file is None:
                typer.echo(reply["text"])
            else:
                typer.echo(json.dumps({"messages": messages, "response": reply["text"],
                                       "stopped_at_end_of_turn": reply["stopped_at_end_of_turn"]}, ensure_ascii=False))
    except LorafitError as error:
        _fail(error)


@app.command()
def chat(
    adapter: Optional[Path] = AdapterOption,
    model: Optional[Path] = ModelOption,
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1, help="Longest reply in tokens."),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 = greedy (deterministic)."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed (temperature > 0)."),
    system: Optional[str] = typer.Option(None, "--system", help="System message for the conversation."),
    base: Optional[Path] = BaseOption,
    dtype: str = DtypeOption,
) -> None:
    """Interactive chat: one line per user turn; the conversation is kept; /exit or end of input ends it."""
    _quiet_libraries()
    try:
        generator = _generator(adapter, model, base, dtype)
    except LorafitError as error:
        _fail(error)
        return
    messages = [{"role": "system", "content": system}] if system else []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            typer.echo("> ", nl=False)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            break
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        reply = generator.reply(messages, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
        messages.append({"role": "assistant", "content": reply["text"]})
        typer.echo(reply["text"])


def run() -> None:
    app()


if __name__ == "__main__":
    run()
