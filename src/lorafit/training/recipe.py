"""The training recipe: one run, read top to bottom.

    claim run folder -> tokenizer -> data -> base model (4/8-bit if asked) -> LoRA -> fingerprint the base
    -> Trainer (checkpoints, resume, signals, NaN guard) -> final eval -> check the base did not change
    -> best adapter -> publish the artifact (-> merged model) -> results + report -> summary (last)

transformers' Trainer does the loop (schedules, accumulation with token-count loss normalisation, clipping,
evaluation, trackers, and later checkpoints and accelerate-based multi-GPU); this file only wires it up.
docs/design.md says why Trainer and not TRL's SFTTrainer.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorafit.training.callbacks import MetricsHistory, peak_memory
from lorafit.training.checkpoint import (
    CHECKPOINTS,
    check_resume,
    config_hash,
    dataset_fingerprint,
    find_resume_point,
    newest_verified,
    read_history,
    read_meta,
)
from lorafit.config import Config, warmup_steps_for
from lorafit.data import SplitStats, TokenizedDataset, prepare_data, use_configured_template
from lorafit.data.collate import PadCollator
from lorafit.data.packing import PackedCollator
from lorafit.errors import LorafitError
from lorafit.training.guards import NonFiniteGuard
from lorafit.model.loading import attach_lora, count_parameters, load_base_model, load_tokenizer, resolve_model_path
from lorafit.model.quantization import (
    PackedLayoutGuard,
    check_optimizer_available,
    check_precision_supported,
    mixed_precision,
    optimizer_note,
    prepare_for_kbit_training,
    require_bitsandbytes,
)
from lorafit.artifact.publish import refuse_existing_version, write_final_artifact
from lorafit.hashing import combined_digest
from lorafit.artifact.integrity import BaseWeightCheck, require_adapter_changed, require_only_adapter_trainable
from lorafit.artifact.provenance import collect_metadata
from lorafit.artifact.result import RESULT_FILE, completed_result, failed_result, new_job_id
from lorafit.run_folder import DONE_MARKER, claim_run_dir, write_atomic, write_json
from lorafit.training.selection import BestMetric
from lorafit.training.signals import StopRequest
from lorafit.training.trainer import CheckpointSettings, LorafitTrainer

OPTIMIZERS = {"adamw": "adamw_torch", "sgd": "sgd", "paged_adamw_8bit": "paged_adamw_8bit"}


@dataclass
class TrainResult:
    """What a finished run hands back; ``training_summary.json`` holds the same."""

    run_dir: Path
    adapter_dir: Path
    metrics: dict
    data: dict = field(default_factory=dict)
    parameters: dict = field(default_factory=dict)
    report: Path | None = None
    generation: dict = field(default_factory=dict)  # {"base": {metric: value}, "adapter": {...}} on the eval sample
    best: dict = field(default_factory=dict)
    result: dict = field(default_factory=dict)


def train(config: Config, *, overwrite: bool = False, echo=None, extra_callbacks=(), allow_pickle: bool = False,
          data_cache: bool = True, resume: str | None = None, force_resume: bool = False) -> TrainResult:
    """Fine-tune ``config.model`` with a LoRA adapter on ``config.data``; returns where the artifact is.

    ``resume``: None (fresh run), "auto" (newest verified checkpoint in the run folder, fresh if none) or a
    checkpoint folder. Raises ``RunStopped`` when a signal or the non-finite guard stopped the run early.
    Every run that got as far as its run folder writes ``result.json`` there, ``status: failed`` included.
    ``data_cache=False`` re-reads and re-tokenises every source instead of using the on-disk cache.
    """
    started = time.time()
    run_dir = claim_run_dir(config.train.output_dir, overwrite=overwrite)
    # A resumed run continues the run that would have published this version (it may have been killed between
    # publishing the artifact and writing the summary), so it may replace it, atomically as always.
    republish = overwrite or resume is not None
    refuse_existing_version(run_dir, config.artifact, overwrite=republish)
    job_id = new_job_id()
    try:
        result = _train(config, run_dir, started, overwrite=overwrite, republish=republish, echo=echo, extra_callbacks=extra_callbacks,
                        allow_pickle=allow_pickle, data_cache=data_cache, resume=resume, force_resume=force_resume)
    except BaseException as error:
        write_json(run_dir / RESULT_FILE, failed_result(job_id, config, run_dir, error))
        raise
    result.result = completed_result(job_id, config, result)
    write_json(run_dir / RESULT_FILE, result.result)
    return result


def _train(config: Config, run_dir: Path, started: float, *, overwrite, republish, echo, extra_callbacks, allow_pickle,
           data_cache, resume, force_resume) -> TrainResult:
    from transformers import set_seed

    _refuse_unsupported(config)
    resume_from = find_resume_point(run_dir / CHECKPOINTS, resume, overwrite=overwrite)
    set_seed(config.train.seed)

    model_path = resolve_model_path(config.model)
    tokenizer = load_tokenizer(config.model, model_path)
    use_configured_template(tokenizer, config.data)

    prepared = prepare_data(config.data, tokenizer, seed=config.train.seed, batch_size=config.train.batch_size,
                            group_by_length=config.train.group_by_length, use_cache=data_cache)
    train_data, eval_data = prepared.train, prepared.eval
    train_stats = prepared.train_stats
    write_data_report(run_dir, prepared, echo)

    model = load_base_model(config.model, model_path, config.quant, allow_pickle=allow_pickle)
    if config.quant.bits is not None:
        model = prepare_for_kbit_training(model)
    set_seed(config.train.seed)  # adapter init draws from the RNG: same seed, same initial adapter
    model = attach_lora(model, config.lora)
    require_only_adapter_trainable(model, config.lora.modules_to_save)
    trainable, total = count_parameters(model)
    if echo:
        echo.info(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")
    base_check = BaseWeightCheck.start(model)

    identity = run_identity(config, train_data, eval_data, base_check.before)
    forced = _forced_resumes(resume_from, identity, force_resume)

    if echo and optimizer_note(config):
        echo.info(optimizer_note(config))
    history = MetricsHistory(run_dir / "metrics_history.jsonl", echo=echo.progress if echo else None)
    b = config.eval.best
    best = BestMetric(b.metric, b.resolved_mode, patience=b.patience, min_delta=b.min_delta,
                      keep_weights=b.final_adapter == "best")
    stop = StopRequest()
    guards = [PackedLayoutGuard()] if config.quant.bits == 4 else []
    trainer = build_trainer(config, model, tokenizer, train_data, eval_data, run_dir,
                            [history, best, stop, *guards, *extra_callbacks],
                            identity=identity, resume_from=resume_from, forced_resumes=forced)
    from lorafit.evaluate.run import setup_generation_eval

    generation = setup_generation_eval(config, trainer, tokenizer, prepared.eval_examples)
    trainer.callback_handler.callbacks.remove(history)  # first, so trackers log the values it derives (see on_log)
    trainer.callback_handler.callbacks.insert(0, history)
    if resume_from is not None:
        trainer.prepare_resume(resume_from)
        history.restore(read_history(resume_from), trainer.resumed_history_counters())
        if echo:
            echo.info(f"resuming from {resume_from} (step {read_meta(resume_from)['step']})")
    with offline_tracking_env(config, run_dir):
        with stop:
            if resume_from is not None and trainer.checkpoint_is_final(resume_from):
                trainer.restore_final(resume_from)  # killed after its last step: only the outputs are left to write
            else:
                trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        _raise_if_stopped(trainer, stop, run_dir)
        if len(eval_data) and not _evaluated_at(history, trainer.state.global_step):
            trainer.evaluate()
    history.close()

    base_check.finish(model)  # raises, naming the tensors, if any frozen weight changed
    require_adapter_changed(model)

    restored_best = best.restore(model) if b.final_adapter == "best" else False
    comparison = compare_generation(model, tokenizer, generation)
    metrics = summarise_metrics(history, trainer, train_stats)
    # Per split: its totals, and each source's own counts (rows used, skipped by reason) for metadata.json.
    data = {split: {**stats.as_dict(), "sources": prepared.report["sources"][split]}
            for split, stats in (("train", train_stats), ("eval", prepared.eval_stats))}
    parameters = {"trainable": trainable, "total": total}
    metadata = collect_metadata(config, model_path, tokenizer, data, parameters, base_check, started)
    adapter_dir = write_final_artifact(run_dir, model, tokenizer, config, metadata, metrics, overwrite=republish)
    merged = merge_at_end(config, adapter_dir, run_dir)  # before the summary: a failed merge leaves the run unfinished
    summary = {
        "run_dir": str(run_dir),
        "adapter_dir": str(adapter_dir),
        "base_model": model_path,
        "metrics": metrics,
        "data": prepared.report,
        "parameters": parameters,
        "base_weights_unchanged": base_check.unchanged,
        "resumed_from": str(resume_from) if resume_from else None,
        "forced_resumes": forced,
        "duration_seconds": round(time.time() - started, 2),
        "best": {**best.as_dict(), "final_adapter": "best" if restored_best else "last"},
        **merged,
    }
    write_results_and_report(run_dir, config, summary, comparison, echo)
    write_json(run_dir / DONE_MARKER, summary)
    return TrainResult(run_dir, adapter_dir, metrics, data, parameters, report=Path(summary["report"]),
                       generation=summary.get("generation", {}), best=summary["best"])


def write_data_report(run_dir: Path, prepared, echo) -> None:
    """data_report.json (per source counts, mix, padding) and skipped_rows.jsonl (every row on_error: skip left out)."""
    import json

    write_json(run_dir / "data_report.json", prepared.report | {"warnings": prepared.warnings})
    if prepared.skipped_rows:
        write_atomic(run_dir / "skipped_rows.jsonl", "".join(json.dumps(r) + "\n" for r in prepared.skipped_rows))
    if echo:
        if prepared.skipped_rows:
            echo.info(f"skipped {len(prepared.skipped_rows)} invalid rows (listed in {run_dir / 'skipped_rows.jsonl'})")
        for warning in prepared.warnings:
            echo.info(f"warning: {warning}")


def run_identity(config: Config, train_data, eval_data, frozen_digests: dict[str, str]) -> dict:
    """What a checkpoint must match to be resumed: the config, the tokenised data and the base weights."""
    config_dict = config.to_dict()
    return {
        "config": config_dict,
        "config_sha256": config_hash(config_dict),
        "fingerprints": {
            "data": {"train": dataset_fingerprint(train_data), "eval": dataset_fingerprint(eval_data)},
            "base_model": combined_digest(frozen_digests),
        },
    }


def _forced_resumes(resume_from: Path | None, identity: dict, force: bool) -> list[dict]:
    """The forced-resume records of the run so far, plus this one's if it had to be forced."""
    if resume_from is None:
        return []
    differences = check_resume(resume_from, identity, force=force)
    records = list(read_meta(resume_from).get("forced_resumes", []))
    if differences:
        records.append({"from": str(resume_from), "differences": differences})
    return records


