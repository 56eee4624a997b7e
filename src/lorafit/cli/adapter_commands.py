"""Commands that take a finished adapter or run: verify, eval, report, merge, generate, chat."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from lorafit.errors import LorafitError

from lorafit.cli.app import AllowPickle, LorafitTyper, quiet_libraries, app, starting


# `lorafit verify` exit codes: 0 verified, 1 a problem found, 3 no problem found but integrity not provable
# (no checksums.json). 2 is left to typer's usage errors.
VERIFY_EXIT = {"ok": 0, "failed": 1, "unproven": 3}


@app.command()
def verify(
    artifact_dir: Path = typer.Argument(..., help="A final_artifact folder, a run folder (its newest final artifact) or a PEFT adapter folder."),
    base: Optional[Path] = typer.Option(None, "--base", help="Also check the adapter against this base model folder."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    allow_pickle: bool = AllowPickle,
    serving: Optional[str] = typer.Option(None, "--serving", help="Also warn about what would stop this server from loading the adapter (vllm); the exit code does not change."),
) -> None:
    """Check an artifact: checksums, safetensors headers, finite values, shapes vs config and base.
    Exit 0 verified, 1 a problem found, 3 no problem found but no checksums.json to prove the files."""
    starting(f"verifying {artifact_dir}" + (f" against {base}" if base is not None else ""))
    import json

    from lorafit.artifact.serving import SERVERS, serving_warnings
    from lorafit.artifact.verify import verify_artifact

    _check_choice("--serving", serving, SERVERS)
    report = verify_artifact(artifact_dir, base, allow_pickle=allow_pickle)
    if serving is not None:
        report.warnings += [f"{serving}: {w}" for w in serving_warnings(report.artifact, serving)]
    if as_json:
        typer.echo(json.dumps(report.as_dict(), indent=2))
    else:
        for warning in report.warnings:
            typer.secho(f"warning: {warning}", fg=typer.colors.YELLOW, err=True)
        checked = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in report.checked.items())
        if report.status == "ok":
            typer.secho(f"OK {report.artifact} ({checked})", fg=typer.colors.GREEN)
        elif report.status == "unproven":
            typer.secho(f"PASSED, INTEGRITY NOT PROVEN {report.artifact}", fg=typer.colors.YELLOW)
            typer.echo(f"  passed: {checked} (safetensors headers, finite values, names and shapes vs "
                       "adapter_config.json" + (", shapes vs the base" if base is not None else "") + ")")
            for reason in report.unproven:
                typer.echo(f"  not proven: {reason}")
        else:
            typer.secho(f"FAILED {report.artifact}: {len(report.problems)} problem(s)", fg=typer.colors.RED, err=True)
            for problem in report.problems:
                typer.echo(f"  {problem}", err=True)
    raise typer.Exit(VERIFY_EXIT[report.status])



@app.command("eval")
def eval_command(
    data: Optional[List[Path]] = typer.Option(None, "--data", help="Held-out data file (repeatable; each file is a source)."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="A run folder (its newest final artifact), an artifact folder or a PEFT adapter folder."),
    model: Optional[Path] = typer.Option(None, "--model", help="A plain model folder; with --adapter, the base to load it on."),
    metrics: Optional[str] = typer.Option(None, "--metrics", help="Comma-separated subset, e.g. loss,json_valid,field_accuracy. Default: all."),
    baseline: bool = typer.Option(False, "--baseline", help="Also evaluate the base without the adapter, with deltas."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Generate answers for at most N examples (spread over the data); with --harness, at most N per task."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1, help="Longest generated answer, in tokens."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Examples per forward pass."),
    max_seq_length: Optional[int] = typer.Option(None, "--max-seq-length", min=1, help="Loss tokenisation: longest example (default: the adapter's data.max_seq_length, else 1024)."),
    truncation: Optional[str] = typer.Option(None, "--truncation", help="Loss tokenisation: drop or truncate longer examples (default: the adapter's data.truncation, else truncate)."),
    train_on: Optional[str] = typer.Option(None, "--train-on", help="Loss tokenisation: all_assistant, last_assistant or all (default: the adapter's data.train_on)."),
    as_json: bool = typer.Option(False, "--json", help="Print the full result as JSON."),
    harness: Optional[str] = typer.Option(None, "--harness", help="Also run lm-evaluation-harness tasks on adapter and base: comma-separated task names or task YAML files (docs/eval.md)."),
    harness_tasks_dir: Optional[Path] = typer.Option(None, "--harness-tasks-dir", help="A folder of lm_eval task YAMLs whose task names --harness may use."),
    harness_fewshot: Optional[int] = typer.Option(None, "--harness-fewshot", min=0, help="Few-shot examples per harness prompt (default: each task's own)."),
    harness_chat: bool = typer.Option(False, "--harness-chat-template", help="Render harness prompts with the tokenizer's chat template."),
) -> None:
    """Loss, perplexity and generation metrics of an adapter (or a model) on held-out data; lm-evaluation-harness
    tasks with --harness."""
    starting(f"evaluating {adapter or model}" + (f" on {', '.join(p.name for p in data)}" if data else "")
             + (" and its base" if baseline else "") + (f"; harness {harness}" if harness else ""))
    quiet_libraries()
    from lorafit.evaluate import metrics as metric_defs
    from lorafit.evaluate.progress import reporting
    from lorafit.evaluate.command import run_eval

    chosen = tuple(m.strip() for m in metrics.split(",") if m.strip()) if metrics else metric_defs.LOSS_METRICS + metric_defs.GENERATION_METRICS
    result: dict = {}
    if not data and harness is None:
        raise LorafitError("nothing to evaluate on", fix="pass --data FILE (held-out data) and/or --harness TASKS")
    _check_choice("--truncation", truncation, ("drop", "truncate"))
    _check_choice("--train-on", train_on, ("all_assistant", "last_assistant", "all"))
    if harness is not None:
        from lorafit.evaluate.harness import harness_eval, resolve_tasks

        tasks = resolve_tasks(harness, harness_tasks_dir)
    with reporting():  # stages and counts on stderr (evaluate/progress.py)
        if data:
            result = run_eval(adapter=adapter, model=model, data=data, metrics=chosen, baseline=baseline,
                              limit=limit, max_new_tokens=max_new_tokens, batch_size=batch_size,
                              max_seq_length=max_seq_length, train_on=train_on, truncation=truncation)
        if harness is not None:
            result["harness"] = harness_eval(adapter=adapter, model=model, tasks=tasks, batch_size=batch_size,
                                             limit=limit, num_fewshot=harness_fewshot, chat_template=harness_chat)
    if as_json:
        import json

        typer.echo(json.dumps({k: v for k, v in result.items()}, indent=2, default=str))
        return
    from lorafit.evaluate.command import format_eval

    if data:
        typer.echo(format_eval(result))
    if harness is not None:
        from lorafit.evaluate.harness import format_harness

        typer.echo(("\n" if data else "") + format_harness(result["harness"], adapter=adapter is not None))
        if result["harness"].get("saved"):
            typer.echo(f"saved {result['harness']['saved']} (report.html shows it)")


def _check_choice(option: str, value: Optional[str], choices: tuple[str, ...]) -> None:
    if value is not None and value not in choices:
        raise LorafitError(f"{option} {value}: unknown", fix=f"use one of {', '.join(choices)}")


@app.command("report")
def report_command(run_dir: Path = typer.Argument(..., help="A run folder (train.output_dir).")) -> None:
    """Rebuild RUN_DIR/report.html from the run's metrics files."""
    starting(f"rebuilding {run_dir / 'report.html'}")
    from lorafit.evaluate.report import write_report

    path = write_report(run_dir)
    typer.echo(f"wrote {path}")



