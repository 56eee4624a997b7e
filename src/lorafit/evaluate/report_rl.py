"""The report's GRPO section: the reward curve (total and per reward function, training and evaluation), KL and
answer length, and a few sampled answers with their rewards at several steps (``completion_samples.jsonl``)."""

from __future__ import annotations

import html
import json
from pathlib import Path

PALETTE = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C"]
SAMPLE_STEPS = 4  # steps whose sampled answers the report shows: the first, the last, and evenly between


def rl_plots(history: list[dict], figure, series) -> list[tuple[str, str | None, str]]:
    """(title, chart or None, note) of the GRPO plots; [] for runs that logged no reward. ``figure`` and ``series``
    are report_plots.py's ``_figure`` and ``_series``."""
    if not any(series(history, k)[0] for k in ("reward", "eval_reward")):
        return []
    functions = sorted({k.removeprefix("reward/") for r in history for k in r if k.startswith("reward/")})
    lines = [("total (train)", *series(history, "reward"), PALETTE[0]),
             ("total (eval)", *series(history, "eval_reward"), PALETTE[1])]
    lines += [(f"{name} (train)", *series(history, f"reward/{name}"), PALETTE[(i + 2) % len(PALETTE)])
              for i, name in enumerate(functions)]
    out = [("Rewards", figure("Reward per answer (GRPO)", "mean reward", lines), "")]
    kl = [("KL (train)", *series(history, "kl"), PALETTE[0]), ("KL (eval)", *series(history, "eval_kl"), PALETTE[1])]
    if any(points for _, points, _, _ in kl):
        out.append(("KL to the reference", figure("KL to the base model (per answer token)", "nats", kl), ""))
    out.append(("Answer length", figure("Sampled answer length", "tokens", [
        ("train", *series(history, "completion_length"), PALETTE[0]),
        ("eval", *series(history, "eval_completion_length"), PALETTE[1])]), ""))
    return out


def read_samples(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "completion_samples.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def samples_section(samples: list[dict]) -> str:
    """Sampled answers at a few steps spread over the run, each with its rewards; "" when there are none."""
    if not samples:
        return ""
    esc = html.escape
    steps = sorted({s["step"] for s in samples})
    if len(steps) > SAMPLE_STEPS:
        steps = [steps[round(i * (len(steps) - 1) / (SAMPLE_STEPS - 1))] for i in range(SAMPLE_STEPS)]
    rows = []
    for step in steps:
        shown = [s for s in samples if s["step"] == step]
        prompt = f"<pre>{esc(shown[0]['prompt'])}</pre><div class='muted'>{esc(shown[0]['where'])}</div>"
        for i, s in enumerate(shown):
            parts = ", ".join(f"{esc(name)} {value:.3f}" for name, value in s["rewards"].items())
            rows.append(f"<tr><td class='num'>{step if i == 0 else ''}</td><td>{prompt if i == 0 else ''}</td>"
                        f"<td><pre>{esc(s['completion'])}</pre></td><td class='num'>{s['reward']:.3f}</td>"
                        f"<td class='muted'>{parts}</td></tr>")
    return ("<h2>Sampled answers during training</h2><p class='muted'>The answers GRPO sampled for the first prompt "
            "of a logged step, with their total reward and each reward function's (completion_samples.jsonl).</p>"
            "<table class='samples'><tr><th>step</th><th>prompt</th><th>answer</th><th>reward</th><th>per function"
            f"</th></tr>{''.join(rows)}</table>")