class RunStopped(LorafitError):
    """The run stopped before its last step (a signal, or the non-finite guard); ``exit_code`` says why."""

    def __init__(self, what: str, *, exit_code: int, checkpoint: Path | None, **kwargs):
        super().__init__(what, **kwargs)
        self.exit_code = exit_code
        self.checkpoint = checkpoint


def _raise_if_stopped(trainer, stop: StopRequest, run_dir: Path) -> None:
    guard = trainer.guard
    newest = newest_verified(run_dir / CHECKPOINTS)
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
            f"stopped by {signal.Signals(stop.signal).name} at step {trainer.state.global_step}",
            exit_code=stop.exit_code,
            checkpoint=trainer.last_checkpoint or newest,
            why=f"checkpoint saved: {trainer.last_checkpoint or newest}",
            fix="run the same command with --resume auto to continue exactly where it stopped",
        )


def _refuse_unsupported(config: Config) -> None:
    if config.quant.bits is not None:
        require_bitsandbytes(f"quant.bits: {config.quant.bits}")
    check_optimizer_available(config)
    check_precision_supported(config)
    unavailable = [t for t in config.tracking.report_to if t != "tensorboard" and not _importable(t)]
    if unavailable:
        raise LorafitError(
            f"tracking.report_to: {', '.join(unavailable)} is not installed",
            fix=f"pip install {' '.join(unavailable)} (runs offline), or remove it from tracking.report_to",
        )


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def total_optimizer_steps(config: Config, num_examples: int) -> int:
    if config.train.max_steps is not None:
        return config.train.max_steps
    return math.ceil(steps_per_epoch(config, num_examples) * (config.train.epochs or 1.0))


