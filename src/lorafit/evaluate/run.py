"""Evaluation: loss and perplexity on held-out data, and generation metrics on what the model answers.

Used three ways: `lorafit eval` (an adapter or a plain model, optionally against its base), during training every
N evaluations (``GenerationEval``), and at the end of training for the report's base-vs-adapter comparison.
Data goes through the same readers and tokenisation as training (``read_records``, ``tokenise_records``), so
"eval loss" here is the number training logs. The metric definitions are in ``lorafit.evaluate.metrics`` and docs/eval.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import TrainerCallback

from lorafit.evaluate import metrics as M
from lorafit.config import DataSource, ModelConfig
from lorafit.data import TokenizedDataset
from lorafit.data.collate import PadCollator
from lorafit.data.labels import render
from lorafit.data.formats import Record
from lorafit.data.sources import SourceStats, read_records, tokenise_records
from lorafit.errors import LorafitError


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


@dataclass(frozen=True)
class EvalExample:
    """One question to answer: the conversation up to its last assistant turn, and what that turn said."""

    prompt: tuple[dict, ...]
    reference: str
    source: str
    where: str
    path: str = ""
    should_refuse: bool | None = None
    provided: tuple[str, ...] = field(default=())


def load_json_schema(path: str | None) -> dict | None:
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
    return schema


def to_example(record: Record, path: str, citation_pattern: str) -> EvalExample:
    """Split a conversation into prompt and reference answer, and pick up the fields metrics read.

    ``source`` (row field, else the file name) groups the per-source breakdown; ``should_refuse`` marks refusal
    examples; ``sources`` lists the ids an answer may cite, else the ids cited in the prompt itself count.
    """
    where = record.where
    last = max(i for i, m in enumerate(record.messages) if m["role"] == "assistant")
    meta = record.meta
    should_refuse = meta.get("should_refuse")
    if should_refuse is not None and not isinstance(should_refuse, bool):
        raise LorafitError(f'{where}: field "should_refuse" must be true or false (got {should_refuse!r})')
    provided = meta.get("sources")
    if provided is None:
        prompt_text = "\n".join(m["content"] for m in record.messages[:last])
        provided = M.citations(prompt_text, citation_pattern)
    elif not isinstance(provided, list):
        raise LorafitError(f'{where}: field "sources" must be a list of citable ids like ["1", "doc-7"] (got {provided!r})')
    source = meta.get("source")
    return EvalExample(
        prompt=record.messages[:last],
        reference=record.messages[last]["content"],
        source=str(source) if source is not None else Path(path).name,
        where=where,
        path=path,
        should_refuse=should_refuse,
        provided=tuple(str(p) for p in provided),
    )


def _records(path: str) -> list[Record]:
    """Every row of an eval file, in any format training reads (same readers, same checks)."""
    records, _, _ = read_records(DataSource(path=path))
    return records


def read_examples(paths: list[str], citation_pattern: str = M.DEFAULT_CITATION_PATTERN) -> list[EvalExample]:
    """Conversations for generation metrics (plain-text rows have no answer to compare and are left out)."""
    return [to_example(r, path, citation_pattern) for path in paths for r in _records(path) if r.messages]


def spread_sample(items: list, count: int) -> list:
    """``count`` items evenly spaced over the list (every source of a concatenated file list gets its share).

    >>> spread_sample(list(range(10)), 3)
    [0, 3, 6]
    """
    if count >= len(items):
        return list(items)
    return [items[(i * len(items)) // count] for i in range(count)]


# ---------------------------------------------------------------------------------------------- loss


@torch.no_grad()
def example_losses(model, dataset, *, batch_size: int, pad_token_id: int) -> list[tuple[float, int]]:
    """(summed negative log-likelihood, supervised token count) of every example of a tokenised dataset."""
    collate = PadCollator(pad_token_id)
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
        shifted = batch["labels"][:, 1:]  # (B, T-1): token t is predicted from the tokens before it
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), shifted, ignore_index=-100, reduction="none"
        )  # (B, T-1)
        out += [(row_nll.item(), int(n)) for row_nll, n in zip(nll.sum(dim=1), (shifted != -100).sum(dim=1))]
    return out


def loss_by_source(model, tokenizer, paths: list[str], examples: list[EvalExample], *, max_seq_length: int,
                   batch_size: int) -> dict[str, tuple[float, int]]:
    """{source: (summed NLL, tokens)}, tokenised exactly as training does (response-only labels).

    Examples are matched to their rows' ``source`` field when the tokenised file kept every row (it does unless
    a row lost all its supervised tokens to truncation); otherwise the file's name is the source of all of them.
    """
    totals: dict[str, list] = {}
    for path in paths:
        examples_here = tokenise_records(_records(path), tokenizer, max_seq_length=max_seq_length, truncation="truncate",
                                         train_on="all_assistant", stats=SourceStats(path=path))
        dataset = TokenizedDataset(examples_here)
        losses = example_losses(model, dataset, batch_size=batch_size, pad_token_id=tokenizer.pad_token_id)
        rows = [e for e in examples if e.path == path]
        sources = [e.source for e in rows] if len(rows) == len(losses) else [Path(path).name] * len(losses)
        for source, (nll, count) in zip(sources, losses):
            entry = totals.setdefault(source, [0.0, 0])
            entry[0] += nll
            entry[1] += count
    return {source: (nll, count) for source, (nll, count) in totals.items()}


# ---------------------------------------------------------------------------------------------- generation


@torch.no_grad()
def generate_answers(model, tokenizer, examples: list[EvalExample], settings: GenerationSettings) -> list[str]:
    """Greedy answers, batched with left padding (the prompt ends where generation starts for every row)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    prompts = [tokenizer(render(tokenizer, e.prompt, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
               for e in examples]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths together: less padding
    answers: list[str] = [""] * len(prompts)
    try:
        for start in range(0, len(order), settings.batch_size):
            rows = order[start : start + settings.batch_size]
            longest = max(len(prompts[i]) for i in rows)
            input_ids = torch.full((len(rows), longest), tokenizer.pad_token_id, dtype=torch.long)  # (B, T)
            attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)  # (B, T)
            for r, i in enumerate(rows):
                input_ids[r, longest - len(prompts[i]):] = torch.tensor(prompts[i])
                attention_mask[r, longest - len(prompts[i]):] = 1
            output = model.generate(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                max_new_tokens=settings.max_new_tokens, do_sample=False, use_cache=True,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            )
            for r, i in enumerate(rows):
                answers[i] = tokenizer.decode(output[r, longest:], skip_special_tokens=True).strip()
    finally:
        model.train(was_training)
    return answers


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
    }
    return {name: functions[name]() for name in settings.metrics}


