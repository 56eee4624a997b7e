"""``report.html``: one self-contained page per run (plots embedded as inline SVG, no script, no network).

Built only from files in the run folder (metrics_history.jsonl, training_results.json, and harness_results.json
when `lorafit eval --harness` evaluated the run), so
`lorafit report RUN_DIR` rebuilds it any time. The charts are evaluate/report_svg.py's.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from lorafit.errors import LorafitError
from lorafit.evaluate.harness import harness_section
from lorafit.evaluate.report_plots import plots
from lorafit.evaluate.report_rl import read_samples, samples_section
from lorafit.run_folder import RunFolder, write_atomic

REPORT_FILE, RESULTS_FILE, HISTORY_FILE = RunFolder.REPORT, RunFolder.RESULTS, RunFolder.HISTORY

def read_history(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / HISTORY_FILE
    if not path.is_file():
        raise LorafitError(f"{path}: not found", why="the report is drawn from the run's metrics history",
                           fix="point at a run folder written by `lorafit train`")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.{digits}f}" if abs(value) < 1e5 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return html.escape(str(value))


def _delta(after, before, lower_is_better: bool) -> str:
    if after is None or before is None:
        return ""
    change = after - before
    good = change < 0 if lower_is_better else change > 0
    css = "good" if good else ("bad" if change else "")
    return f'<span class="{css}">{change:+.4f}</span>'


def _comparison_rows(results: dict) -> list[str]:
    m = results.get("metrics") or {}
    rows = []
    if m.get("eval_loss_first") is not None:
        rows.append(("eval loss", m["eval_loss_first"], m["eval_loss_final"], True, "step 0 vs final step"))
        rows.append(("eval perplexity", m.get("eval_perplexity_first"), m.get("eval_perplexity_final"), True, ""))
    comparison = results.get("generation") or {}
    for name, value in (comparison.get("adapter") or {}).items():
        before = (comparison.get("base", {}).get(name) or {}).get("value")
        rows.append((name, before, value.get("value"), False, f"n = {value.get('n', 0)}"))
    return [f"<tr><td>{html.escape(n)}</td><td>{_fmt(b)}</td><td>{_fmt(a)}</td><td>{_delta(a, b, low)}</td>"
            f"<td class='muted'>{html.escape(note)}</td></tr>" for n, b, a, low, note in rows]


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;background:#f6f7f9;color:#1d232b}
main{max-width:1240px;margin:0 auto;padding:24px}
h1{margin:0 0 4px;font-size:24px} h2{font-size:18px;margin:28px 0 10px;border-bottom:1px solid #dde1e6;padding-bottom:4px}
.muted{color:#66707c;font-size:13px}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(220px,1fr));gap:12px;margin-top:16px}
.card{background:#fff;border:1px solid #dde1e6;border-radius:8px;padding:12px 14px}
.card .label{font-size:12px;color:#66707c;text-transform:uppercase;letter-spacing:.04em}
.card .value{font-size:22px;font-weight:600;margin-top:4px} .card .sub{font-size:12px;color:#66707c;margin-top:2px}
.plots{display:grid;grid-template-columns:repeat(2,minmax(0,1fr));gap:14px}
figure{margin:0;background:#fff;border:1px solid #dde1e6;border-radius:8px;padding:8px;text-align:center}
figure svg{width:100%;height:auto} figcaption{font-size:13px;color:#66707c}
table{border-collapse:collapse;width:100%;background:#fff;font-size:14px}
table.samples{table-layout:fixed}
th,td{border:1px solid #dde1e6;padding:6px 8px;text-align:left;vertical-align:top}
th{background:#eef1f4} td.num{text-align:right}
.good{color:#1a7f37;font-weight:600} .bad{color:#cf222e;font-weight:600}
pre{white-space:pre-wrap;word-break:break-word;margin:0;font-size:12.5px;font-family:ui-monospace,Menlo,Consolas,monospace}
details{background:#fff;border:1px solid #dde1e6;border-radius:8px;padding:8px 12px;margin-top:8px}
"""


