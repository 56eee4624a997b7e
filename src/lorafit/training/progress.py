"""What a person watching a run sees: one line per log step and per evaluation.

``Progress`` is a Trainer callback. It must be registered after ``MetricsHistory``, which adds the derived values
(tokens/s, perplexity, memory) to the log dict that later callbacks receive. ``info`` prints a message line.
"""

from __future__ import annotations

import sys

from transformers import TrainerCallback

from lorafit.config import GENERATION_METRICS


class Progress(TrainerCallback):
    def __init__(self, stream=None):
        self.stream = stream

    def info(self, message: str) -> None:
        print(message, file=self.stream or sys.stdout, flush=True)

    def on_log(self, args, state, control, logs=None, **kwargs):
        values = logs or {}
        if not any(k in values for k in ("loss", "eval_loss", *(f"eval_{m}" for m in GENERATION_METRICS))):
            return  # the end-of-training summary log, not a step
        self.info(format_values(state.global_step, state.max_steps, values))


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
    if "eval_loss" in values:
        parts.append(f"eval_loss {values['eval_loss']:.4f} (ppl {values['eval_perplexity']:.2f})")
    parts += [f"{name} {values[f'eval_{name}']:.3f}" for name in GENERATION_METRICS if f"eval_{name}" in values]
    return "  ".join(parts)
