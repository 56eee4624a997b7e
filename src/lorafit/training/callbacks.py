"""The callbacks of a run, in one place and one explicit order (``ordered_callbacks``), the metrics history they
start with, and ``LorafitCallback``: the small public interface for code that watches a run.

Order matters because callbacks share the log dict and the control flags: ``MetricsHistory`` comes first and adds
derived values (tokens/s, perplexity, memory) to the log, so every later one, trackers and the progress display
included, sees them; the guards come before the save schedule's checkpoint so a bad step is never saved; user
callbacks come last and see the run as lorafit's own callbacks left it.
"""

from __future__ import annotations

import math
import resource
import sys
import time

import torch
from transformers import TrainerCallback

from lorafit.evaluate.metrics import GENERATION_METRICS as _GENERATION
from lorafit.run_folder import RunFolder
from lorafit.training.checkpoint import checkpoint_name
from lorafit.training.distributed import sum_across_ranks, world_size
from lorafit.training.source_loss import PREFIX as _SOURCE_LOSS

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


class LorafitCallback:
    """Watch a run: subclass it, override what you need, pass instances as ``train(config, callbacks=[...])``.

    Plain values only, independent of transformers' Trainer: ``step`` is the optimizer step just finished,
    ``logs`` the values logged at it (the keys of metrics_history.jsonl: loss, learning_rate, grad_norm,
    tokens_per_second, ...; empty on steps that log nothing), ``metrics`` an evaluation's values (eval_loss, ...),
    ``checkpoint_dir`` the verified checkpoint folder just written. Return values are ignored; an exception
    stops the run like any error.
    """

    def on_step_end(self, step: int, logs: dict) -> None:
        """After every optimizer step, with what was logged at it (after lorafit added its derived values)."""

    def on_evaluate(self, step: int, metrics: dict) -> None:
        """After every evaluation (at start, periodic, final)."""

    def on_save(self, step: int, checkpoint_dir) -> None:
        """After every checkpoint is committed (renamed into place and verified by its manifest)."""


