"""`lorafit eval`: an adapter (or a plain model) on held-out data, optionally against its base, and the table it
prints; ``load_models`` is also what the lm-eval harness loads with. (During training: evaluate/comparison.py.)

The pieces live in modules named for them: ``examples`` (what is asked), ``loss``, ``generate`` (the one generation
function), ``scoring`` (one model's results) and ``metrics`` (definitions, docs/eval.md).
"""

from __future__ import annotations

from pathlib import Path

from lorafit.config import ModelConfig
from lorafit.errors import LorafitError
from lorafit.evaluate import metrics as M
from lorafit.evaluate.examples import as_source, read_examples, spread_sample
from lorafit.evaluate.loss import LossSettings
from lorafit.evaluate.progress import stage
from lorafit.evaluate.scoring import GenerationSettings, deltas, evaluate_model


def load_models(adapter: Path | None, model: Path | None, dtype: str = "fp32"):
    """(model, tokenizer, description, training config or None). With an adapter (run, artifact or adapter folder;
    ``model`` is then its base), the model is a PeftModel whose adapter can be disabled."""
    from lorafit.model.loading import load_base_model, load_tokenizer, resolve_model_path

    if adapter is None:
        model_config = ModelConfig(path=str(model), dtype=dtype)
        base_path = resolve_model_path(model_config)
        loaded = load_base_model(model_config, base_path)
        return loaded.eval(), load_tokenizer(model_config, base_path), {"model": base_path}, None
    from lorafit.model.adapters import load_adapter_model, resolve_adapter

    resolved = resolve_adapter(adapter, model)
    loaded = load_adapter_model(resolved, dtype=dtype).eval()
    described = {"model": resolved.base_path, "adapter": str(resolved.adapter_dir)}
    return loaded, resolved.load_tokenizer(), described, resolved.training_config()


def _check_request(adapter, model, metrics, baseline) -> None:
    if adapter is None and model is None:
        raise LorafitError("nothing to evaluate", fix="pass --adapter DIR (a trained adapter) or --model DIR (a plain model)")
    if baseline and adapter is None:
        raise LorafitError("--baseline needs --adapter", why="the baseline is the base model without the adapter")
    unknown = [m for m in metrics if m not in M.LOSS_METRICS + M.GENERATION_METRICS]
    if unknown:
        raise LorafitError(f"--metrics: unknown {', '.join(unknown)}",
                           fix=f"choose from {', '.join(M.LOSS_METRICS + M.GENERATION_METRICS)}")


def run_eval(*, adapter: Path | None, model: Path | None, data: list, metrics: tuple[str, ...], baseline: bool,
             limit: int | None = None, max_new_tokens: int = 64, batch_size: int = 16, max_seq_length: int | None = None,
             train_on: str | None = None, truncation: str | None = None,
             settings: GenerationSettings | None = None) -> dict:
    """Everything `lorafit eval` prints: the model's results, and with ``baseline`` the base's and the deltas.

    ``data``: files or DataSource objects. The loss is tokenised with the options the adapter trained with
    (training_config.yaml: data.max_seq_length, truncation, train_on) unless given here.
    """
    _check_request(adapter, model, metrics, baseline)
    settings = settings or GenerationSettings(max_new_tokens=max_new_tokens, batch_size=batch_size)
    sources = [as_source(Path(p).resolve() if isinstance(p, (str, Path)) else p) for p in data]
    all_examples = read_examples(sources, settings.citation_pattern)
    examples = spread_sample(all_examples, limit) if limit is not None else all_examples
    if not any(m in M.GENERATION_METRICS for m in metrics):
        examples = []
    stage("loading the adapter on its base" if adapter is not None else "loading the model")
    loaded, tokenizer, described, training_config = load_models(adapter, model)
    loss_settings = LossSettings.from_training_config(training_config, max_seq_length=max_seq_length, train_on=train_on,
                                                      truncation=truncation)
    common = dict(metrics=metrics, settings=settings, loss_settings=loss_settings, batch_size=batch_size,
                  all_examples=all_examples, examples=examples)
    subject = "adapter" if adapter is not None else "model"
    stage(f"{subject}: loss on {len(all_examples)} examples, answers to {len(examples)}", subject=subject)
    report = {**described, "data": [s.path for s in sources], "generated_examples": len(examples),
              "loss_tokenisation": loss_settings.__dict__,
              "model_result": evaluate_model(loaded, tokenizer, sources, **common)}
    if baseline:
        stage("base (adapter disabled): the same again", subject="base")
        with loaded.disable_adapter():
            report["base_result"] = evaluate_model(loaded, tokenizer, sources, **common)
        report["deltas"] = deltas(report["model_result"], report["base_result"])
    return report



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
