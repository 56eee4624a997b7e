"""The training recipe: one run, read top to bottom.

    claim run folder -> tokenizer -> data -> base model -> LoRA -> Trainer -> train -> final eval
    -> check the base did not change -> write adapter, config, metrics, summary (summary last)

transformers' Trainer does the loop (schedules, accumulation with token-count loss normalisation, clipping,
evaluation, trackers, and later checkpoints and accelerate-based multi-GPU); this file only wires it up.
docs/design.md says why Trainer and not TRL's SFTTrainer.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorafit.callbacks import MetricsHistory
from lorafit.config import Config, warmup_steps_for
from lorafit.data import SplitStats, TokenizedDataset, prepare_split
from lorafit.data.collate import PadCollator
from lorafit.data.labels import require_chat_template
from lorafit.errors import LorafitError
from lorafit.eval_isolation import IsolatedEvalTrainer
from lorafit.modeling import attach_lora, count_parameters, load_base_model, load_tokenizer, resolve_model_path
from lorafit.quantization import (
    PackedLayoutGuard,
    check_optimizer_available,
    check_precision_supported,
    mixed_precision,
    optimizer_note,
    prepare_for_kbit_training,
    require_bitsandbytes,
)
from lorafit.run_files import DONE_MARKER, claim_run_dir, move_files_into, staging_dir, write_atomic, write_json

OPTIMIZERS = {"adamw": "adamw_torch", "sgd": "sgd", "paged_adamw_8bit": "paged_adamw_8bit"}


@dataclass
class TrainResult:
    """What a finished run hands back; ``training_summary.json`` holds the same."""

    run_dir: Path
    adapter_dir: Path
    metrics: dict
    data: dict = field(default_factory=dict)
    parameters: dict = field(default_factory=dict)


def train(config: Config, *, overwrite: bool = False, echo=None, extra_callbacks=()) -> TrainResult:
    """Fine-tune ``config.model`` with a LoRA adapter on ``config.data``; returns where the adapter is."""
    from transformers import set_seed

    started = time.time()
    run_dir = claim_run_dir(config.train.output_dir, overwrite=overwrite)
    _refuse_unsupported(config)
    set_seed(config.train.seed)

    model_path = resolve_model_path(config.model)
    tokenizer = load_tokenizer(config.model, model_path)
    require_chat_template(tokenizer, model_path)

    train_data, train_stats = prepare_split(
        config.data.train, tokenizer, config.data, train_on_inputs=config.train.train_on_inputs, split="train"
    )
    eval_data, eval_stats = prepare_split(
        config.data.eval, tokenizer, config.data, train_on_inputs=config.train.train_on_inputs, split="eval"
    )

    model = load_base_model(config.model, model_path, config.quant)
    if config.quant.bits is not None:
        model = prepare_for_kbit_training(model)
    set_seed(config.train.seed)  # adapter init draws from the RNG: same seed, same initial adapter
    model = attach_lora(model, config.lora)
    trainable, total = count_parameters(model)
    if echo:
        echo.info(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")
    frozen_before = frozen_weight_digests(model)

    if echo and optimizer_note(config):
        echo.info(optimizer_note(config))
    history = MetricsHistory(run_dir / "metrics_history.jsonl", echo=echo.progress if echo else None)
    guards = [PackedLayoutGuard()] if config.quant.bits == 4 else []
    trainer = build_trainer(config, model, tokenizer, train_data, eval_data, run_dir, [history, *guards, *extra_callbacks])
    trainer.train()
    if len(eval_data) and not _evaluated_at(history, trainer.state.global_step):
        trainer.evaluate()
    history.close()

    changed = [name for name, digest in frozen_weight_digests(model).items() if frozen_before.get(name) != digest]
    if changed:
        raise LorafitError(
            f"base weights changed during training: {', '.join(changed[:10])}",
            why="only adapter weights may train; a changed base means the adapter is not valid for the base you ship",
        )

    metrics = summarise_metrics(history, trainer, train_stats)
    summary = {
        "run_dir": str(run_dir),
        "adapter_dir": str(run_dir),
        "base_model": config.model.path,
        "metrics": metrics,
        "data": {"train": train_stats.as_dict(), "eval": eval_stats.as_dict()},
        "parameters": {"trainable": trainable, "total": total},
        "base_weights_unchanged": True,
        "duration_seconds": round(time.time() - started, 2),
    }
    write_outputs(run_dir, model, tokenizer, config, summary)
    return TrainResult(run_dir, run_dir, metrics, summary["data"], summary["parameters"])


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


def frozen_weight_digests(model) -> dict[str, str]:
    """sha256 of every frozen tensor's bytes: the proof that training touched only the adapter."""
    digests = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            tensor = param.detach().contiguous().cpu()
            digests[name] = hashlib.sha256(tensor.view(torch.uint8).numpy().tobytes()).hexdigest()
    return digests


