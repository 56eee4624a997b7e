"""``LorafitCallback``, the public interface for code that watches a run, and ``MetricsHistory``, the run's
``metrics_history.jsonl``.

Events, in the order the loop (training/loop.py) sends them:

    on_train_begin(loop)                       once, before the first step (after a resume's state is loaded)
    on_evaluate_begin(step, loop)              before each evaluation (at start: step 0)
    on_evaluate(step, metrics)                 after it, with eval_loss, eval_<metric>, perplexity ...
    on_step_begin(step, loop)                  before the first micro-batch of optimizer step ``step`` (1-based)
    on_before_optimizer_step(step, loop)       gradients accumulated, clipped and checked; the update comes next
    on_step_end(step, logs)                    after the step's log line and evaluation; ``logs`` is what was
                                               logged at it (empty on steps that log nothing)
    on_save(step, checkpoint_dir)              after the step's checkpoint is committed (after on_step_end, so the
                                               checkpoint holds callback states that saw the whole step)
    on_train_end(step, loop)                   once, after the last step (also after an early stop)

``loop`` is the running ``TrainingLoop``: read ``loop.model`` (the adapter model), ``loop.optimizer``,
``loop.step``, ``loop.max_steps``, ``loop.settings``; changing them is at your own risk. Return values are ignored;
an exception stops the run like any error. Every process calls the events; ``loop.is_main_process`` says which one
prints or writes.

A callback with ``state_dict()`` (returning JSON-able values and tensors) and ``load_state_dict(state)`` has its
state saved in every checkpoint (the main process's) and given back on resume, before ``on_train_begin``.
"""

from __future__ import annotations

import math
import resource
import sys

import torch

from lorafit.run_folder import RunFolder

# A version-1 callback written for transformers' Trainer has on_log/on_pre_optimizer_step(args, state, control, ...)
TRAINER_EVENTS = ("on_log", "on_pre_optimizer_step", "on_epoch_end", "on_prediction_step", "on_optimizer_step")


def peak_memory() -> dict[str, float]:
    """Peak resident memory of this process (MB) and, on CUDA, peak allocated and reserved GPU memory (MB)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux, bytes on macOS
    out = {"peak_rss_mb": round(rss / (2**20 if sys.platform == "darwin" else 2**10), 1)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["gpu_allocated_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        out["gpu_reserved_peak_mb"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
    return out


class LorafitCallback:
    """Watch a run: subclass it, override what you need, pass instances as ``train(config, callbacks=[...])`` or
    name the class in ``plugins.callbacks``. The events and their order are in this module's docstring."""

    def on_train_begin(self, loop) -> None:
        """Once, before the first step."""

    def on_step_begin(self, step: int, loop) -> None:
        """Before optimizer step ``step`` (1-based) starts."""

    def on_before_optimizer_step(self, step: int, loop) -> None:
        """Gradients of step ``step`` are final (clipped); the optimizer updates next."""

    def on_step_end(self, step: int, logs: dict) -> None:
        """After every optimizer step, with what was logged at it (after lorafit added its derived values)."""

    def on_evaluate_begin(self, step: int, loop) -> None:
        """Before every evaluation (at start, periodic, final)."""

    def on_evaluate(self, step: int, metrics: dict) -> None:
        """After every evaluation (at start, periodic, final)."""

    def on_save(self, step: int, checkpoint_dir) -> None:
        """After every checkpoint is committed (renamed into place and verified by its manifest)."""

    def on_train_end(self, step: int, loop) -> None:
        """Once, after the last step."""


def check_callbacks(callbacks) -> list[LorafitCallback]:
    """The callbacks a run was given, refusing objects that are not LorafitCallbacks (a transformers
    TrainerCallback would silently never be called: lorafit no longer runs transformers' Trainer)."""
    from lorafit.errors import LorafitError

    for callback in callbacks:
        if not isinstance(callback, LorafitCallback):
            trainer_style = any(hasattr(callback, name) for name in TRAINER_EVENTS)
            raise LorafitError(
                f"callback {type(callback).__name__} is not a lorafit.LorafitCallback",
                why="lorafit runs its own training loop (training/loop.py), not transformers' Trainer, so "
                + ("TrainerCallback events (on_log, on_pre_optimizer_step ...) are never sent"
                   if trainer_style else "only LorafitCallback events are sent"),
                fix="derive the class from lorafit.LorafitCallback and use its events (on_step_end(step, logs), "
                "on_before_optimizer_step(step, loop), ...; docs/design.md, 'Callbacks')",
            )
    return list(callbacks)


def dispatch(callbacks, event: str, *args) -> None:
    for callback in callbacks:
        getattr(callback, event)(*args)


# ---------------------------------------------------------------------------------------------- history


class MetricsHistory:
    """Writes ``metrics_history.jsonl``: one JSON object per logged step, train and eval values merged.

    A step's record stays pending until the next step's values arrive (or ``close``), so an evaluation after the
    last step (the recipe's final one) joins that step's line. ``perplexity_of``: the eval loss that is a next-token
    loss (eval_task_loss for the contrastive objective; None for objectives without one).
    """

    def __init__(self, run: RunFolder, perplexity_of: str | None = "eval_loss"):
        self.perplexity_of = perplexity_of
        self.run = run
        run.write_text(run.HISTORY, "")
        self.records: list[dict] = []
        self._pending: dict | None = None

    def add(self, step: int, values: dict) -> dict:
        """Merge ``values`` into step ``step``'s record; returns them with the derived eval_perplexity."""
        values = dict(values)
        if self.perplexity_of is not None and self.perplexity_of in values:
            values["eval_perplexity"] = math.exp(min(values[self.perplexity_of], 50.0))
        if self._pending is not None and self._pending["step"] != step:
            self._flush()
        if self._pending is None:
            self._pending = {"step": step}
        self._pending.update(values)
        return values

    def _flush(self) -> None:
        if self._pending is None:
            return
        self.records.append(self._pending)
        self.run.append_line(self.run.HISTORY, self._pending)
        self._pending = None

    def close(self) -> None:
        """Write the pending record (the last step's, with the final evaluation)."""
        self._flush()

    def evaluated_at(self, step: int) -> bool:
        """Whether ``step`` has an eval_loss already (written, or pending until the next flush)."""
        return any(r["step"] == step and "eval_loss" in r for r in self.snapshot())

    # -- checkpoints: the history up to a step travels with the checkpoint of that step
    def snapshot(self) -> list[dict]:
        return [dict(r) for r in self.records] + ([dict(self._pending)] if self._pending else [])

    def restore(self, records: list[dict]) -> None:
        """Continue a resumed run: the history up to the checkpoint, its last record pending again (so values
        logged later at the same step, such as a final evaluation, join it rather than repeat the step)."""
        self.records = [dict(r) for r in records[:-1]]
        self._pending = dict(records[-1]) if records else None
        self.run.write_lines(self.run.HISTORY, self.records)
