"""Optional Trainer callbacks that survive a resume: early stopping and peak memory.

The interface for callbacks (lorafit's and users', passed as ``train(config, extra_callbacks=[...])``): any
``transformers.TrainerCallback``. A callback that keeps state across steps and must resume exactly also defines

    state_dict(self) -> dict           # JSON-able values, or tensors (stored in safetensors)
    load_state_dict(self, state: dict) -> None

and lorafit stores that state in every checkpoint under the callback's class name (so one instance per class)
and restores it before a resumed run's first step. See docs/resume.md.
"""

from __future__ import annotations

import resource
import sys

import torch
from transformers import TrainerCallback


class EarlyStopping(TrainerCallback):
    """Stop when ``metric`` (an evaluation metric, e.g. eval_loss) has not improved by ``min_delta`` for
    ``patience`` evaluations in a row. Its counters are saved in checkpoints, so a resumed run stops at the same step."""

    def __init__(self, metric: str = "eval_loss", patience: int = 3, min_delta: float = 0.0, mode: str = "min"):
        self.metric, self.patience, self.min_delta, self.mode = metric, patience, min_delta, mode
        self.best: float | None = None
        self.bad_evaluations = 0
        self.stopped_at: int | None = None

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        value = (metrics or {}).get(self.metric)
        if value is None:
            return
        better = self.best is None or (
            value < self.best - self.min_delta if self.mode == "min" else value > self.best + self.min_delta
        )
        if better:
            self.best, self.bad_evaluations = value, 0
            return
        self.bad_evaluations += 1
        if self.bad_evaluations >= self.patience:
            self.stopped_at = state.global_step
            control.should_training_stop = True

    def state_dict(self) -> dict:
        return {"best": self.best, "bad_evaluations": self.bad_evaluations}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.bad_evaluations = state["best"], state["bad_evaluations"]


class MemoryMonitor(TrainerCallback):
    """Adds the process's peak memory (and the accelerator's, when there is one) to every train log record."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs:
            return
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        logs["peak_rss_mb"] = round(peak_kb / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)
        if torch.cuda.is_available():
            logs["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