def generation_metrics(model, tokenizer, examples: list[EvalExample], settings: GenerationSettings) -> tuple[dict, list[dict]]:
    """(aggregated metrics, one row per example with its answer and scores)."""
    answers = generate_answers(model, tokenizer, examples, settings)
    rows = [{"where": e.where, "source": e.source, "prediction": a, **score(e, a, settings)} for e, a in zip(examples, answers)]
    return M.aggregate(rows, settings.metrics), rows


# ---------------------------------------------------------------------------------------------- one model, all metrics


def evaluate_model(model, tokenizer, paths: list[str], *, metrics: tuple[str, ...], settings: GenerationSettings,
                   max_seq_length: int, batch_size: int, all_examples: list[EvalExample],
                   examples: list[EvalExample]) -> dict:
    """Loss/perplexity over all of ``paths`` and generation metrics over ``examples``, overall and per source.

    Loss is token-weighted: sum of NLL over all supervised tokens / their number (as training's eval_loss).
    """
    result: dict = {"by_source": {}}
    if "loss" in metrics or "perplexity" in metrics:
        per_source = loss_by_source(model, tokenizer, paths, all_examples, max_seq_length=max_seq_length,
                                    batch_size=batch_size)
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
        sources = sorted({r["source"] for r in rows})
        for source in sources:
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


# ---------------------------------------------------------------------------------------------- `lorafit eval`


def load_models(adapter: Path | None, model: Path | None, dtype: str = "fp32"):
    """(model, tokenizer, description). With an adapter, the model is a PeftModel whose adapter can be disabled."""
    from lorafit.model.loading import load_base_model, load_tokenizer, resolve_model_path

    from lorafit.model.adapters import resolve_adapter_dir

    adapter_dir = resolve_adapter_dir(adapter) if adapter is not None else None
    if model is not None:
        base_name = str(model)
    else:
        config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
        base_name = config.get("base_model_name_or_path") or ""
        if not base_name or not (Path(base_name).is_dir() or "/" in base_name):
            raise LorafitError(
                f"{adapter_dir}/adapter_config.json: base_model_name_or_path is {base_name!r}, not a local model",
                fix="pass the base model folder with --model",
            )
    model_config = ModelConfig(path=base_name, dtype=dtype)
    base_path = resolve_model_path(model_config)
    tokenizer = load_tokenizer(model_config, str(adapter_dir) if adapter_dir else base_path)
    loaded = load_base_model(model_config, base_path)
    if adapter_dir is None:
        return loaded.eval(), tokenizer, {"model": base_path}
    from peft import PeftModel

    return PeftModel.from_pretrained(loaded, str(adapter_dir)).eval(), tokenizer, {"model": base_path, "adapter": str(adapter_dir)}