class _Adapter(TrainerCallback):
    """Carries one LorafitCallback on Trainer's callback system.

    Trainer logs a step's values after its ``on_step_end`` (in its log/evaluate/save phase), so the user's
    ``on_step_end`` is called once that phase is over: at the next step's start, or before an evaluation or a
    save of that step, or at the end of training. Values logged by an evaluation (generation metrics, derived
    perplexity) reach ``on_evaluate`` with Trainer's own metrics.
    """

    def __init__(self, callback: LorafitCallback, trainer_ref):
        self.callback, self._trainer = callback, trainer_ref
        self._step: int | None = None
        self._logs: dict = {}
        self._eval_logs: dict = {}
        self._saved_step: int | None = None

    def on_step_end(self, args, state, control, **kwargs):
        self._flush()
        self._step, self._logs = state.global_step, {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key, value in (logs or {}).items():
            if key.startswith("eval_"):
                self._eval_logs[key] = value
            elif self._step == state.global_step:
                self._logs[key] = value

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self._flush()
        values, self._eval_logs = {**(metrics or {}), **self._eval_logs}, {}
        self.callback.on_evaluate(state.global_step, values)

    def on_save(self, args, state, control, **kwargs):
        self._flush()
        trainer = self._trainer()
        folder = trainer.last_checkpoint if trainer is not None else None
        # Trainer calls on_save after every save request, also when lorafit declined to save (a bad step, or an
        # epoch end right after a step's save): only a checkpoint committed at this step counts, once.
        if folder is not None and folder.name == checkpoint_name(state.global_step) and self._saved_step != state.global_step:
            self._saved_step = state.global_step
            self.callback.on_save(state.global_step, folder)

    def on_step_begin(self, args, state, control, **kwargs):
        self._flush()

    def on_train_end(self, args, state, control, **kwargs):
        self._flush()

    def _flush(self) -> None:
        if self._step is not None:
            step, logs = self._step, self._logs
            self._step, self._logs = None, {}
            self.callback.on_step_end(step, logs)


class SaveSchedule(TrainerCallback):
    """Asks for a checkpoint every ``save_every`` optimizer steps and at the end of each epoch."""

    def __init__(self, save_every: int | None):
        self.save_every = save_every

    def on_step_end(self, args, state, control, **kwargs):
        if self.save_every and state.global_step % self.save_every == 0:
            control.should_save = True

    def on_epoch_end(self, args, state, control, **kwargs):
        control.should_save = True


def ordered_callbacks(trainer, *, history, best, stop, guards, save_every, generation=None, trackers=(),
                      progress=None, user=()) -> list:
    """Every callback of a run, in the order Trainer calls them (after its own DefaultFlowCallback)."""
    import weakref

    ref = weakref.ref(trainer)
    adapted = [_Adapter(cb, ref) if isinstance(cb, LorafitCallback) else cb for cb in user]
    ordered = [history, best, stop, *guards, SaveSchedule(save_every), *([generation] if generation else []),
               *trackers, *([progress] if progress else []), *adapted]
    return ordered


class MetricsHistory(TrainerCallback):
    """Writes ``metrics_history.jsonl``: one JSON object per logged step, train and eval values merged.

    Also measures throughput over training steps only (evaluation time excluded): non-padding tokens per
    second and supervised tokens per second (counted exactly from the labels the model receives in training
    mode), and adds peak memory to every record. Generation metrics (``eval_<metric>``) logged by
    ``evaluate.GenerationEval`` are kept too.
    """

    def __init__(self, run: RunFolder, objective_metrics: set[str] | None = None, perplexity_of: str = "eval_loss",
                 count_forward: bool = True):
        # objective_metrics: names an objective logs (a live set: plugins may add names as they log them).
        # perplexity_of: the eval loss that is a next-token loss (eval_task_loss for the contrastive objective).
        # count_forward: count supervised tokens from the labels the model gets; an objective that computes its
        # own loss may call the model without them and counts through add_supervised instead.
        self.objective_metrics = objective_metrics if objective_metrics is not None else set()
        self.perplexity_of = perplexity_of
        self.count_forward = count_forward
        self.run = run
        run.write_text(run.HISTORY, "")
        self.records: list[dict] = []
        self._pending: dict | None = None
        self.train_seconds = 0.0
        self._step_started: float | None = None
        self._supervised_counted = 0  # over every process
        self._supervised_on_device = None  # this process's count not yet read, summed on the device
        self._hook = None

    # -- supervised tokens: a forward pre-hook sees the labels of every training micro-batch
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None and self._hook is None and self.count_forward:
            self._hook = model.register_forward_pre_hook(self._count_supervised, with_kwargs=True)

    def _count_supervised(self, module, args, kwargs):
        labels = kwargs.get("labels")
        if module.training and labels is not None:
            # No int() here: reading a GPU value in a pre-forward hook would make the CPU wait for the previous
            # step to finish before it queues this forward (measured: ~4% of a 3B step on an H200).
            count = (labels[..., 1:] != -100).sum()  # the first label never has a target
            pending = self._supervised_on_device
            self._supervised_on_device = count if pending is None else pending + count

    def add_supervised(self, tokens: int) -> None:
        count = torch.as_tensor(tokens)
        pending = self._supervised_on_device
        self._supervised_on_device = count if pending is None else pending + count.to(pending.device)

    @property
    def supervised_tokens(self) -> int:
        if self._supervised_on_device is not None:
            self._supervised_counted += int(self._supervised_on_device)
            self._supervised_on_device = None
        return self._supervised_counted

    @supervised_tokens.setter
    def supervised_tokens(self, value: int) -> None:
        self._supervised_counted, self._supervised_on_device = value, None

    # -- throughput: time inside optimizer steps only
    def on_step_begin(self, args, state, control, **kwargs):
        self._step_started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._step_started is not None:
            self.train_seconds += time.perf_counter() - self._step_started
            self._step_started = None
        if world_size() > 1 and self._supervised_on_device is not None:
            # Each process sees only its shard's labels: the step's count is their sum, reduced here, where every
            # process passes at once (a read at logging time could happen on one process only and hang the others).
            self._supervised_counted += sum_across_ranks(int(self._supervised_on_device))
            self._supervised_on_device = None

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
        values.update({k: v for k, v in logs.items() if k.removeprefix("eval_") in self.objective_metrics})
        values.update({k: v for k, v in logs.items() if k.startswith(_SOURCE_LOSS)})  # training loss per source
        if not any(k in values for k in ("loss", "eval_loss")) and not any(k.startswith("eval_") for k in values):
            return  # the end-of-training summary log, not a step
        if self.perplexity_of in values:
            values["eval_perplexity"] = math.exp(min(values[self.perplexity_of], 50.0))
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

    def _flush(self) -> None:
        if self._pending is None:
            return
        self.records.append(self._pending)
        self.run.append_line(self.run.HISTORY, self._pending)
        self._pending = None

    def on_train_end(self, args, state, control, **kwargs):
        self._flush()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def close(self) -> None:
        """Flush a record logged after training (the final evaluation)."""
        self._flush()

    def evaluated_at(self, step: int) -> bool:
        """Whether ``step`` has an eval_loss already (logged, or pending until the next flush)."""
        return any(r["step"] == step and "eval_loss" in r for r in self.snapshot())

    # -- checkpoints: the history up to a step travels with the checkpoint of that step
    def snapshot(self) -> list[dict]:
        return [dict(r) for r in self.records] + ([dict(self._pending)] if self._pending else [])

    def counters(self) -> dict:
        """Running totals that are not in the records yet (between logs); checkpoints carry them."""
        return {"train_seconds": self.train_seconds, "supervised_tokens": self.supervised_tokens}

    def restore(self, records: list[dict], counters: dict) -> None:
        """Continue a resumed run: the file again holds exactly the history up to the checkpoint."""
        self.records = [dict(r) for r in records]
        self._pending = None
        self.train_seconds = counters["train_seconds"]
        self.supervised_tokens = counters.get("supervised_tokens", 0)
        self.run.write_lines(self.run.HISTORY, self.records)
