"""Base next to adapter during and after training: the fixed eval sample that generation metrics answer
(``generation_sample``), and the end-of-training comparison of base and adapter on it, with a few answers
(``compare_base_and_adapter``; training_results.json's ``generation``)."""

from __future__ import annotations

from lorafit.evaluate.examples import EvalExample, run_examples, spread_sample
from lorafit.evaluate.scoring import GenerationSettings, generation_metrics
from lorafit.model.lora_init import base_view

def generation_sample(config, eval_split) -> tuple[list[EvalExample], GenerationSettings] | None:
    """The fixed eval sample answered for generation metrics (``data.eval`` sources with their format, fields and
    task_prefix, and the rows ``data.eval_fraction`` held out), and how to answer it; None when nothing is answered.

    ``eval_split``: the prepared eval examples (``PreparedData.eval_examples``). The training loop answers the sample
    every ``eval.generate_every`` evaluations (``generation_metrics``), and the recipe compares base and adapter on it.
    """
    e = config.eval
    if not eval_split or not e.generate_samples:
        return None
    settings = GenerationSettings.from_eval_config(e, e.batch_size or config.train.batch_size)
    return spread_sample(run_examples(config.data, eval_split, e.citation_pattern), e.generate_samples), settings


def compare_base_and_adapter(model, tokenizer, examples: list[EvalExample], settings: GenerationSettings,
                             samples: int = 5) -> dict:
    """Generation metrics of the base (adapter disabled) and of the adapter on the same examples, and a few answers."""
    with base_view(model):  # disabling the adapter would show PiSSA's residual, not the base
        base, base_rows = generation_metrics(model, tokenizer, examples, settings)
    adapted, rows = generation_metrics(model, tokenizer, examples, settings)
    shown = []
    for example, base_row, row in list(zip(examples, base_rows, rows))[:samples]:
        shown.append({"where": example.where, "source": example.source,
                      "prompt": next((m["content"] for m in reversed(example.prompt) if m["role"] == "user"), ""),
                      "reference": example.reference, "base": base_row["prediction"], "adapter": row["prediction"]})
    return {"examples": len(examples), "base": base, "adapter": adapted, "samples": shown}
