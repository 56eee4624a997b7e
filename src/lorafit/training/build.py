"""Building the Trainer of a run: TrainingArguments from the config, the step counts, the callbacks in order."""

from __future__ import annotations

import math

import torch

from lorafit.config import Config, warmup_steps_for
from lorafit.data import TokenizedDataset
from lorafit.data.collate import PadCollator
from lorafit.data.packing import packed_collator
from lorafit.data.preference import PreferenceCollator
from lorafit.data.triplets import TripletCollator
from lorafit.errors import LorafitError
from lorafit.run_folder import RunFolder
from lorafit.training.callbacks import MetricsHistory, ordered_callbacks
from lorafit.training.checkpoint import read_meta
from lorafit.training.distributed import check_strategy_can_run, require_strategy_active, strategy_arguments
from lorafit.training.guards import BestMetric, NonFiniteGuard, StopRequest
from lorafit.training.hooks import CheckpointSettings, LorafitTrainer
from lorafit.training.optimizer import LearningRates
from lorafit.training.source_loss import source_losses_for

OPTIMIZERS = {"adamw": "adamw_torch", "sgd": "sgd", "paged_adamw_8bit": "paged_adamw_8bit"}


def total_optimizer_steps(config: Config, num_examples: int) -> int:
    if config.train.max_steps is not None:
        return config.train.max_steps
    return math.ceil(steps_per_epoch(config, num_examples) * (config.train.epochs or 1.0))


def steps_per_epoch(config: Config, num_examples: int) -> int:
    """Optimizer steps in one pass over the data (Trainer's count: a last partial accumulation is a step)."""
    batches = math.ceil(num_examples / config.train.batch_size)
    return max(math.ceil(batches / config.train.grad_accum), 1)


def _sampling(config: Config) -> str:
    if config.data.order == "curriculum":
        return "sequential"  # the order prepare_data made is the curriculum
    if config.data.packing != "none" or not config.train.group_by_length:
        return "random"  # a packed row has no padding to save by grouping lengths
    return "group_by_length"


def training_arguments(config: Config, run: RunFolder, *, has_eval: bool, total_steps: int, resuming: bool):
    from transformers import TrainingArguments

    from lorafit.model.quantization import mixed_precision

    check_strategy_can_run(config)
    t, e = config.train, config.eval
    return TrainingArguments(
        output_dir=str(run.checkpoints),
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=e.batch_size or t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        num_train_epochs=t.epochs or 1.0,
        max_steps=t.max_steps or -1,
        learning_rate=t.learning_rate,
        lr_scheduler_type={"constant": "constant_with_warmup"}.get(t.scheduler, t.scheduler),
        warmup_steps=warmup_steps_for(t, total_steps),
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
        # Trainer's filter reads every micro-batch's loss on the host (two syncs each); lorafit's NonFiniteGuard
        # sees non-finite losses on the device and skips the step instead (training/guards.py).
        logging_nan_inf_filter=False,
        eval_strategy="steps" if has_eval and e.every else "no",
        eval_steps=e.every if has_eval else None,
        eval_on_start=has_eval and e.at_start and not resuming,  # a resumed run has its start eval already
        prediction_loss_only=True,
        save_strategy="no",  # lorafit's SaveSchedule asks for checkpoints; LorafitTrainer writes them
        report_to="none",  # tracker callbacks are created in ordered_callbacks' order (training/tracking.py)
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
        train_sampling_strategy=_sampling(config),
        remove_unused_columns=False,
        dataloader_num_workers=0,
        **strategy_arguments(config),  # ddp_find_unused_parameters=False and the fsdp/deepspeed plugin arguments
        use_cpu=not torch.cuda.is_available(),
        torch_empty_cache_steps=t.empty_cache_every,
    )