@app.command()
def merge(
    artifact_dir: Path = typer.Argument(..., help="A run folder (its newest final artifact), an artifact folder or a PEFT adapter folder."),
    out: Path = typer.Option(..., "--out", help="Folder to create for the merged model (must not exist, or be empty)."),
    dtype: str = typer.Option("bf16", "--dtype", help="Precision of the merged weights on disk: bf16, fp16 or fp32."),
    base: Optional[Path] = typer.Option(None, "--base", help="Base model folder (default: adapter_config.json's base_model_name_or_path)."),
) -> None:
    """Merge an adapter into a full-precision reload of its base: a standalone model with checks and checksums."""
    starting(f"merging {artifact_dir} into its base -> {out}")
    quiet_libraries()
    from lorafit.evaluate.progress import reporting
    from lorafit.export.merge import merge_adapter

    with reporting():
        report = merge_adapter(artifact_dir, out, dtype=dtype, base=base)
    typer.secho(f"merged model written to {out.resolve()}", fg=typer.colors.GREEN)
    typer.echo(f"  logits vs adapter-on-base  max {report['max_abs_logit_diff']:.3g}  mean {report['mean_abs_logit_diff']:.3g}"
               f"  (tolerance {report['tolerance']:g} for {report['dtype']})")
    gap = report.get("quantization_gap")
    if gap and "max_abs_logit_diff" in gap:
        typer.echo(f"  quantization gap (adapter on {gap['quant']['bits']}-bit base vs merged reference)  "
                   f"max {gap['max_abs_logit_diff']:.3g}  mean {gap['mean_abs_logit_diff']:.3g}")