def _memory_card(memory: dict) -> list[str]:
    """The peak GPU memory card: the measured peak with the planner's prediction (lorafit plan) beside it. A run
    without a GPU measured none: the card says so, and shows the prediction only as one."""
    predicted, measured = memory.get("predicted_peak_gib"), memory.get("measured_peak_gib")
    if predicted is None and measured is None:
        return []
    if measured is None:
        value = "none: a CPU run" if memory.get("device", "cpu") == "cpu" else "not measured"
        sub = (f"the planner predicted {predicted:.2f} GiB for this run on the {memory.get('device', 'cpu')}; "
               "the CPU's peak is the process RSS (peak memory)") if predicted is not None else ""
    else:
        error = f" ({memory['error_percent']:+.1f}%)" if memory.get("error_percent") is not None else ""
        value = f"{measured:.2f} GiB"
        sub = "measured (torch.cuda.max_memory_allocated)" + (f"; {predicted:.2f} GiB predicted{error}"
                                                              if predicted is not None else "")
    return [f'<div class="card"><div class="label">peak GPU memory</div><div class="value">{html.escape(value)}</div>'
            f'<div class="sub">{html.escape(sub)}</div></div>']


def _cards(results: dict) -> list[str]:
    """The headline cards: eval loss, headline metrics base -> adapter, best step, speed, memory, attack, steps."""
    m = results.get("metrics") or {}
    best = results.get("best") or {}
    esc = html.escape
    cards = []

    def card(label: str, value: str, sub: str = "") -> None:
        cards.append(f'<div class="card"><div class="label">{esc(label)}</div><div class="value">{value}</div>'
                     f'<div class="sub">{sub}</div></div>')

    if m.get("eval_loss_first") is not None:
        card("eval loss", f"{m['eval_loss_first']:.3f} &rarr; {m['eval_loss_final']:.3f}",
             f"best {m['eval_loss_best']:.4f} at step {m['eval_best_step']}")
    adapter_gen = (results.get("generation") or {}).get("adapter") or {}
    base_gen = (results.get("generation") or {}).get("base") or {}
    for name in results.get("headline_metrics", []):
        if (adapter_gen.get(name) or {}).get("value") is not None:
            before = (base_gen.get(name) or {}).get("value")
            card(name.replace("_", " "), f"{_fmt(before, 2)} &rarr; {_fmt(adapter_gen[name]['value'], 2)}", "base &rarr; adapter")
    if best.get("value") is not None:
        sub = f"at step {best['step']}" + (f"; stopped early at step {best['stopped_early_at']}" if best.get("stopped_early_at") else "")
        card(f"best {best['metric']} ({best['mode']})", _fmt(best["value"]), sub)
    if m.get("tokens_per_second"):
        card("throughput", f"{m['tokens_per_second']:,.0f} tok/s",
             f"{_fmt(m.get('supervised_tokens_per_second'), 0)} supervised tok/s")
    if m.get("peak_rss_mb"):
        gpu = f"; GPU {m['gpu_allocated_peak_mb']:,.0f} MB allocated" if m.get("gpu_allocated_peak_mb") else ""
        card("peak memory", f"{m['peak_rss_mb']:,.0f} MB", f"process RSS{gpu}")
    cards += _memory_card(results.get("memory") or {})
    attack = results.get("attack") or {}
    if attack:
        card("attack success rate", f"{_fmt(attack['base']['attack_success_rate'], 2)} &rarr; "
             f"{_fmt(attack['adapter']['attack_success_rate'], 2)}", f"base &rarr; adapter, {attack['examples']} injections")
    card("steps", f"{_fmt(m.get('steps'))}", f"{_fmt(m.get('epochs'), 2)} epochs, {_fmt(m.get('train_seconds'), 1)} s training")
    return cards


def render_html(history: list[dict], results: dict) -> str:
    """The report page as a string (pure: everything comes from the two arguments)."""
    esc = html.escape
    cards = _cards(results)

    figures = []
    for title, svg, note in plots(history, results):
        if svg:
            figures.append(f'<figure>{svg}<figcaption>{esc(title)}</figcaption></figure>')
        else:
            figures.append(f'<figure><figcaption>{esc(title)}: {esc(note)}</figcaption></figure>')

    samples = (results.get("generation") or {}).get("samples") or []
    sample_rows = "".join(
        f"<tr><td><pre>{esc(s['prompt'])}</pre><div class='muted'>{esc(s['where'])}</div></td>"
        f"<td><pre>{esc(s['reference'])}</pre></td><td><pre>{esc(s['base'])}</pre></td><td><pre>{esc(s['adapter'])}</pre></td></tr>"
        for s in samples)
    data = results.get("data") or {}
    data_rows = "".join(
        f"<tr><td>{esc(split)}</td><td class='num'>{_fmt(d.get('rows'))}</td><td class='num'>{_fmt(d.get('kept'))}</td>"
        f"<td class='num'>{_fmt(d.get('tokens'))}</td><td class='num'>{_fmt(d.get('supervised_tokens'))}</td>"
        f"<td>{esc(', '.join(Path(s).name for s in d.get('sources', [])))}</td></tr>"
        for split, d in ((name, data.get(name)) for name in ("train", "eval")) if isinstance(d, dict))
    title = f"lorafit run: {results.get('artifact', {}).get('name', Path(results.get('run_dir', 'run')).name)}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title><style>{_CSS}</style></head>
