"""The training recipe: one run, read top to bottom.

    claim run folder -> objective -> tokenizer -> data -> base model (4/8-bit if asked) -> LoRA -> fingerprint the
    base -> the loop (training/loop.py) -> train -> final eval -> check the base did not change -> best adapter
    -> health -> publish the artifact (-> merged model) -> results + report -> summary (last)

Every optimizer step is in training/loop.py (lorafit's own loop on accelerate); what the run leaves behind is in
training/results.py (and training/health.py). docs/design.md says why the loop is lorafit's and not transformers' Trainer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from lorafit.artifact.integrity import BaseWeightCheck, require_adapter_changed, require_only_adapter_trainable
from lorafit.artifact.provenance import collect_metadata
from lorafit.artifact.publish import refuse_existing_version, write_final_artifact
from lorafit.artifact.result import completed_result, failed_result, new_job_id
from lorafit.config import Config
from lorafit.data import use_configured_template
from lorafit.data.prepare import row_kind
from lorafit.evaluate.comparison import compare_base_and_adapter, generation_sample
from lorafit.export.merge import merge_at_end
from lorafit.hashing import combined_digest
from lorafit.model.kernels import LIGER_MARK
from lorafit.model.loading import (attach_lora, count_parameters, load_base_model, load_tokenizer, resolve_model_path,
                                   with_resolved_dtype)
from lorafit.model.quantization import (check_optimizer_available, check_precision_supported, optimizer_note,
                                        prepare_for_kbit_training, require_bitsandbytes)
from lorafit.run_folder import RunFolder
from lorafit.training.best_step import BestMetric
from lorafit.training.callbacks import MetricsHistory
from lorafit.training.checkpoint import (check_resume, config_hash, dataset_fingerprint, find_resume_point,
                                         read_meta, require_format)
from lorafit.training.strategy import (barrier, check_strategy_can_run, init_processes, main_process_first,
                                          require_same_world_size, unshard_for_outputs)
from lorafit.training.guards import NonFiniteGuard
from lorafit.training.health import assess_health, diverged_advice
from lorafit.training.memory_record import memory_summary, predict_for_run
from lorafit.training.results import summarise_metrics, write_data_report, write_results_and_report
from lorafit.training.run_setup import (apply_dropout_policy, attack_comparison, build_loop, objective_for,
                                        prepare_run_data)
from lorafit.training.stopping import RunStopped, StopRequest, raise_if_stopped  # noqa: F401  (RunStopped: callers)
from lorafit.training.tracking import offline_tracking_env


@dataclass
class TrainResult:
    """What a finished run hands back; ``training_summary.json`` holds the same."""

    run_dir: Path
    adapter_dir: Path | None
    metrics: dict
    data: dict = field(default_factory=dict)
    parameters: dict = field(default_factory=dict)
    report: Path | None = None
    generation: dict = field(default_factory=dict)  # {"base": {metric: value}, "adapter": {...}, "samples": [...]}
    best: dict = field(default_factory=dict)
    result: dict = field(default_factory=dict)
    health: dict = field(default_factory=dict)  # assess_health: status "ok" or "diverged", and why
    warnings: list = field(default_factory=list)
    attack: dict = field(default_factory=dict)  # attack success rate, base vs adapter (triplet data)
    dry_run: dict | None = None  # with dry_run=True: what the check did, and the memory the largest batch took


def train(config: Config, *, overwrite: bool = False, progress=True, callbacks=(), extra_callbacks=(),
          allow_pickle: bool = False, data_cache: bool = True, resume: str | None = None, force_resume: bool = False,
          dry_run: bool = False) -> TrainResult:
    """Fine-tune ``config.model`` with a LoRA adapter on ``config.data``; returns where the artifact is.

    ``progress``: True prints one line per log step (a ``Progress``), False is silent, or pass your own Progress.
    ``callbacks``: ``LorafitCallback`` instances (training/callbacks.py) that see every step, evaluation and save
    (``extra_callbacks`` is the older name, kept).
    ``resume``: None (fresh run), "auto" (newest verified checkpoint in the run folder, fresh if none) or a
    checkpoint folder. Raises ``RunStopped`` when a signal or the non-finite guard stopped the run early.
    ``dry_run``: every check up to the first optimizer step, then stop; no artifact, no checkpoint.
    Every run that got as far as its run folder writes ``result.json`` there, ``status: failed`` included.
    ``data_cache=False`` re-reads and re-tokenises every source instead of using the on-disk cache.
    """
    from lorafit.training.progress import Progress

    started = time.time()
    init_processes(config)  # under a launcher: join the process group before anything waits on it
    config = with_resolved_dtype(config)  # model.dtype: auto -> bf16 or fp32, once, for every later step
    progress = Progress() if progress is True else (progress or None)
    notes: list[str] = []
    run = RunFolder.claim(config.train.output_dir, overwrite=overwrite, notes=notes)  # locked: one run per folder
    try:  # the folder's lock is given back however the run ends (a killed process drops it too)
        # A resumed run continues the run that would have published this version (it may have been killed between
        # publishing the artifact and writing the summary), so it may replace it, atomically as always.
        republish = overwrite or resume is not None
        refuse_existing_version(run.path, config.artifact, overwrite=republish)
        job_id = new_job_id()
        try:
            result = _train(config, run, started, notes=notes, progress=progress, user=[*extra_callbacks, *callbacks],
                            overwrite=overwrite, republish=republish, allow_pickle=allow_pickle, data_cache=data_cache,
                            resume=resume, force_resume=force_resume, dry_run=dry_run)
        except BaseException as error:
            if not dry_run:
                run.write_json(run.RESULT, failed_result(job_id, config, run.path, error))
            raise
        finally:
            if progress is not None:
                progress.close()  # also when training raised: give the terminal back here
        if not dry_run:
            result.result = completed_result(job_id, config, result)
            run.write_json(run.RESULT, result.result)
        return result
    finally:
        run.release()


# Long on purpose: this is the run, read top to bottom; each step is a call into the module that owns it.
def _train(config: Config, run: RunFolder, started: float, *, notes, progress, user, overwrite, republish,
           allow_pickle, data_cache, resume, force_resume, dry_run) -> TrainResult:
    from transformers import set_seed

    def say(message: str) -> None:
        if progress is not None:
            progress.info(message)

    def warn(message: str) -> None:
        notes.append(message)
        say(f"warning: {message}")

    for note in list(notes):  # from claiming the run folder
        say(f"warning: {note}")
    _refuse_unsupported(config)
    objective, user = objective_for(config, user)
    with main_process_first():  # it may delete cut-short saves (or, with --overwrite, every checkpoint)
        resume_from = None if dry_run else find_resume_point(run.checkpoints, resume, overwrite=overwrite)
    if resume_from is not None:
        require_format(resume_from)
        require_same_world_size(resume_from, read_meta(resume_from).get("world_size", 1))
    set_seed(config.train.seed)

    model_path = resolve_model_path(config.model)
    if config.model.trust_remote_code:
        warn(f"model.trust_remote_code is true: Python code shipped in {model_path} runs with your permissions")
    tokenizer = load_tokenizer(config.model, model_path)
    use_configured_template(tokenizer, config.data)

    with main_process_first():  # the main process fills the data cache, the others read it
        prepared = prepare_run_data(config, tokenizer, objective, use_cache=data_cache)
    train_data, eval_data = prepared.train, prepared.eval
    write_data_report(run, prepared, say)
    memory = predict_for_run(config, prepared, row_kind(config, objective), say)

    model = _model_with_adapter(config, model_path, allow_pickle)
    if len(config.data.train) > 1 and getattr(model, LIGER_MARK, None) == "liger":
        warn("no loss/<source> per training source: liger's fused loss computes no logits to split "
             "(model.kernels: none keeps them, at the fused loss's memory cost)")
    trainable, total = count_parameters(model)
    say(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")
    if apply_dropout_policy(config, model):
        say(f"dropout off for objective.type: {config.objective.type}, as TRL trains it "
            "(objective.disable_dropout: false keeps lora.dropout)")
    if dry_run:
        from lorafit.training.dry_run import largest_batch_step

        checked = largest_batch_step(config, model, tokenizer, train_data, objective)
        return TrainResult(run.path, None, {}, parameters={"trainable": trainable, "total": total},
                           warnings=notes, dry_run=checked)
    base_check = BaseWeightCheck.start(model)

    identity = run_identity(config, train_data, eval_data, base_check.before)
    forced = _forced_resumes(resume_from, identity, force_resume)
    if optimizer_note(config):
        say(optimizer_note(config))

    history = MetricsHistory(run, perplexity_of="eval_loss" if objective.data == "sft" else "eval_task_loss")
    b = config.eval.best
    best = BestMetric(b.metric, b.resolved_mode, patience=b.patience, min_delta=b.min_delta,
                      keep_weights=b.final_adapter == "best")
    stop = StopRequest()
    # The eval sample answered during training and by base vs adapter: SFT rows only. Triplet data is checked by
    # the attack success rate instead, preference pairs by their rewards on the eval pairs.
    sample = generation_sample(config, prepared.eval_examples) if objective.data == "sft" else None
    from torch.autograd import set_detect_anomaly  # a context manager; restores the mode afterwards

    # The trackers read MLFLOW_*/WANDB_* when they are built: the run-folder defaults must be in place first.
    with offline_tracking_env(config, run):
        loop = build_loop(config, model, tokenizer, objective, prepared, run, history=history, best=best, stop=stop,
                          guard=NonFiniteGuard(config.train.nan_patience), callbacks=user, progress=progress,
                          generation=sample, identity=identity, forced_resumes=forced, resume_from=resume_from)
        if resume_from is not None:
            say(f"resuming from {resume_from} (step {loop.state.step})")
        try:
            with stop, set_detect_anomaly(config.debug.detect_anomaly, check_nan=True):
                loop.fit(evaluate_at_start=config.eval.at_start and resume_from is None)
            raise_if_stopped(loop, stop, run)
            if len(eval_data) and not history.evaluated_at(loop.state.step):
                loop.evaluate()
        finally:
            loop.parts.trackers.close()
    history.close()
    unshard_for_outputs(loop.wrapped, loop.accelerator)  # FSDP/ZeRO-3: every process holds the whole model again

    base_check.finish(model)  # raises, naming the tensors, if any frozen weight changed
    require_adapter_changed(model)

    restored_best = best.restore(model) if b.final_adapter == "best" else False
    comparison = compare_base_and_adapter(model, tokenizer, *sample) if sample else None
    attack = attack_comparison(config, model, tokenizer, objective, prepared.eval_examples)
    metrics = summarise_metrics(history, loop, prepared.train_stats)
    health = assess_health(history.records, getattr(model.config, "vocab_size", None), trace=loop.window.trace,
                           zero_gradients_expected=objective.data == "prompts")
    metrics["health"] = health["status"]
    if health["status"] != "ok":
        warn(diverged_advice(health))
    # Per split: its totals, and each source's own counts (rows used, skipped by reason) for metadata.json.
    data = {split: {**stats.as_dict(), "sources": prepared.report["sources"][split]}
            for split, stats in (("train", prepared.train_stats), ("eval", prepared.eval_stats))}
    parameters = {"trainable": trainable, "total": total}
    metadata = collect_metadata(config, model_path, tokenizer, data, parameters, base_check, started, health=health)
    if not run.main_process:  # the main process publishes; the others only trained alongside it, and wait
        barrier()
        return TrainResult(run.path, run.artifact_dir(config.artifact.name, config.artifact.version), metrics,
                           data, parameters, health=health, warnings=notes)
    adapter_dir = write_final_artifact(run.path, model, tokenizer, config, metadata, metrics, overwrite=republish)
    merged = merge_at_end(config, adapter_dir, run)  # before the summary: a failed merge leaves the run unfinished
    summary = {
        "run_dir": str(run.path),
        "adapter_dir": str(adapter_dir),
        "base_model": model_path,
        "metrics": metrics,
        "health": health,
        "warnings": notes,
        "data": prepared.report,
        "parameters": parameters,
        "base_weights_unchanged": base_check.unchanged,
        "resumed_from": str(resume_from) if resume_from else None,
        "forced_resumes": forced,
        "duration_seconds": round(time.time() - started, 2),
        "memory": memory_summary(memory, metrics),
        "best": {**best.as_dict(), "final_adapter": "best" if restored_best else "last"},
        **({"attack": attack} if attack else {}),
        **merged,
    }
    write_results_and_report(run, config, summary, comparison)
    run.write_json(run.SUMMARY, summary)
    barrier()
    return TrainResult(run.path, adapter_dir, metrics, data, parameters, report=Path(summary["report"]),
                       generation=summary.get("generation", {}), best=summary["best"], health=health, warnings=notes,
                       attack=attack or {})


def _model_with_adapter(config: Config, model_path: str, allow_pickle: bool):
    """The base model (prepared for k-bit training when quantized) with a freshly initialised LoRA adapter."""
    from transformers import set_seed

    model = load_base_model(config.model, model_path, config.quant, allow_pickle=allow_pickle,
                            sharded=config.distributed.strategy == "fsdp")
    if config.quant.bits is not None:
        model = prepare_for_kbit_training(model)
    set_seed(config.train.seed)  # adapter init draws from the RNG: same seed, same initial adapter
    model = attach_lora(model, config.lora)
    require_only_adapter_trainable(model, config.lora.modules_to_save)
    return model


def run_identity(config: Config, train_data, eval_data, frozen_digests: dict[str, str]) -> dict:
    """What a checkpoint must match to be resumed: the config, the tokenised data and the base weights.

    ``resume_config_sha256`` hashes only the resume-relevant keys (checkpoint.RESUME_IGNORED left out); it differs
    from metadata.json's ``config_sha256``, the hash of the whole resolved config (docs/resume.md)."""
    config_dict = config.to_dict()
    return {
        "config": config_dict,
        "resume_config_sha256": config_hash(config_dict),
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


def _refuse_unsupported(config: Config) -> None:
    if config.quant.bits is not None:
        require_bitsandbytes(f"quant.bits: {config.quant.bits}")
    check_optimizer_available(config)
    check_precision_supported(config)
    check_strategy_can_run(config)  # before the data and the model are loaded: FSDP/DeepSpeed need GPUs and a launcher