def build_trainer(config: Config, model, tokenizer, train_data: TokenizedDataset, eval_data: TokenizedDataset,
                  run: RunFolder, history: MetricsHistory, *, identity: dict | None = None, resume_from=None,
                  forced_resumes=(), best: BestMetric | None = None, stop: StopRequest | None = None, guards=(),
                  progress=None, user_callbacks=(), generation=None, objective=None) -> LorafitTrainer:
    """The Trainer with lorafit's hooks and every callback of the run in one explicit order (best/stop default
    to the config's; pass them to read their outcome after training). ``generation``: the eval sample answered for
    generation metrics during training (``evaluate.run.generation_sample``), or None."""
    from transformers.trainer_callback import PrinterCallback

    from lorafit.training.tracking import tracker_callbacks

    has_eval = len(eval_data) > 0
    packed = config.data.packing != "none"
    if packed and getattr(model.config, "use_cache", False):
        # With a KV cache transformers does not separate packed examples (lorafit/data/packing.py).
        raise LorafitError("data.packing needs the model loaded with use_cache=False", why="packed examples would attend to each other")
    b = config.eval.best
    best = best or BestMetric(b.metric, b.resolved_mode, patience=b.patience, min_delta=b.min_delta,
                              keep_weights=b.final_adapter == "best")
    stop = stop or StopRequest()
    guard = NonFiniteGuard(config.train.nan_patience)
    per_epoch = steps_per_epoch(config, len(train_data))
    args = training_arguments(config, run, has_eval=has_eval, total_steps=total_optimizer_steps(config, len(train_data)),
                              resuming=resume_from is not None)
    settings = CheckpointSettings(
        root=run.checkpoints, save_every=config.train.save_every, keep_last=config.train.keep_last,
        keep_best=config.train.keep_best, best_metric=b.metric, best_mode=b.resolved_mode,  # one notion of "best"
        steps_per_epoch=per_epoch, identity=identity or {}, forced_resumes=list(forced_resumes),
    )
    kind = "sft" if objective is None else objective.objective.data
    per_source = None if kind != "sft" else source_losses_for(config, objective is not None and objective.active)
    if kind == "triplets":
        collator = TripletCollator(tokenizer.pad_token_id)
    elif kind == "preference":
        collator = PreferenceCollator(tokenizer.pad_token_id)
    else:
        attn = model.config._attn_implementation or "sdpa"
        with_sources = per_source is not None
        collator = (packed_collator(config.data.packing, attn, tokenizer.pad_token_id, with_sources) if packed
                    else PadCollator(tokenizer.pad_token_id, with_sources))
    trainer = LorafitTrainer(
        model=model, args=args, train_dataset=train_data, eval_dataset=eval_data if has_eval else None,
        data_collator=collator, processing_class=tokenizer, settings=settings, guard=guard, history=history,
        stateful=[best, *(part for part in (objective, per_source) if part is not None)], objective=objective,
        rates=LearningRates.from_config(config), source_losses=per_source,
    )
    require_strategy_active(config, trainer)
    # From here on the Trainer's (accelerate's) own view decides which process writes run files.
    run.main_process = trainer.is_world_process_zero()
    # lorafit prints its own progress lines (training/progress.py); Trainer's would duplicate them.
    trainer.remove_callback(PrinterCallback)
    purge = read_meta(resume_from)["step"] + 1 if resume_from else None
    for callback in ordered_callbacks(
        trainer, history=history, best=best, stop=stop, guards=[guard, *guards], save_every=config.train.save_every,
        generation=generation_callback(config, trainer, tokenizer, generation),
        trackers=tracker_callbacks(config, run, purge_step=purge), progress=progress, user=user_callbacks,
    ):
        trainer.add_callback(callback)
    return trainer


def generation_callback(config: Config, trainer, tokenizer, sample):
    """Logs generation metrics on the fixed eval sample every eval.generate_every evaluations (None when off)."""
    if sample is None or not config.eval.generate_every:
        return None
    from lorafit.evaluate.run import GenerationEval

    return GenerationEval(trainer, tokenizer, *sample, config.eval.generate_every)