<body><main>
<h1>{esc(title)}</h1>
<div class="muted">base {esc(str(results.get('base_model', '')))} &middot; adapter {esc(str(results.get('adapter_dir', '')))}
 &middot; {esc(str(results.get('finished_at', '')))} &middot; {_fmt(results.get('duration_seconds'), 1)} s</div>
<div class="cards">{''.join(cards)}</div>
<h2>Training curves</h2>
<div class="plots">{''.join(figures)}</div>
<h2>Eval metrics before vs after</h2>
<p class="muted">Loss rows: the evaluation before the first step vs the last one. Generation rows: the base model
(adapter disabled) vs the final adapter on the same {(results.get('generation') or {}).get('examples', 0)} eval examples,
greedy decoding. Definitions: docs/eval.md.</p>
<table><tr><th>metric</th><th>before (base)</th><th>after (adapter)</th><th>change</th><th></th></tr>
{''.join(_comparison_rows(results))}</table>
<h2>Sample generations</h2>
<table class="samples"><tr><th>prompt</th><th>reference</th><th>base (no adapter)</th><th>adapter</th></tr>{sample_rows or
'<tr><td colspan="4" class="muted">no samples (no eval data, or eval.generate_samples: 0)</td></tr>'}</table>
{samples_section(results.get("completion_samples") or [])}
{_attack_section(results.get("attack") or {})}
{harness_section(results.get("harness"))}
<h2>Data</h2>
<table><tr><th>split</th><th>rows</th><th>kept</th><th>tokens</th><th>supervised tokens</th><th>sources</th></tr>{data_rows}</table>
<details><summary>Run config</summary><pre>{esc(results.get('config_yaml', ''))}</pre></details>
</main></body></html>
"""


def _attack_section(attack: dict) -> str:
    """Answers of base and adapter to injected requests (docs/objectives.md), when the run measured them."""
    if not attack:
        return ""
    esc = html.escape
    rows = "".join(f"<tr><td><pre>{esc(s['injection'])}</pre><div class='muted'>{esc(s['where'])}</div></td>"
                   f"<td>{esc(s['marker'] or '')}</td><td><pre>{esc(s['base'])}</pre></td><td><pre>{esc(s['adapter'])}</pre></td></tr>"
                   for s in attack.get("samples", []))
    return (f"<h2>Attack success rate</h2><p class='muted'>Share of {attack['examples']} injected eval requests whose "
            f"answer obeys the injection: base {_fmt(attack['base']['attack_success_rate'], 3)}, adapter "
            f"{_fmt(attack['adapter']['attack_success_rate'], 3)}.</p><table class='samples'><tr><th>injection</th>"
            f"<th>marker</th><th>base</th><th>adapter</th></tr>{rows}</table>")


def write_report(run_dir: Path) -> Path:
    """Build ``report.html`` from the run folder's files (atomically replaced)."""
    run_dir = Path(run_dir)
    history = read_history(run_dir)
    results_path = run_dir / RESULTS_FILE
    results = json.loads(results_path.read_text(encoding="utf-8")) if results_path.is_file() else {}
    samples = read_samples(run_dir)  # GRPO runs: answers sampled during training
    if samples:
        results = {**results, "completion_samples": samples}
    harness_path = run_dir / RunFolder.HARNESS
    if harness_path.is_file():
        results = {**results, "harness": json.loads(harness_path.read_text(encoding="utf-8"))}
    path = run_dir / REPORT_FILE
    write_atomic(path, render_html(history, results))
    return path
