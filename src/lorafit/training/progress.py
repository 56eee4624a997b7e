"""What a person watching a run sees.

On a terminal: a live rich progress bar (step, ETA, loss, tokens/s, peak memory), with messages and evaluation
lines printed above it. Anywhere else (a log file, CI, a pipe): one plain line per log step and per evaluation,
the format ``grep`` and people reading logs rely on; a bar's redraws would fill a log with control codes.

The training loop drives it (``start``, ``advance``, ``log``, ``evaluated``, ``close``) with the values it logged,
derived ones included (tokens/s, perplexity, memory). ``info`` prints a message line (above the bar while one is
shown). Only the main process prints, so a multi-process run shows one bar.
"""

from __future__ import annotations

import atexit

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress

from lorafit.config import GENERATION_METRICS
from lorafit.config.objective import CONTRASTIVE_METRICS  # its parts, shown instead of its combined loss


class Progress:
    """``Progress()`` picks the display from stdout: a bar on a terminal, plain lines otherwise.

    ``stream``: where output goes (default: sys.stdout at the time of printing). ``console``: a rich Console to
    use instead; its file receives everything and its ``is_terminal`` decides bar or lines
    (``Console(file=..., force_terminal=True)`` forces a bar).
    """

    def __init__(self, stream=None, *, console: Console | None = None):
        self.console = console or Console(file=stream, highlight=False)
        self._bar: RichProgress | None = None
        self._task = None
        self.max_steps = 0
        self.main_process = True

    @property
    def live(self) -> bool:
        """True when a bar is drawn: output is an interactive terminal that understands cursor movement."""
        return self.console.is_terminal and not self.console.is_dumb_terminal

    def info(self, message: str) -> None:
        if self._bar is not None:
            self._bar.console.print(message, markup=False, highlight=False, soft_wrap=True)
        else:  # plain print, not rich: rich wraps at 80 columns when it is not on a terminal
            print(message, file=self.console.file, flush=True)

    def close(self) -> None:
        """Stop the bar (leaving its last state on screen). Safe to call twice, or with no bar."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
            atexit.unregister(self.close)

    # -- what the training loop tells it
    def start(self, max_steps: int, step: int, *, main_process: bool = True) -> None:
        """Training starts (a resumed run at its checkpoint's step)."""
        self.main_process, self.max_steps = main_process, max_steps
        if not (self.live and main_process):
            return
        self.close()
        self._bar = RichProgress(
            TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(), TextColumn("steps"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[values]}"),
            console=self.console,
        )
        self._task = self._bar.add_task("training", total=max_steps, completed=step, values="")
        self._bar.start()
        # If training raises, the caller's finally should close(); this backstop gives the terminal its cursor back.
        atexit.register(self.close)

    def advance(self, step: int) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=step)

    def log(self, step: int, values: dict) -> None:
        """A training log line (loss, learning rate, ...): a plain line, or the bar's values on a terminal."""
        if not getattr(self, "main_process", True):
            return
        if self._bar is None:
            self.info(format_values(step, self.max_steps, values))
        else:
            self._bar.update(self._task, completed=step, values=bar_values(values))

    def evaluated(self, step: int, values: dict) -> None:
        """An evaluation: always a line (above the bar on a terminal), they are few and worth keeping on screen."""
        if getattr(self, "main_process", True):
            self.info(format_values(step, self.max_steps, values))


def bar_values(values: dict) -> str:
    """The latest step's numbers for the bar: loss, tokens/s and peak memory (GPU when there is one)."""
    parts = []
    if "loss" in values:
        parts.append(f"loss {values['loss']:.4f}")
    if "tokens_per_second" in values:
        parts.append(f"{values['tokens_per_second']:,.0f} tok/s")
    if values.get("gpu_allocated_peak_mb"):
        parts.append(f"GPU {values['gpu_allocated_peak_mb']:,.0f} MB")
    elif values.get("peak_rss_mb"):
        parts.append(f"RSS {values['peak_rss_mb']:,.0f} MB")
    return "  ".join(parts)


def format_values(step: int, max_steps: int, values: dict) -> str:
    parts = [f"step {step:>5}/{max_steps}"]
    if "loss" in values:
        parts.append(f"loss {values['loss']:.4f}")
    if "learning_rate" in values:
        parts.append(f"lr {values['learning_rate']:.2e}")
    if "grad_norm" in values:
        parts.append(f"grad {values['grad_norm']:.3f}")
    if "tokens_per_second" in values:
        parts.append(f"{values['tokens_per_second']:,.0f} tok/s")
    if "eval_causal_stability" in values:  # contrastive: a combined loss (may be negative) has no perplexity
        parts += [f"eval_{k} {values[f'eval_{k}']:.4f}" for k in CONTRASTIVE_METRICS if f"eval_{k}" in values]
        if "eval_perplexity" in values:
            parts.append(f"(task ppl {values['eval_perplexity']:.2f})")
    elif "eval_loss" in values:  # a preference loss has no perplexity
        ppl = f" (ppl {values['eval_perplexity']:.2f})" if "eval_perplexity" in values else ""
        parts.append(f"eval_loss {values['eval_loss']:.4f}{ppl}")
    parts += [f"{key} {values[key]:.3f}" for key in ("reward_margin", "reward_accuracy", "eval_reward_margin",
                                                     "eval_reward_accuracy", "reward", "eval_reward", "kl",
                                                     "generation_seconds") if key in values]
    parts += [f"{name} {values[f'eval_{name}']:.3f}" for name in GENERATION_METRICS if f"eval_{name}" in values]
    return "  ".join(parts)
