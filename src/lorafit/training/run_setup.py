"""The pieces the recipe assembles before the loop starts: the objective and the plugin callbacks, the data the
objective trains on, the collator of its batches, the loop with its bookkeeping, and the attack comparison after
training. Each is one call in training/recipe.py."""

from __future__ import annotations

from lorafit.config import Config
from lorafit.errors import LorafitError


def objective_for(config: Config, user_callbacks) -> tuple:
    """The run's objective and its callbacks: the user's, then those named in ``plugins.callbacks``
    (instantiated). Plugins are imported here, before any data or model is loaded, so a wrong path fails the run at
    once; an object that is not a LorafitCallback is refused with the replacement."""
    from lorafit.training.callbacks import LorafitCallback, check_callbacks
    from lorafit.training.objectives import SupervisedObjective, build_objective
    from lorafit.training.plugins import load_plugin
    from lorafit.training.source_loss import source_names

    plugins = config.plugins
    if config.objective.type == "grpo":  # its reward plugins are imported here too, before any data or model
        from lorafit.training.grpo import GRPOObjective
        from lorafit.training.rewards import build_rewards

        rewards = build_rewards(config.objective.grpo, eval_config=config.eval, config_dir=config.objective.config_dir,
                                allow_external_code=plugins.allow_external_code)
        objective = GRPOObjective(config.objective.grpo, rewards, seed=config.train.seed)
    else:
        objective = build_objective(config.objective, allow_external_code=plugins.allow_external_code)
    if type(objective) is SupervisedObjective and len(config.data.train) > 1:
        objective = SupervisedObjective(source_names([s.path for s in config.data.train]))  # loss/<source>
    loaded = [load_plugin(spec, base=LorafitCallback, field=f"plugins.callbacks[{i}]", config_dir=plugins.config_dir,
                          allow_external_code=plugins.allow_external_code)()
              for i, spec in enumerate(plugins.callbacks)]
    return objective, check_callbacks([*user_callbacks, *loaded])


def prepare_run_data(config: Config, tokenizer, objective, *, use_cache: bool):
    """The rows the objective trains on, through the one data entry (data/prepare.py). An objective that makes or
    pairs rows during training gets the tokenizer (``use_tokenizer``); GRPO's built-in rewards check every row has
    what they compare against."""
    from lorafit.data import prepare

    if hasattr(objective, "use_tokenizer"):
        objective.use_tokenizer(tokenizer)
    prepared = prepare.prepare(config, tokenizer, kind=prepare.row_kind(config, objective), use_cache=use_cache)
    if objective.data == "prompts":
        from lorafit.training.rewards import check_rows

        check_rows(getattr(objective, "rewards", []), [*prepared.train_examples, *prepared.eval_examples],
                   citation_pattern=config.eval.citation_pattern)
    return prepared


def collator_for(config: Config, objective, tokenizer, model):
    """How the objective's examples become one batch: triplets (3n rows), pairs (2n rows), packed rows (one per
    bin, or one row for flash-attention and padding_free) or right-padded rows."""
    from lorafit.data.collate import PadCollator
    from lorafit.data.packing import packed_collator

    if objective.data == "triplets":
        from lorafit.data.triplets import TripletCollator

        return TripletCollator(tokenizer.pad_token_id)
    if objective.data == "preference":
        from lorafit.data.pairs import PreferenceCollator

        return PreferenceCollator(tokenizer.pad_token_id)
    if objective.data == "unpaired":
        from lorafit.data.unpaired import UnpairedCollator

        return UnpairedCollator(tokenizer.pad_token_id)
    if objective.data == "prompts":
        from lorafit.data.prompts import PromptCollator

        return PromptCollator(pad_id(tokenizer))
    with_sources = bool(getattr(objective, "sources", None))
    if config.data.packing == "none":
        return PadCollator(tokenizer.pad_token_id, with_sources)
    if getattr(model.config, "use_cache", False):
        # With a KV cache transformers does not separate packed examples (lorafit/data/packing.py).
        raise LorafitError("data.packing needs the model loaded with use_cache=False",
                           why="packed examples would attend to each other")
    from lorafit.model.attention import attention_of

    return packed_collator(config.data.packing, attention_of(model), tokenizer.pad_token_id, with_sources)


def build_loop(config: Config, model, tokenizer, objective, prepared, run, *, history, best, stop, guard, callbacks,
               progress, generation, identity: dict, forced_resumes: list, resume_from):
    """The TrainingLoop of a run with every part it reports to, in place; ``resume_from`` (a verified checkpoint)
    has its state loaded into it."""
    from lorafit.training.loop import LoopParts, TrainingLoop
    from lorafit.training.snapshot import Checkpoints
    from lorafit.training.tracking import Trackers

    b = config.eval.best
    checkpoints = Checkpoints(root=run.checkpoints, keep_last=config.train.keep_last, keep_best=config.train.keep_best,
                              best_metric=b.metric, best_mode=b.resolved_mode, identity=identity, tokenizer=tokenizer,
                              forced_resumes=list(forced_resumes))
    layout_check = None
    if config.quant.bits == 4:
        from lorafit.model.quantization import check_training_layout

        layout_check = check_training_layout
    if objective.data == "prompts" and hasattr(objective, "samples"):  # a few answers per logged step, for the report
        from lorafit.training.rollout import CompletionSamples

        callbacks = [*callbacks, CompletionSamples(run, objective)]
    parts = LoopParts(run=run, history=history, guard=guard, best=best, stop=stop, callbacks=callbacks,
                      progress=progress, generation=generation if config.eval.generate_every else None,
                      layout_check=layout_check, checkpoints=checkpoints)
    loop = TrainingLoop(config, model, objective, prepared.train, prepared.eval,
                        collator_for(config, objective, tokenizer, model), parts)
    if resume_from is not None:
        checkpoints.load(loop, resume_from)
    purge = loop.state.step + 1 if resume_from is not None else None
    parts.trackers = Trackers(config, run, purge_step=purge)
    return loop


def attack_comparison(config: Config, model, tokenizer, objective, eval_examples) -> dict | None:
    """Attack success rate of base and adapter on the injection inputs of the eval triplets (None when off)."""
    attack = config.eval.attack
    if objective.data != "triplets" or not attack.samples or not eval_examples:
        return None
    from lorafit.evaluate.attack import attack_sample, compare_attack_success

    records = attack_sample([e.record for e in eval_examples], attack)
    return compare_attack_success(model, tokenizer, records, attack, max_new_tokens=config.eval.max_new_tokens,
                                  batch_size=config.eval.batch_size or config.train.batch_size)


def pad_id(tokenizer) -> int:
    """The id prompts are left-padded with (masked; the EOS when the tokenizer has no pad token)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def apply_dropout_policy(config: Config, model) -> int:
    """Preference and RL objectives train with every dropout layer off, LoRA's included, as TRL does by default
    (``disable_dropout``): the policy's log-probabilities must come from the same network as the reference's (or
    as the generation's), else early rewards are noise. ``objective.disable_dropout: false`` keeps them. Returns
    how many layers were switched off."""
    import torch

    if not config.objective.dropout_off:
        return 0
    switched = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout) and module.p != 0:
            module.p = 0.0
            switched += 1
    return switched
