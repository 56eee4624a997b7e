"""What a run leaves behind besides the artifact: its metrics summary, its health (did it learn at all?),
training_results.json, report.html, data_report.json, the merged model, and the error a stopped run raises."""

from __future__ import annotations

import math
from pathlib import Path

from lorafit.config import Config
from lorafit.data import SplitStats
from lorafit.errors import LorafitError
from lorafit.run_folder import RunFolder
from lorafit.training.callbacks import MetricsHistory, peak_memory
from lorafit.training.checkpoint import newest_verified
from lorafit.training.guards import StopRequest

HEADLINE_METRICS = ("field_presence", "field_accuracy", "json_valid", "rouge_l")
# A gradient norm below this over the last logged steps means nothing is being learned any more.
VANISHED_GRAD_NORM = 1e-6
# How close (relative) a loss must be to ln(vocab_size), the loss of a uniform guess, to count as "at chance". A
# collapse lands on it to 4 decimals; a random base starts within ~0.1%; a trained tiny model starts 1% above it.
UNIFORM_TOLERANCE = 0.001
DIVERGED_EXIT_CODE = 3


# ---------------------------------------------------------------------------------------------- metrics


def summarise_metrics(history: MetricsHistory, loop, train_stats: SplitStats) -> dict:
    records = history.records
    train_losses = [r["loss"] for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    state = loop.state
    seconds = state.train_seconds
    metrics: dict = {
        "steps": state.step,
        "epochs": round(state.epoch + state.step_in_epoch / loop.steps_per_epoch, 4),
        "train_loss_first": train_losses[0] if train_losses else None,
        "train_loss_final": train_losses[-1] if train_losses else None,
        "train_seconds": round(seconds, 2),
        "tokens_seen": state.tokens_seen,
        "tokens_per_second": round(state.tokens_seen / seconds, 1) if seconds else 0.0,
    }
    if seconds and state.supervised_seen:
        metrics["supervised_tokens_per_second"] = round(state.supervised_seen / seconds, 1)
    metrics["supervised_tokens_seen"] = state.supervised_seen
    metrics.update(peak_memory())
    if evals:
        best_step, best = min(evals, key=lambda item: item[1])
        final = evals[-1][1]
        # Perplexity as the history has it: exp of the next-token part of the loss (absent for objectives without one).
        perplexities = [r["eval_perplexity"] for r in records if "eval_loss" in r and "eval_perplexity" in r]
        metrics.update(eval_loss_final=final, eval_loss_best=best, eval_best_step=best_step,
                       eval_perplexity_final=perplexities[-1] if perplexities else None)
        if evals[0][0] == 0:  # "before training" only when an evaluation ran before the first step (eval.at_start)
            first = evals[0][1]
            metrics.update(eval_loss_first=first, eval_perplexity_first=perplexities[0] if perplexities else None,
                           eval_loss_reduction=(first - final) / abs(first) if first else None)
    metrics["series"] = summarise_series(records)
    return metrics


def summarise_series(records: list[dict]) -> dict:
    """first / final / best (and its step) of every logged metric; "best" is the max where no direction applies."""
    from lorafit.config import LOWER_IS_BETTER

    keys = [k for k in dict.fromkeys(k for r in records for k in r) if k not in ("step", "epoch")]
    out = {}
    for key in keys:
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        if not points:
            continue
        pick = min if key in LOWER_IS_BETTER else max
        best_step, best_value = pick(points, key=lambda p: p[1])
        out[key] = {"first": points[0][1], "final": points[-1][1], "best": best_value, "best_step": best_step}
    return out


def assess_health(records: list[dict], vocab_size: int | None, *, trace: list | None = None,
                  window: int = 3, zero_gradients_expected: bool = False) -> dict:
    """Did the run learn, or did it diverge or collapse? A too-high learning rate can drive a model to predict
    the uniform distribution (loss = ln(vocab_size)) with zero gradients: finite values, no NaN guard trips, and
    the run would look like a success.

    ``trace``: every step's [loss, gradient norm] (the loop's ``LogWindow.trace``), so a collapse between two log
    lines counts; without it the logged records are used. Diverged when the gradient norm stayed below
    ``VANISHED_GRAD_NORM`` over the last ``window`` steps, or when the losses moved TO the uniform guess: the final
    train loss (and the final eval loss, where there is one) sits at ln(vocab_size) while the start (the first
    evaluation, else the first step's loss) did not. A run that starts at the uniform guess (a random base) and
    has not moved yet is not called diverged: it is compared with its start. ``zero_gradients_expected``: GRPO,
    whose step has exactly zero gradient when every answer of every group got the same reward (no advantage), so
    vanished gradients say nothing there.

    >>> trace = [[7.03, 3.3], [6.9315, 0.0], [6.9315, 0.0], [6.9315, 0.0]]
    >>> assess_health([], 1024, trace=trace)["status"], assess_health([], 1024, trace=trace[:1] + [[5.3, 0.7]])["status"]
    ('diverged', 'ok')
    """
    steps = [pair for pair in (trace or []) if len(pair) == 2]
    if steps:
        losses, norms = [p[0] for p in steps], [p[1] for p in steps]
    else:
        losses = [r["loss"] for r in records if isinstance(r.get("loss"), (int, float))]
        norms = [r["grad_norm"] for r in records if isinstance(r.get("grad_norm"), (int, float))]
    evals = [r["eval_loss"] for r in records if isinstance(r.get("eval_loss"), (int, float))]
    uniform = math.log(vocab_size) if vocab_size else None

    def at_uniform(value) -> bool:
        return bool(uniform and value is not None and math.isfinite(value)
                    and abs(value - uniform) <= UNIFORM_TOLERANCE * uniform)

    last = norms[-window:]
    start = evals[0] if len(evals) >= 2 else (losses[0] if losses else None)
    ends = [losses[-1]] if losses else []
    if len(evals) >= 2:
        ends.append(evals[-1])
    signals = {
        "loss_not_improved": len(losses) >= 2 and losses[-1] >= losses[0],
        "gradients_vanished": not zero_gradients_expected and len(norms) >= 2 and all(math.isfinite(n) and n < VANISHED_GRAD_NORM for n in last),
        "loss_at_uniform": bool(ends) and all(at_uniform(v) for v in ends),
        "started_at_uniform": at_uniform(start),
    }
    reasons = []
    if signals["gradients_vanished"]:
        reasons.append(f"gradient norm below {VANISHED_GRAD_NORM:g} over the last {len(last)} steps")
    if signals["loss_at_uniform"] and not signals["started_at_uniform"] and len(losses) >= 2:
        reasons.append(f"the loss went from {start:.4f} to {ends[-1]:.4f}, ln(vocab_size) = {uniform:.4f}: the "
                       "loss of a uniform guess")
    return {"status": "diverged" if reasons else "ok", "reasons": reasons, "signals": signals,
            "uniform_loss": uniform, "train_loss_first": losses[0] if losses else None,
            "train_loss_final": losses[-1] if losses else None, "grad_norm_last": last, "steps_checked": len(norms)}


def diverged_advice(health: dict) -> str:
    return ("training diverged: " + "; ".join(health["reasons"])
            + ". Lower train.learning_rate (10x), set train.max_grad_norm, or add warmup, then train again")


# ---------------------------------------------------------------------------------------------- files


def write_data_report(run: RunFolder, prepared, say) -> None:
    """data_report.json (per source counts, mix, padding) and skipped_rows.jsonl (every row on_error: skip left out)."""
    run.write_json(run.DATA_REPORT, prepared.report | {"warnings": prepared.warnings})
    if prepared.skipped_rows:
        run.write_lines(run.SKIPPED_ROWS, prepared.skipped_rows)
        say(f"skipped {len(prepared.skipped_rows)} invalid rows (listed in {run / run.SKIPPED_ROWS})")
    for note in prepared.notes:  # rows the length limit left out or cut, per source
        say(note)
    for warning in prepared.warnings:
        say(f"warning: {warning}")


def write_results_and_report(run: RunFolder, config: Config, summary: dict, comparison: dict | None) -> None:
    """training_results.json (everything) and report.html; both before the summary, which is written last."""
    import datetime
    import platform

    import peft
    import torch
    import transformers

    from lorafit.evaluate.report import write_report

    results = {
        **summary,
        "artifact": {"name": config.artifact.name, "version": config.artifact.version},
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "generation": comparison,
        "headline_metrics": list(HEADLINE_METRICS),
        "config": config.to_dict(),
        "config_yaml": config.to_yaml(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "peft": peft.__version__},
        "files": {"history": run.HISTORY, "report": run.REPORT, "tensorboard": run.TENSORBOARD},
    }
    run.write_json(run.RESULTS, results)
    path = write_report(run.path) if run.main_process else run / run.REPORT
    summary["report"] = str(path)
    if comparison:
        summary["generation"] = {side: {k: v["value"] for k, v in comparison[side].items()} for side in ("base", "adapter")}
        summary["generation"]["samples"] = comparison["samples"]  # a few held-out answers, base next to adapter


def merge_at_end(config: Config, adapter_dir: Path, run: RunFolder) -> dict:
    """With artifact.merge, the standalone merged model in <run>/merged (replacing an earlier one)."""
    if not config.artifact.merge:
        return {}
    from lorafit.export.merge import merge_adapter

    report = merge_adapter(adapter_dir, run / run.MERGED, dtype=config.model.dtype, quant=config.quant, replace=True)
    return {"merged_dir": str(run / run.MERGED),
            "merge": {k: report[k] for k in ("dtype", "max_abs_logit_diff", "mean_abs_logit_diff")}}


def compare_generation(model, tokenizer, generation) -> dict | None:
    if generation is None:
        return None
    from lorafit.evaluate.run import compare_base_and_adapter

    return compare_base_and_adapter(model, tokenizer, *generation)


# ---------------------------------------------------------------------------------------------- stopped runs


class RunStopped(LorafitError):
    """The run stopped before its last step (a signal, or the non-finite guard); ``exit_code`` says why."""

    def __init__(self, what: str, *, exit_code: int, checkpoint: Path | None, **kwargs):
        super().__init__(what, **kwargs)
        self.exit_code = exit_code
        self.checkpoint = checkpoint


def raise_if_stopped(loop, stop: StopRequest, run: RunFolder) -> None:
    guard = loop.parts.guard
    newest = newest_verified(run.checkpoints)
    kept = f"the last good checkpoint is {newest}" if newest else "no checkpoint was written before it"
    if guard.tripped:
        streak = f"{guard.consecutive} step(s) in a row, " if guard.consecutive else ""
        raise RunStopped(
            f"non-finite {guard.reason} at step {guard.tripped_at} "
            f"({streak}train.nan_patience={guard.patience}); the run stopped",
            exit_code=1,
            checkpoint=newest,
            why=f"an update with NaN/Inf would destroy the adapter; {kept}",
            fix="lower train.learning_rate or set train.max_grad_norm, then resume from that checkpoint with "
            "--resume PATH --force-resume, or raise train.nan_patience to skip isolated bad steps",
        )
    if stop.signal is not None:
        import signal

        raise RunStopped(
            f"stopped by {signal.Signals(stop.signal).name} at step {loop.state.step}",
            exit_code=stop.exit_code,
            checkpoint=loop.last_checkpoint or newest,
            why=f"checkpoint saved: {loop.last_checkpoint or newest}",
            fix="run the same command with --resume auto to continue exactly where it stopped",
        )
