"""Trainer callbacks: the metrics history file, throughput, and one readable progress line per log."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from transformers import TrainerCallback

# Trainer's log keys -> the names lorafit writes (short and stable across transformers versions).
_KEYS = {"loss": "loss", "learning_rate": "learning_rate", "grad_norm": "grad_norm", "eval_loss": "eval_loss", "epoch": "epoch",
         "peak_rss_mb": "peak_rss_mb", "peak_gpu_mb": "peak_gpu_mb"}  # the last two from monitors.MemoryMonitor


class MetricsHistory(TrainerCallback):
    """Writes ``metrics_history.jsonl``: one JSON object per logged step, train and eval values merged.

    Also measures throughput over training steps only (evaluation time excluded): non-padding tokens per
    second and supervised tokens per second.
    """

    def __init__(self, path: Path, echo=None):
        self.path = Path(path)
        self.path.write_text("", encoding="utf-8")
        self.echo = echo
        self.records: list[dict] = []
        self._pending: dict | None = None
        self.train_seconds = 0.0
        self._step_started: float | None = None

    # -- throughput: time inside optimizer steps only
    def on_step_begin(self, args, state, control, **kwargs):
        self._step_started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._step_started is not None:
            self.train_seconds += time.perf_counter() - self._step_started
            self._step_started = None

    def tokens_per_second(self, state) -> float | None:
        if not self.train_seconds or not state.num_input_tokens_seen:
            return None
        return state.num_input_tokens_seen / self.train_seconds

    # -- history
    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        values = {name: logs[key] for key, name in _KEYS.items() if key in logs}
        if not any(k in values for k in ("loss", "eval_loss")):
            return  # the end-of-training summary log, not a step
        if "eval_loss" in values:
            values["eval_perplexity"] = math.exp(min(values["eval_loss"], 50.0))
        if "loss" in values:
            speed = self.tokens_per_second(state)
            if speed is not None:
                values["tokens_per_second"] = round(speed, 1)
            values["num_input_tokens_seen"] = int(state.num_input_tokens_seen)
        if self._pending is not None and self._pending["step"] != state.global_step:
            self._flush()
        if self._pending is None:
            self._pending = {"step": state.global_step}
        self._pending.update(values)
        if self.echo:
            self.echo(state.global_step, state.max_steps, values)

    def _flush(self) -> None:
        if self._pending is None:
            return
        self.records.append(self._pending)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(self._pending) + "\n")
        self._pending = None

    def on_train_end(self, args, state, control, **kwargs):
        self._flush()

    def close(self) -> None:
        """Flush a record logged after training (the final evaluation)."""
        self._flush()

    # -- checkpoints: the history up to a step travels with the checkpoint of that step
    def snapshot(self) -> list[dict]:
        return [dict(r) for r in self.records] + ([dict(self._pending)] if self._pending else [])

    def restore(self, records: list[dict], train_seconds: float) -> None:
        """Continue a resumed run: the file again holds exactly the history up to the checkpoint."""
        from lorafit.run_files import write_atomic

        self.records = [dict(r) for r in records]
        self._pending = None
        self.train_seconds = train_seconds
        write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in self.records))