def run_eval(*, adapter: Path | None, model: Path | None, data: list[Path], metrics: tuple[str, ...], baseline: bool,
             limit: int | None = None, max_new_tokens: int = 64, batch_size: int = 16, max_seq_length: int = 1024,
             settings: GenerationSettings | None = None) -> dict:
    """Everything `lorafit eval` prints: the model's results, and with ``baseline`` the base's and the deltas."""
    if adapter is None and model is None:
        raise LorafitError("nothing to evaluate", fix="pass --adapter DIR (a trained adapter) or --model DIR (a plain model)")
    if baseline and adapter is None:
        raise LorafitError("--baseline needs --adapter", why="the baseline is the base model without the adapter")
    unknown = [m for m in metrics if m not in M.LOSS_METRICS + M.GENERATION_METRICS]
    if unknown:
        raise LorafitError(f"--metrics: unknown {', '.join(unknown)}",
                           fix=f"choose from {', '.join(M.LOSS_METRICS + M.GENERATION_METRICS)}")
    settings = settings or GenerationSettings(max_new_tokens=max_new_tokens, batch_size=batch_size)
    paths = [str(Path(p).resolve()) for p in data]
    all_examples = read_examples(paths, settings.citation_pattern)
    examples = spread_sample(all_examples, limit) if limit is not None else all_examples
    if not any(m in M.GENERATION_METRICS for m in metrics):
        examples = []
    loaded, tokenizer, described = load_models(adapter, model)
    common = dict(metrics=metrics, settings=settings, max_seq_length=max_seq_length, batch_size=batch_size,
                  all_examples=all_examples, examples=examples)
    report = {**described, "data": paths, "generated_examples": len(examples),
              "model_result": evaluate_model(loaded, tokenizer, paths, **common)}
    if baseline:
        with loaded.disable_adapter():
            report["base_result"] = evaluate_model(loaded, tokenizer, paths, **common)
        report["deltas"] = deltas(report["model_result"], report["base_result"])
    return report


# ---------------------------------------------------------------------------------------------- during training


class GenerationEval(TrainerCallback):
    """Every ``every`` evaluations, generate answers for a fixed eval sample and log ``eval_<metric>`` values.

    The values go through ``trainer.log`` so metrics_history.jsonl, TensorBoard/MLflow/W&B and best-step
    selection all see them like eval_loss.
    """

    def __init__(self, trainer, tokenizer, examples: list[EvalExample], settings: GenerationSettings, every: int):
        self.trainer, self.tokenizer, self.examples, self.settings, self.every = trainer, tokenizer, examples, settings, every
        self.evaluations = 0

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        self.evaluations += 1
        if not self.examples or self.evaluations % self.every:
            return
        aggregated, _ = generation_metrics(model, self.tokenizer, self.examples, self.settings)
        values = {f"eval_{name}": v["value"] for name, v in aggregated.items() if v["value"] is not None}
        if values:
            self.trainer.log(values)


def compare_base_and_adapter(model, tokenizer, examples: list[EvalExample], settings: GenerationSettings,
                             samples: int = 5) -> dict:
    """Generation metrics of the base (adapter disabled) and of the adapter on the same examples, and a few answers."""
    with model.disable_adapter():
        base, base_rows = generation_metrics(model, tokenizer, examples, settings)
    adapted, rows = generation_metrics(model, tokenizer, examples, settings)
    shown = []
    for example, base_row, row in list(zip(examples, base_rows, rows))[:samples]:
        shown.append({"where": example.where, "source": example.source,
                      "prompt": next((m["content"] for m in reversed(example.prompt) if m["role"] == "user"), ""),
                      "reference": example.reference, "base": base_row["prediction"], "adapter": row["prediction"]})
    return {"examples": len(examples), "base": base, "adapter": adapted, "samples": shown}


def _cell(value, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def format_eval(report: dict) -> str:
    """The table `lorafit eval` prints: one row per metric, base and delta columns with --baseline."""
    adapter, base = report["model_result"], report.get("base_result")
    lines = [f"model      {report['model']}" + (f"\nadapter    {report['adapter']}" if report.get("adapter") else ""),
             f"data       {', '.join(Path(p).name for p in report['data'])} "
             f"({report['generated_examples']} examples answered, greedy)", ""]
    header = f"{'metric':<20}{'model' if base is None else 'adapter':>12}"
    if base is not None:
        header += f"{'base':>12}{'delta':>12}"
    lines += [header, "-" * len(header)]
    rows = [(k, adapter.get(k), base.get(k) if base else None, None) for k in ("loss", "perplexity") if k in adapter]
    for name, value in adapter.get("generation", {}).items():
        other = base["generation"][name]["value"] if base else None
        rows.append((name, value["value"], other, value["n"]))
    for name, value, other, n in rows:
        line = f"{name:<20}{_cell(value):>12}"
        if base is not None:
            delta = report["deltas"].get(name)
            line += f"{_cell(other):>12}{(f'{delta:+.4f}' if delta is not None else ''):>12}"
        if n is not None:
            line += f"   n={n}" if n else "   (no example applies)"
        lines.append(line)
    sources = adapter.get("by_source", {})
    if len(sources) > 1:
        names = [k for k in ("loss", "perplexity", *adapter.get("generation", {})) if any(v.get(k) is not None for v in sources.values())]
        lines += ["", "per source (" + ("adapter" if base is not None else "model") + ")"]
        lines.append(f"{'source':<28}" + "".join(f"{n[:14]:>15}" for n in names))
        for source, values in sorted(sources.items()):
            lines.append(f"{source[:27]:<28}" + "".join(f"{_cell(values.get(n)):>15}" for n in names))
    return "\n".join(lines)