def steps_per_epoch(config: Config, num_examples: int) -> int:
    """Optimizer steps in one pass over the data (Trainer's count: a last partial accumulation is a step)."""
    batches = math.ceil(num_examples / config.train.batch_size)
    return max(math.ceil(batches / config.train.grad_accum), 1)


def build_trainer(config: Config, model, tokenizer, train_data: TokenizedDataset, eval_data: TokenizedDataset,
                  run_dir: Path, callbacks: list, *, identity: dict | None = None, resume_from: Path | None = None,
                  forced_resumes=()):
    from transformers import TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    t, e = config.train, config.eval
    has_eval = len(eval_data) > 0
    steps = total_optimizer_steps(config, len(train_data))
    trackers = [name for name in config.tracking.report_to if name != "tensorboard"]
    packed = config.data.packing != "none"
    if packed and getattr(model.config, "use_cache", False):
        # With a KV cache transformers does not separate packed examples (lorafit/data/packing.py).
        raise LorafitError("data.packing needs the model loaded with use_cache=False", why="packed examples would attend to each other")
    if config.data.order == "curriculum":
        sampling = "sequential"  # the order prepare_data made is the curriculum
    elif packed or not t.group_by_length:
        sampling = "random"  # a packed row has no padding to save by grouping lengths
    else:
        sampling = "group_by_length"
    args = TrainingArguments(
        output_dir=str(run_dir / "checkpoints"),
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=e.batch_size or t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        num_train_epochs=t.epochs or 1.0,
        max_steps=t.max_steps or -1,
        learning_rate=t.learning_rate,
        lr_scheduler_type={"constant": "constant_with_warmup"}.get(t.scheduler, t.scheduler),
        warmup_steps=warmup_steps_for(t, steps),
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm or 0.0,
        optim=OPTIMIZERS[t.optimizer],
        seed=t.seed,
        data_seed=t.seed,
        bf16=mixed_precision(config) == "bf16",
        fp16=mixed_precision(config) == "fp16",
        activation_checkpointing=t.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        logging_strategy="steps",
        logging_steps=t.log_every,
        logging_first_step=True,
        eval_strategy="steps" if has_eval and e.every else "no",
        eval_steps=e.every if has_eval else None,
        eval_on_start=has_eval and e.at_start and resume_from is None,  # a resumed run has its start eval already
        prediction_loss_only=True,
        save_strategy="no",
        report_to=trackers or "none",
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
        train_sampling_strategy=sampling,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
        use_cpu=not torch.cuda.is_available(),
    )
    settings = CheckpointSettings(
        root=run_dir / CHECKPOINTS, save_every=t.save_every, keep_last=t.keep_last, keep_best=t.keep_best,
        best_metric=config.eval.best.metric, best_mode=config.eval.best.resolved_mode,  # one notion of "best"
        steps_per_epoch=steps_per_epoch(config, len(train_data)),
        identity=identity or {}, forced_resumes=list(forced_resumes),
    )
    trainer = LorafitTrainer(
        model=model,
        args=args,
        train_dataset=train_data,
        eval_dataset=eval_data if has_eval else None,
        data_collator=PackedCollator() if packed else PadCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=callbacks,
        settings=settings,
        guard=NonFiniteGuard(t.nan_patience),
        history=_history_in(callbacks),
        stateful=callbacks,
    )
    # lorafit prints its own progress lines (MetricsHistory echo); Trainer's would duplicate them.
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if "tensorboard" in config.tracking.report_to:
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback

        # purge_step: a resumed run drops the events the killed run logged after its checkpoint
        purge = read_meta(resume_from)["step"] + 1 if resume_from else None
        trainer.add_callback(TensorBoardCallback(SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=purge)))
    return trainer