def total_optimizer_steps(config: Config, num_examples: int) -> int:
    if config.train.max_steps is not None:
        return config.train.max_steps
    batches = math.ceil(num_examples / config.train.batch_size)
    per_epoch = max(math.ceil(batches / config.train.grad_accum), 1)
    return math.ceil(per_epoch * (config.train.epochs or 1.0))


def build_trainer(config: Config, model, tokenizer, train_data: TokenizedDataset, eval_data: TokenizedDataset,
                  run_dir: Path, callbacks: list):
    from transformers import TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    t, e = config.train, config.eval
    has_eval = len(eval_data) > 0
    steps = total_optimizer_steps(config, len(train_data))
    trackers = [name for name in config.tracking.report_to if name != "tensorboard"]
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
        eval_on_start=has_eval and e.at_start,
        prediction_loss_only=True,
        save_strategy="no",
        report_to=trackers or "none",
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = IsolatedEvalTrainer(
        model=model,
        args=args,
        train_dataset=train_data,
        eval_dataset=eval_data if has_eval else None,
        data_collator=PadCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    # lorafit prints its own progress lines (MetricsHistory echo); Trainer's would duplicate them.
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if "tensorboard" in config.tracking.report_to:
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback

        trainer.add_callback(TensorBoardCallback(SummaryWriter(log_dir=str(run_dir / "tensorboard"))))
    return trainer


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
    if history.train_seconds and train_stats.tokens:
        share = train_stats.supervised_tokens / train_stats.tokens
        metrics["supervised_tokens_per_second"] = round(metrics["tokens_per_second"] * share, 1)
    if evals:
        best_step, best = min(evals, key=lambda item: item[1])
        first, final = evals[0][1], evals[-1][1]
        metrics.update(
            eval_loss_first=first,
            eval_loss_final=final,
            eval_loss_best=best,
            eval_best_step=best_step,
            eval_perplexity_final=math.exp(min(final, 50.0)),
            eval_loss_reduction=(first - final) / first if first else None,
        )
    return metrics


def write_outputs(run_dir: Path, model, tokenizer, config: Config, summary: dict) -> None:
    """Adapter + tokenizer into a staging folder, then renamed into the run folder; the summary goes last."""
    staging = staging_dir(run_dir, "adapter")
    model.save_pretrained(staging)
    (staging / "README.md").unlink(missing_ok=True)  # peft's placeholder card; lorafit's own card comes with artifacts
    tokenizer.save_pretrained(staging)
    move_files_into(staging, run_dir)
    write_atomic(run_dir / "training_config.yaml", config.to_yaml())
    if config.artifact.merge:
        from lorafit.merge import merge_adapter

        # Before the summary: a run whose merge failed must not look finished.
        report = merge_adapter(run_dir, run_dir / "merged", dtype=config.model.dtype, quant=config.quant, replace=True)
        summary["merged_dir"] = str(run_dir / "merged")
        summary["merge"] = {k: report[k] for k in ("dtype", "max_abs_logit_diff", "mean_abs_logit_diff")}
    write_json(run_dir / DONE_MARKER, summary)
