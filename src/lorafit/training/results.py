"""The files a run leaves beside the artifact: its metrics summary (training_summary.json's metrics),
training_results.json, report.html and data_report.json (+ skipped_rows.jsonl). Health: training/health.py;
a stopped run: training/stopping.py; the merge at the end: export/merge.py."""

from __future__ import annotations


from lorafit.config import Config
from lorafit.data import SplitStats
from lorafit.run_folder import RunFolder
from lorafit.training.callbacks import MetricsHistory, peak_memory

HEADLINE_METRICS = ("field_presence", "field_accuracy", "json_valid", "rouge_l")


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
