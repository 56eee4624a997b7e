"""What a person watching a run sees.

On a terminal: a live rich progress bar (step, ETA, loss, tokens/s, peak memory), with messages and evaluation
lines printed above it. Anywhere else (a log file, CI, a pipe): one plain line per log step and per evaluation,
the format ``grep`` and people reading logs rely on; a bar's redraws would fill a log with control codes.

``Progress`` is a Trainer callback. It must be registered after ``MetricsHistory``, which adds the derived values
(tokens/s, perplexity, memory) to the log dict that later callbacks receive. ``info`` prints a message line (above
the bar while one is shown). Only the main process prints, so a multi-process run shows one bar.
"""

from __future__ import annotations

import atexit

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress
from transformers import TrainerCallback

from lorafit.config import GENERATION_METRICS


class Progress(TrainerCallback):
    """``Progress()`` picks the display from stdout: a bar on a terminal, plain lines otherwise.

    ``stream``: where output goes (default: sys.stdout at the time of printing). ``console``: a rich Console to
    use instead; its file receives everything and its ``is_terminal`` decides bar or lines
    (``Console(file=..., force_terminal=True)`` forces a bar).
    """

    def __init__(self, stream=None, *, console: Console | None = None):
        self.console = console or Console(file=stream, highlight=False)
        self._bar: RichProgress | None = None
        self._task = None

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

    # -- Trainer callback events
    def on_train_begin(self, args, state, control, **kwargs):
        if not (self.live and state.is_world_process_zero):
            return
        self.close()
        self._bar = RichProgress(
            TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(), TextColumn("steps"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[values]}"),
            console=self.console,
        )
        # A resumed run starts part-way: the bar starts at the checkpoint's step, not at 0.
        self._task = self._bar.add_task("training", total=state.max_steps, completed=state.global_step, values="")
        self._bar.start()
        # Trainer sends no event when training raises: the caller should close() in a finally; this is the backstop
        # that gives the terminal its cursor back at exit.
        atexit.register(self.close)

    def on_step_end(self, args, state, control, **kwargs):
        if self._bar is not None:
            self._bar.update(self._task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        values = logs or {}
        is_eval = any(k in values for k in ("eval_loss", *(f"eval_{m}" for m in GENERATION_METRICS)))
        if not state.is_world_process_zero or not (is_eval or "loss" in values):
            return  # another process's copy, or the end-of-training summary log (not a step)
        if self._bar is None:
            self.info(format_values(state.global_step, state.max_steps, values))
        elif is_eval:  # evaluations are few and worth keeping on screen: a line above the bar
            self.info(format_values(state.global_step, state.max_steps, values))
        else:
            self._bar.update(self._task, completed=state.global_step, values=bar_values(values))

    def on_train_end(self, args, state, control, **kwargs):
        self.close()


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
    if "eval_loss" in values:  # a preference loss has no perplexity
        ppl = f" (ppl {values['eval_perplexity']:.2f})" if "eval_perplexity" in values else ""
        parts.append(f"eval_loss {values['eval_loss']:.4f}{ppl}")
    parts += [f"{key} {values[key]:.3f}" for key in ("reward_margin", "reward_accuracy", "eval_reward_margin",
                                                     "eval_reward_accuracy") if key in values]
    parts += [f"{name} {values[f'eval_{name}']:.3f}" for name in GENERATION_METRICS if f"eval_{name}" in values]
    return "  ".join(parts)
