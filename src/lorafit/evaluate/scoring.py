"""One model's results on eval data: answers generated and scored, loss per source, and adapter - base deltas."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lorafit.config import DataSource
from lorafit.errors import LorafitError
from lorafit.evaluate import metrics as M
from lorafit.evaluate.examples import EvalExample
from lorafit.evaluate.generate import generate_replies
from lorafit.evaluate.loss import LossSettings, loss_by_source


@dataclass(frozen=True)
class GenerationSettings:
    """How answers are generated and scored (the generation fields of the ``eval`` config section)."""

    metrics: tuple[str, ...] = M.GENERATION_METRICS
    max_new_tokens: int = 64
    batch_size: int = 16
    citation_pattern: str = M.DEFAULT_CITATION_PATTERN
    refusal_patterns: tuple[str, ...] = M.DEFAULT_REFUSAL_PATTERNS
    json_schema: dict | None = None

    @classmethod
    def from_eval_config(cls, eval_config, batch_size: int) -> "GenerationSettings":
        return cls(
            max_new_tokens=eval_config.max_new_tokens,
            batch_size=batch_size,
            citation_pattern=eval_config.citation_pattern,
            refusal_patterns=tuple(eval_config.refusal_patterns or M.DEFAULT_REFUSAL_PATTERNS),
            json_schema=load_json_schema(eval_config.json_schema),
        )


def load_json_schema(path: str | None) -> dict | None:
    """The schema of ``eval.json_schema``, checked against its JSON-Schema draft before any answer is scored."""
    if path is None:
        return None
    try:
        schema = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise LorafitError(f"{path}: cannot read the JSON schema ({exc.strerror})", fix="check eval.json_schema") from None
    except json.JSONDecodeError as exc:
        raise LorafitError(f"{path}:{exc.lineno}: the JSON schema is not valid JSON ({exc.msg})") from None
    if not isinstance(schema, dict):
        raise LorafitError(f"{path}: a JSON schema must be an object", fix='e.g. {"type": "object", "required": ["name"]}')
    problem = M.schema_problem(schema)
    if problem:
        raise LorafitError(f"{path}: not a valid JSON schema: {problem}", fix="see https://json-schema.org/understanding-json-schema")
    return schema


def generate_answers(model, tokenizer, examples: list[EvalExample], settings: GenerationSettings) -> list[str]:
    """Greedy answers to the examples' prompts (``generate_replies``: stops at every end-of-turn id)."""
    replies = generate_replies(model, tokenizer, [e.prompt for e in examples], max_new_tokens=settings.max_new_tokens,
                               batch_size=settings.batch_size)
    return [r.text for r in replies]


def score(example: EvalExample, prediction: str, settings: GenerationSettings) -> dict:
    """Every selected generation metric for one answer (None where it does not apply)."""
    functions = {
        "exact_match": lambda: M.exact_match(prediction, example.reference),
        "rouge_l": lambda: M.rouge_l(prediction, example.reference),
        "json_valid": lambda: M.json_valid(prediction),
        "json_schema": lambda: M.json_schema(prediction, settings.json_schema),
        "field_presence": lambda: M.field_presence(prediction, example.reference),
        "field_accuracy": lambda: M.field_accuracy(prediction, example.reference),
        "citation_coverage": lambda: M.citation_coverage(prediction, example.provided, settings.citation_pattern),
        "refusal_correct": lambda: M.refusal_correct(prediction, example.should_refuse, settings.refusal_patterns),
        "groundedness": lambda: M.groundedness(prediction, example.context, settings.citation_pattern),
    }
    return {name: functions[name]() for name in settings.metrics}


def generation_metrics(model, tokenizer, examples: list[EvalExample], settings: GenerationSettings) -> tuple[dict, list[dict]]:
    """(aggregated metrics, one row per example with its answer and scores)."""
    answers = generate_answers(model, tokenizer, examples, settings)
    rows = [{"where": e.where, "source": e.source, "prediction": a, **score(e, a, settings)} for e, a in zip(examples, answers)]
    return M.aggregate(rows, settings.metrics), rows


def evaluate_model(model, tokenizer, sources: list[DataSource], *, metrics: tuple[str, ...], settings: GenerationSettings,
                   loss_settings: LossSettings, batch_size: int, all_examples: list[EvalExample],
                   examples: list[EvalExample]) -> dict:
    """Loss/perplexity over all of ``sources`` and generation metrics over ``examples``, overall and per source.

    Loss is token-weighted: sum of NLL over all supervised tokens / their number (as training's eval_loss).
    """
    result: dict = {"by_source": {}}
    if "loss" in metrics or "perplexity" in metrics:
        per_source = loss_by_source(model, tokenizer, sources, all_examples, settings=loss_settings, batch_size=batch_size)
        nll, tokens = sum(v[0] for v in per_source.values()), sum(v[1] for v in per_source.values())
        result["loss"] = nll / tokens if tokens else None
        result["perplexity"] = M.perplexity(result["loss"]) if tokens else None
        result["loss_tokens"] = tokens
        for source, (part_nll, part_tokens) in per_source.items():
            loss = part_nll / part_tokens if part_tokens else None
            result["by_source"].setdefault(source, {}).update(
                loss=loss, perplexity=M.perplexity(loss) if loss is not None else None)
    generation = tuple(m for m in metrics if m in M.GENERATION_METRICS)
    if generation and examples:
        chosen = GenerationSettings(**{**settings.__dict__, "metrics": generation})
        result["generation"], rows = generation_metrics(model, tokenizer, examples, chosen)
        result["rows"] = rows
        for source in sorted({r["source"] for r in rows}):
            part = M.aggregate([r for r in rows if r["source"] == source], generation)
            result["by_source"].setdefault(source, {}).update({k: v["value"] for k, v in part.items()})
    return result


def deltas(adapter: dict, base: dict) -> dict:
    """adapter - base for every number both results have (top level and generation metrics)."""
    out = {}
    for key in ("loss", "perplexity"):
        if adapter.get(key) is not None and base.get(key) is not None:
            out[key] = adapter[key] - base[key]
    for key, value in adapter.get("generation", {}).items():
        other = base.get("generation", {}).get(key, {}).get("value")
        if value["value"] is not None and other is not None:
            out[key] = value["value"] - other
    return out
