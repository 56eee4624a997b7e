"""The plots of ``report.html`` (evaluate/report.py), drawn as inline SVG (evaluate/report_svg.py) from the run's
metrics history and results. ``figures`` returns the charts, so a test can read what is drawn (the data, the axes);
``plots`` turns them into the SVG the page embeds.
"""

from __future__ import annotations

from lorafit.config import GENERATION_METRICS
from lorafit.evaluate.report_rl import rl_plots
from lorafit.evaluate.report_svg import Chart, Line, bar_chart, line_chart

_COLORS = {"train": "#4C72B0", "eval": "#DD8452", "best": "#55A868", "base": "#8C8C8C", "adapter": "#4C72B0"}


def _series(history: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in history if isinstance(r.get(key), (int, float))]
    return [p[0] for p in points], [p[1] for p in points]


def _figure(title: str, ylabel: str, lines: list[tuple[str, list, list, str]], *, best: tuple[int, float] | None = None,
            log_y: bool = False, unit_range: bool = False, from_zero: bool = False) -> Chart | None:
    """One line chart of (label, steps, values, color) series; None if no series has a point. ``from_zero``: the
    y-axis starts at 0 (memory: a 1 MB change on 2 GB must not fill the plot's height)."""
    lines = [Line(*line) for line in lines if line[1]]
    if not lines:
        return None
    log_y = log_y and all(v > 0 for line in lines for v in line.values)
    return line_chart(title, ylabel, lines, best=(*best, _COLORS["best"]) if best is not None else None, log_y=log_y,
                      unit_range=unit_range, from_zero=from_zero)


def _bar_figure(title: str, names: list[str], base: list[float], adapter: list[float]) -> Chart | None:
    if not names:
        return None
    return bar_chart(title, names, [("base", base, _COLORS["base"]), ("adapter", adapter, _COLORS["adapter"])])


def figures(history: list[dict], results: dict) -> list[tuple[str, object, str]]:
    """(title, chart or None, note when None) for every plot of the report, in page order."""
    best = results.get("best") or {}
    loss_best = (best["step"], best["value"]) if best.get("metric") in ("eval_loss", "loss") and best.get("step") is not None else None
    gpu = _series(history, "gpu_allocated_peak_mb")[0]
    out = [
        ("Loss", _figure("Loss", "cross-entropy (nats/token)", [
            ("train", *_series(history, "loss"), _COLORS["train"]),
            ("eval", *_series(history, "eval_loss"), _COLORS["eval"])], best=loss_best), "no loss was logged"),
        ("Learning rate", _figure("Learning rate", "learning rate", [
            ("lr", *_series(history, "learning_rate"), _COLORS["train"])]), "no learning rate was logged"),
        ("Gradient norm", _figure("Gradient norm (before clipping)", "L2 norm", [
            ("grad norm", *_series(history, "grad_norm"), _COLORS["train"])], log_y=True), "no gradient norm was logged"),
        ("Throughput", _figure("Throughput (training steps only)", "tokens / second", [
            ("non-padding tokens/s", *_series(history, "tokens_per_second"), _COLORS["train"]),
            ("supervised tokens/s", *_series(history, "supervised_tokens_per_second"), _COLORS["eval"])]),
         "throughput is measured from the second logged step on"),
        ("Memory", _figure("Peak memory", "MB", [
            ("process RSS", *_series(history, "peak_rss_mb"), _COLORS["train"]),
            *([("GPU allocated", *_series(history, "gpu_allocated_peak_mb"), _COLORS["eval"]),
               ("GPU reserved", *_series(history, "gpu_reserved_peak_mb"), _COLORS["best"])] if gpu else [])],
            from_zero=True), "no memory was logged"),
    ]
    by_source = sorted({k for r in history for k in r if k.startswith("loss/")})  # training/source_loss.py
    if by_source:
        palette = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C"]
        out.insert(1, ("Training loss per source", _figure("Training loss per source", "cross-entropy (nats/token)", [
            (k.removeprefix("loss/"), *_series(history, k), palette[i % len(palette)]) for i, k in enumerate(by_source)]),
            ""))
    causal = [k for k in ("causal_stability", "spurious_separation", "causal_discrimination") if _series(history, k)[0]
              or _series(history, f"eval_{k}")[0]]
    if causal:
        palette = {"causal_stability": ("#9DB4D8", "#4C72B0"), "spurious_separation": ("#F0B98E", "#C0602A"),
                   "causal_discrimination": ("#9FD3AE", "#2E7D46")}  # (train: light, eval: dark)
        out.append(("Causal metrics", _figure("Causal metrics (contrastive objective)", "cosine-based", [
            line for k in causal for line in (
                (f"{k} (train)", *_series(history, k), palette[k][0]),
                (f"{k} (eval)", *_series(history, f"eval_{k}"), palette[k][1]))]), ""))
    out += preference_plots(history)
    out += rl_plots(history, _figure, _series)
    generation_keys = sorted({k for r in history for k in r if k.startswith("eval_")
                              and k.removeprefix("eval_") in GENERATION_METRICS})
    if generation_keys:
        palette = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3"]
        out.append(("Generation metrics during training", _figure("Generation metrics on the eval sample", "rate", [
            (k.removeprefix("eval_"), *_series(history, k), palette[i % len(palette)]) for i, k in enumerate(generation_keys)],
            unit_range=True), ""))
    comparison = results.get("generation") or {}
    names = [n for n, v in (comparison.get("adapter") or {}).items()
             if v.get("value") is not None and (comparison["base"].get(n) or {}).get("value") is not None]
    out.append(("Eval metrics: base vs adapter", _bar_figure(
        f"Generation metrics on {comparison.get('examples', 0)} eval examples", names,
        [comparison["base"][n]["value"] for n in names], [comparison["adapter"][n]["value"] for n in names]),
        "no generation comparison (no eval data, or eval.generate_samples: 0)"))
    return out


def preference_plots(history: list[dict]) -> list[tuple[str, object, str]]:
    """DPO/ORPO/SimPO/KTO runs: the rewards of chosen (desirable) and rejected answers, their margin, and the
    reward accuracy."""
    if not any(_series(history, k)[0] for k in ("reward_chosen", "eval_reward_chosen")):  # KTO logs no margin
        return []
    palette = {"reward_chosen": ("#9FD3AE", "#2E7D46"), "reward_rejected": ("#F0A5A5", "#C44E52"),
               "reward_margin": ("#9DB4D8", "#4C72B0"), "reward_accuracy": ("#9DB4D8", "#4C72B0")}  # (train, eval)

    def lines(keys):
        return [line for k in keys for line in ((f"{k} (train)", *_series(history, k), palette[k][0]),
                                                (f"{k} (eval)", *_series(history, f"eval_{k}"), palette[k][1]))]
    return [("Preference rewards", _figure("Rewards (preference objective)", "reward",
                                           lines(("reward_chosen", "reward_rejected", "reward_margin"))), ""),
            ("Reward accuracy", _figure("Reward accuracy: chosen rewarded above rejected", "fraction of pairs",
                                        lines(("reward_accuracy",)), unit_range=True), "")]




def plots(history: list[dict], results: dict) -> list[tuple[str, str | None, str]]:
    """(title, SVG or None, note when None) for every plot of the report, in page order."""
    return [(title, chart.svg() if chart is not None else None, note) for title, chart, note in figures(history, results)]
