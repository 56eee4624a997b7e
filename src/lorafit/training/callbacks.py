"""Trainer callbacks: the metrics history file, throughput, and one readable progress line per log."""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from lorafit.evaluate.metrics import GENERATION_METRICS as _GENERATION

# Trainer's log keys -> the names lorafit writes (short and stable across transformers versions).
_KEYS = {"loss": "loss", "learning_rate": "learning_rate", "grad_norm": "grad_norm", "eval_loss": "eval_loss", "epoch": "epoch"}




def peak_memory() -> dict[str, float]:
    """Peak resident memory of this process (MB) and, on CUDA, peak allocated and reserved GPU memory (MB)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux, bytes on macOS
    out = {"peak_rss_mb": round(rss / (2**20 if sys.platform == "darwin" else 2**10), 1)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["gpu_allocated_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        out["gpu_reserved_peak_mb"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
    return out


class MetricsHistory(TrainerCallback):
    """Writes ``metrics_history.jsonl``: one JSON object per logged step, train and eval values merged.

    Also measures throughput over training steps only (evaluation time excluded): non-padding tokens per
    second and supervised tokens per second (counted exactly from the labels the model receives in training
    mode), and adds peak memory to every record. Generation metrics (``eval_<metric>``) logged by
    ``evaluate.GenerationEval`` are kept too.
    """

    def __init__(self, path: Path, echo=None):
        self.path = Path(path)
        self.path.write_text("", encoding="utf-8")
        self.echo = echo
        self.records: list[dict] = []
        self._pending: dict | None = None
        self.train_seconds = 0.0
        self._step_started: float | None = None
        self.supervised_tokens = 0
        self._hook = None

    # -- supervised tokens: a forward pre-hook sees the labels of every training micro-batch
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None and self._hook is None:
            self._hook = model.register_forward_pre_hook(self._count_supervised, with_kwargs=True)

    def _count_supervised(self, module, args, kwargs):
        labels = kwargs.get("labels")
        if module.training and labels is not None:
            self.supervised_tokens += int((labels[..., 1:] != -100).sum())  # the first label never has a target

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

    def supervised_tokens_per_second(self) -> float | None:
        if not self.train_seconds or not self.supervised_tokens:
            return None
        return self.supervised_tokens / self.train_seconds

    # -- history
    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs if logs is not None else {}
        values = {name: logs[key] for key, name in _KEYS.items() if key in logs}
        values.update({k: v for k, v in logs.items() if k.startswith("eval_") and k.removeprefix("eval_") in _GENERATION})
        if not any(k in values for k in ("loss", "eval_loss")) and not any(k.startswith("eval_") for k in values):
            return  # the end-of-training summary log, not a step
        if "eval_loss" in values:
            values["eval_perplexity"] = math.exp(min(values["eval_loss"], 50.0))
        if "loss" in values:
            speed = self.tokens_per_second(state)
            if speed is not None:
                values["tokens_per_second"] = round(speed, 1)
            supervised = self.supervised_tokens_per_second()
            if supervised is not None:
                values["supervised_tokens_per_second"] = round(supervised, 1)
            values["num_input_tokens_seen"] = int(state.num_input_tokens_seen)
            values["supervised_tokens_seen"] = self.supervised_tokens
        values.update(peak_memory())
        # Callbacks after this one (TensorBoard, and MLflow/W&B when this one runs first) log the same dict: the
        # derived values reach every tracker, not only this file.
        logs.update({k: v for k, v in values.items() if k not in logs and k not in ("num_input_tokens_seen", "supervised_tokens_seen")})
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
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def close(self) -> None:
        """Flush a record logged after training (the final evaluation)."""
        self._flush()

    # -- checkpoints: the history up to a step travels with the checkpoint of that step
    def snapshot(self) -> list[dict]:
        return [dict(r) for r in self.records] + ([dict(self._pending)] if self._pending else [])

    def counters(self) -> dict:
        """Running totals that are not in the records yet (between logs); checkpoints carry them."""
        return {"train_seconds": self.train_seconds, "supervised_tokens": self.supervised_tokens}

    def restore(self, records: list[dict], counters: dict) -> None:
        """Continue a resumed run: the file again holds exactly the history up to the checkpoint."""
        from lorafit.run_folder import write_atomic

        self.records = [dict(r) for r in records]
        self._pending = None
        self.train_seconds = counters["train_seconds"]
        self.supervised_tokens = counters.get("supervised_tokens", 0)
        write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in self.records))