export_app = LorafitTyper(help="Write a finished adapter in another format (llama.cpp GGUF).", no_args_is_help=True)
app.add_typer(export_app, name="export")


@export_app.command("gguf")
def export_gguf_command(
    artifact_dir: Path = typer.Argument(..., help="A run folder (its newest final artifact), an artifact folder or a PEFT adapter folder."),
    out: Path = typer.Option(..., "--out", help="The .gguf file to write (must not exist)."),
    base: Optional[Path] = typer.Option(None, "--base", help="Base model folder (default: adapter_config.json's base_model_name_or_path)."),
) -> None:
    """The adapter as a llama.cpp LoRA adapter (llama-cli --lora FILE); Llama, Mistral and Qwen2 bases."""
    starting(f"exporting {artifact_dir} as a llama.cpp LoRA adapter -> {out}")
    from lorafit.evaluate.progress import reporting
    from lorafit.export.gguf import export_gguf

    with reporting():
        written = export_gguf(artifact_dir, out, base=base)
    typer.secho(f"wrote {written['out']}", fg=typer.colors.GREEN)
    typer.echo(f"  {written['pairs']} lora_a/lora_b pairs, architecture {written['architecture']}, "
               f"adapter.lora.alpha {written['alpha']:g}, rank {'/'.join(map(str, written['ranks']))}")


def _generator(adapter: Optional[Path], model: Optional[Path], base: Optional[Path], dtype: str):
    from lorafit.evaluate.generate import check_dtype, load_generator

    return load_generator(adapter=adapter, model=model, base=base, dtype=check_dtype(dtype))


AdapterOption = typer.Option(None, "--adapter", help="A run folder, an artifact folder or a PEFT adapter folder, run on its base.")
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
    starting(f"generating with {adapter or model}" + (f", prompts from {file}" if file is not None else ""))
    quiet_libraries()
    import json

    from lorafit.evaluate.generate import read_prompts
    from lorafit.evaluate.progress import reporting, stage, track

    if (prompt is None) == (file is None):
        raise LorafitError("give exactly one of --prompt TEXT or --file prompts.jsonl")
    conversations = read_prompts(file) if file is not None else [[{"role": "user", "content": prompt}]]
    with reporting():  # on stderr: the loading, then a count of the file's prompts; the answers go to stdout
        stage(f"loading {'the adapter on its base' if adapter is not None else 'the model'}")
        generator = _generator(adapter, model, base, dtype)
        for messages in track(conversations, "prompts", unit="answered"):
            reply = generator.reply(messages, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
            if file is None:
                typer.echo(reply["text"])
            else:
                typer.echo(json.dumps({"messages": messages, "response": reply["text"],
                                       "stopped_at_end_of_turn": reply["stopped_at_end_of_turn"]},
                                      ensure_ascii=False))


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
    starting(f"chat with {adapter or model} (one line per turn; /exit ends)")
    quiet_libraries()
    generator = _generator(adapter, model, base, dtype)
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


