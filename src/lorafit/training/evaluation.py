"""An evaluation inside a run: eval_loss and the objective's eval_ metrics over the whole eval set, and every
``eval.generate_every`` evaluations the generation metrics on the fixed eval sample.

The eval set is treated as one big step: the objective gets the totals of the whole set (every process), so each
batch's loss is its share of the set's mean and their sum is that mean, token-weighted for next-token losses and
example-weighted for per-pair or per-triplet ones (the same rule as a training step's accumulation). Each process
evaluates its share of the batches; under FSDP2 and ZeRO-3, whose forwards gather weights (a collective), every
process runs the same number of forwards. Nothing it does changes the randomness training draws next.
"""

from __future__ import annotations

import torch

from lorafit.training import batches as plans
from lorafit.training.callbacks import dispatch
from lorafit.training.strategy import sum_on_host
from lorafit.training.objectives import StepTotals
from lorafit.training.rng import preserved_rng
from lorafit.training.window import MetricSums


def evaluate(loop) -> dict:
    """Evaluate ``loop``'s model now; the values are logged at its current step and returned."""
    p, step, objective = loop.parts, loop.state.step, loop.objective
    dispatch(p.callbacks, "on_evaluate_begin", step, loop)
    e = loop.config.eval
    own = plans.eval_plan(len(loop.eval_data), batch_size=e.batch_size or loop.settings.batch_size,
                          processes=loop.processes, rank=loop.rank, lockstep=loop.strategy in ("fsdp", "deepspeed"))
    loaded = [(loop.collate([loop.eval_data[i] for i in indices]), counted) for indices, counted in own]
    counted = [counts for (_, counts), kept in loaded if kept]
    supervised, examples = sum_on_host([sum(c.supervised for c in counted), sum(c.examples for c in counted)])
    totals = StepTotals(tokens=supervised, examples=examples)
    sums = MetricSums()
    with preserved_rng(), torch.no_grad():
        loop.model.eval()
        try:
            for (batch, _), kept in loaded:
                loss, metrics = objective.compute(loop.model, plans.to_device(batch, loop.device), totals)
                if kept:
                    sums.add("loss", loss, 0.0)
                    sums.add_means(metrics, lambda name, b=batch: objective.metric_weight(name, b))
            sums.add("loss", 0.0, 1.0 / loop.processes)  # the shares add up to the mean: a total weight of 1
        finally:
            loop.model.train()
    reduce = loop.reduce_sum if loop.processes > 1 else None
    values = {f"eval_{k}": v for k, v in sums.read(reduce, loop.device)[0].items()}
    loop.state.evaluations += 1
    if p.generation is not None and loop.state.evaluations % e.generate_every == 0:
        values.update(_generation_metrics(loop))
    if p.layout_check is not None:
        p.layout_check(loop.model, f"evaluation at step {step}")
    values = loop.record(step, values)
    dispatch(p.callbacks, "on_evaluate", step, values)
    return values


def _generation_metrics(loop) -> dict:
    """The generation metrics (eval_json_valid, eval_rouge_l, ...) of the fixed eval sample, greedy."""
    from lorafit.evaluate.scoring import generation_metrics

    examples, settings = loop.parts.generation
    with preserved_rng():
        aggregated, _ = generation_metrics(loop.model, loop.parts.checkpoints.tokenizer, examples, settings)
    return {f"eval_{name}": v["value"] for name, v in aggregated.items() if v["value"] is not None}
