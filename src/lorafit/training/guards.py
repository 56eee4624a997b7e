"""What may stop a run early, in one place: the non-finite guard (NaN/Inf must not reach the adapter or a
checkpoint), SIGINT/SIGTERM (checkpoint at the next step boundary, then stop), and ``eval.best`` (best-step
selection and early stopping on any logged metric).

Each is a Trainer callback whose state travels in checkpoints (``state_dict``/``load_state_dict``), so a resumed
run stops, skips and selects exactly as an uninterrupted one.
"""

from __future__ import annotations

import signal
import sys
import threading

import torch
from transformers import TrainerCallback

class NonFiniteGuard(TrainerCallback):
    """Skips the update of a step whose loss or gradient is not finite; stops the run after ``patience``
    consecutive such steps. Once tripped, no checkpoint is written (the trainer asks ``tripped``), so the last
    checkpoint on disk is the last good one.

    Skipping works by dropping every gradient (``grad = None``): torch optimizers leave such parameters and their
    moments untouched, whereas a zero gradient would still move Adam's weights through its momentum.
    """

    def __init__(self, patience: int):
        self.patience = patience
        self.consecutive = 0
        self.skipped_steps: list[int] = []
        self.tripped_at: int | None = None
        self.reason = ""
        self._bad_loss: torch.Tensor | None = None

    @property
    def tripped(self) -> bool:
        return self.tripped_at is not None

    def observe_loss(self, loss: torch.Tensor) -> None:
        """Called by the trainer for each micro-batch; kept on the device until the step ends (no sync per batch)."""
        bad = ~torch.isfinite(loss.detach()).all()
        self._bad_loss = bad if self._bad_loss is None else self._bad_loss | bad

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
        # One device read per optimizer step for both checks (each bool() of a GPU tensor waits for the GPU).
        flags = torch.zeros(2, dtype=torch.bool, device=grads[0].device if grads else "cpu")
        if grads:
            flags[0] = ~torch.isfinite(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])).all()
        if self._bad_loss is not None:
            flags[1] = self._bad_loss.to(flags.device)
        bad_grad, bad_loss = flags.tolist()
        self._bad_loss = None
        if not (bad_loss or bad_grad):
            self.consecutive = 0
            return
        step = state.global_step + 1  # the step being taken
        self.consecutive += 1
        self.skipped_steps.append(step)
        for param in model.parameters():
            param.grad = None
        if self.consecutive > self.patience:
            self.tripped_at = step
            self.reason = "loss" if bad_loss else "gradient"
            if bad_loss and bad_grad:
                self.reason = "loss and gradient"
            control.should_training_stop = True

    def weights_finite(self, adapter_safetensors: bytes, step: int) -> bool:
        """Last check before a checkpoint: an update with a finite gradient can still overflow a weight."""
        from safetensors.torch import load

        if all(torch.isfinite(t).all() for t in load(adapter_safetensors).values()):
            return True
        self.tripped_at, self.reason = step, "adapter weight"
        return False

    def state_dict(self) -> dict:
        return {"consecutive": self.consecutive, "skipped_steps": list(self.skipped_steps)}

    def load_state_dict(self, state: dict) -> None:
        self.consecutive = state["consecutive"]
        self.skipped_steps = list(state["skipped_steps"])


# ---------------------------------------------------------------------------------------------- signals

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest(TrainerCallback):
    """Installs the handlers while training runs (main thread only) and, at the first step end after a signal,
    asks Trainer to save a checkpoint and stop. ``signal`` holds the first signal received, or None."""

    def __init__(self):
        self.signal: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:
            # Second signal: the user does not want to wait for the step. A save cut short here leaves only a
            # staging folder, which is never resumed from and is removed by the next run.
            raise KeyboardInterrupt
        self.signal = signum
        print(
            f"\n{signal.Signals(signum).name} received: saving a checkpoint after this step, then stopping "
            "(send it again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    @property
    def exit_code(self) -> int:
        """The shell convention for a process ended by a signal: 128 + its number (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + (self.signal or 0)

    def on_step_end(self, args, state, control, **kwargs):
        if self.signal is not None:
            control.should_save = True
            control.should_training_stop = True


# ---------------------------------------------------------------------------------------------- best step
# transformers' EarlyStoppingCallback only watches metrics passed to ``on_evaluate`` and needs checkpoints saved
# for ``load_best_model_at_end``; lorafit's generation metrics arrive through ``on_log``, so this callback watches
# the log and keeps the best adapter weights in memory (a LoRA adapter is a few MB, unlike a full model).

def improved(value: float, best: float | None, mode: str, min_delta: float) -> bool:
    """True if ``value`` beats ``best`` by more than ``min_delta`` in the direction ``mode``.

    >>> improved(0.9, 1.0, "min", 0.05), improved(0.96, 1.0, "min", 0.05), improved(0.5, None, "max", 0.0)
    (True, False, True)
    """
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


class BestMetric(TrainerCallback):
    """Tracks the best value of ``metric``; stops training after ``patience`` values without improvement.

    With ``keep_weights``, the trainable (adapter) tensors of the best step are copied to CPU memory each time
    the metric improves; ``restore`` puts them back into the model before the final adapter is written.
    """

    def __init__(self, metric: str, mode: str, *, patience: int | None = None, min_delta: float = 0.0,
                 keep_weights: bool = False):
        self.metric, self.mode, self.patience, self.min_delta = metric, mode, patience, min_delta
        self.keep_weights = keep_weights
        self.best: float | None = None
        self.best_step: int | None = None
        self.stale = 0
        self.stopped_at: int | None = None
        self.best_weights: dict[str, torch.Tensor] | None = None
        self._model = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._model = model

    def on_log(self, args, state, control, logs=None, **kwargs):
        value = (logs or {}).get(self.metric)
        if value is None:
            return
        if improved(value, self.best, self.mode, self.min_delta):
            self.best, self.best_step, self.stale = value, state.global_step, 0
            if self.keep_weights and self._model is not None:
                self.best_weights = {n: p.detach().to("cpu", copy=True) for n, p in self._model.named_parameters()
                                     if p.requires_grad}
            return
        self.stale += 1
        if self.patience is not None and self.stale >= self.patience and self.stopped_at is None:
            self.stopped_at = state.global_step
            control.should_training_stop = True

    @torch.no_grad()
    def restore(self, model) -> bool:
        """Load the best step's adapter weights into ``model``; False if none were kept."""
        if not self.best_weights:
            return False
        params = dict(model.named_parameters())
        for name, tensor in self.best_weights.items():
            params[name].copy_(tensor)
        return True

    # Checkpoints carry this state (lorafit's callback interface, docs/resume.md), so early stopping and the best
    # adapter survive a resume exactly.
    def state_dict(self) -> dict:
        state = {"best": self.best, "best_step": self.best_step, "stale": self.stale, "stopped_at": self.stopped_at}
        if self.best_weights:
            state["best_weights"] = dict(self.best_weights)
        return state

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_step, self.stale, self.stopped_at = (
            state["best"], state["best_step"], state["stale"], state["stopped_at"])
        self.best_weights = dict(state["best_weights"]) if state.get("best_weights") else None

    def as_dict(self) -> dict:
        return {"metric": self.metric, "mode": self.mode, "value": self.best, "step": self.best_step,
                "stopped_early_at": self.stopped_at, "patience": self.patience, "min_delta": self.min_delta}