def _history_in(callbacks: list) -> MetricsHistory:
    """Checkpoints carry the metrics so far, so a trainer is always built with a MetricsHistory among its callbacks."""
    for callback in callbacks:
        if isinstance(callback, MetricsHistory):
            return callback
    raise ValueError("build_trainer needs a MetricsHistory among its callbacks (checkpoints save the metrics so far)")


def _evaluated_at(history: MetricsHistory, step: int) -> bool:
    records = history.records + ([history._pending] if history._pending else [])
    return any(r["step"] == step and "eval_loss" in r for r in records)


def summarise_metrics(history: MetricsHistory, trainer, train_stats: SplitStats) -> dict:
    records = history.records
    train_losses = [r["loss"] for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    metrics: dict = {
        "steps": trainer.state.global_step,
        "epochs": round(trainer.state.epoch or 0.0, 4),
        "train_loss_first": train_losses[0] if train_losses else None,
        "train_loss_final": train_losses[-1] if train_losses else None,
        "train_seconds": round(history.train_seconds, 2),
        "tokens_seen": int(trainer.state.num_input_tokens_seen),
        "tokens_per_second": round(history.tokens_per_second(trainer.state) or 0.0, 1),
    }
    if history.supervised_tokens_per_second():
        metrics["supervised_tokens_per_second"] = round(history.supervised_tokens_per_second(), 1)
    metrics["supervised_tokens_seen"] = history.supervised_tokens
    metrics.update(peak_memory())
    if evals:
        best_step, best = min(evals, key=lambda item: item[1])
        first, final = evals[0][1], evals[-1][1]
        metrics.update(
            eval_loss_first=first,
            eval_loss_final=final,
            eval_loss_best=best,
            eval_best_step=best_step,
            eval_perplexity_first=math.exp(min(first, 50.0)),
            eval_perplexity_final=math.exp(min(final, 50.0)),
            eval_loss_reduction=(first - final) / first if first else None,
        )
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


def compare_generation(model, tokenizer, generation) -> dict | None:
    if generation is None:
        return None
    from lorafit.evaluate.run import compare_base_and_adapter

    return compare_base_and_adapter(model, tokenizer, *generation)


class offline_tracking_env:
    """MLflow and W&B write into the run folder with no network, unless the user's environment says otherwise.

    Variables are set only for the run and restored after, so runs in one process do not leak into each other.
    """

    def __init__(self, config: Config, run_dir: Path):
        wanted = {}
        if "mlflow" in config.tracking.report_to:
            # MLflow 3.x refuses its file store unless allowed; the database store would need SQLAlchemy and a server
            # is network: a folder in the run is what "local" means here.
            wanted |= {"MLFLOW_TRACKING_URI": (run_dir / "mlruns").as_uri(), "MLFLOW_EXPERIMENT_NAME": config.artifact.name,
                       "MLFLOW_ALLOW_FILE_STORE": "true"}
        if "wandb" in config.tracking.report_to:
            wanted |= {"WANDB_MODE": "offline", "WANDB_DIR": str(run_dir), "WANDB_PROJECT": config.artifact.name,
                       "WANDB_SILENT": "true"}
        self.wanted = wanted
        self.saved: dict[str, str | None] = {}

    def __enter__(self):
        import os

        for key, value in self.wanted.items():
            if key not in os.environ:
                self.saved[key] = None
                os.environ[key] = value
        return self

    def __exit__(self, *exc):
        import os

        for key in self.saved:
            os.environ.pop(key, None)
        return False


HEADLINE_METRICS = ("field_presence", "field_accuracy", "json_valid", "rouge_l")


def write_results_and_report(run_dir: Path, config: Config, summary: dict, comparison: dict | None, echo) -> None:
    """training_results.json (everything) and report.html; both before the summary, which is written last."""
    import datetime
    import platform

    import peft
    import transformers

    from lorafit.evaluate.report import RESULTS_FILE, write_report

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
        "files": {"history": "metrics_history.jsonl", "report": "report.html", "tensorboard": "tensorboard"},
    }
    write_json(run_dir / RESULTS_FILE, results)
    path = write_report(run_dir)
    summary["report"] = str(path)
    if comparison:
        summary["generation"] = {side: {k: v["value"] for k, v in comparison[side].items()} for side in ("base", "adapter")}


def merge_at_end(config: Config, adapter_dir: Path, run_dir: Path) -> dict:
    """With artifact.merge, the standalone merged model in <run>/merged (replacing an earlier one)."""
    if not config.artifact.merge:
        return {}
    from lorafit.export.merge import merge_adapter

    report = merge_adapter(adapter_dir, run_dir / "merged", dtype=config.model.dtype, quant=config.quant, replace=True)
    return {"merged_dir": str(run_dir / "merged"),
            "merge": {k: report[k] for k in ("dtype", "max_abs_logit_diff", "mean_abs_logit_diff")}}
