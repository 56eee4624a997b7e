"""What may stop a run early, in one place: the non-finite guard (NaN/Inf must not reach the adapter or a
checkpoint), SIGINT/SIGTERM (checkpoint at the next step boundary, then stop), and ``eval.best`` (best-step
selection and early stopping on any logged metric).

Each keeps its state in plain values that travel in checkpoints (``state_dict``/``load_state_dict``), so a resumed
run stops, skips and selects exactly as an uninterrupted one. Every decision that changes what the processes do
next is taken from values that are the same on every process (reduced, or logged after reduction).
"""

from __future__ import annotations

import signal
import sys
import threading

import torch


class NonFiniteGuard:
    """Skips the update of a step whose loss or gradient norm is not finite on any process; stops the run after
    more than ``patience`` such steps in a row. Once tripped, no checkpoint is written, so the last checkpoint on
    disk is the last good one.

    The check runs on the device: ``step_flag`` returns a 0-d tensor the optimizer step reads on the device (torch's
    fused optimizers skip their update, moments and step count included, when it is set: the mechanism GradScaler
    uses for overflowed steps). The host learns what happened only when ``read`` is called, at steps that log,
    evaluate or save, in one transfer. The consecutive count and the trip are also kept on the device, so a trip
    between two reads blocks every later update until the loop reads it and stops.
    """

    def __init__(self, patience: int):
        self.patience = patience
        self.consecutive = 0  # as of the last read
        self.skipped_steps: list[int] = []
        self.tripped_at: int | None = None
        self.reason = ""
        self.last_bad = False  # the newest step read was skipped
        self._pending: list[tuple[int, torch.Tensor]] = []  # (step, [bad loss, bad gradient]) since the last read
        self._run: torch.Tensor | None = None  # consecutive bad steps, on the device
        self._blocked: torch.Tensor | None = None  # tripped, on the device

    @property
    def tripped(self) -> bool:
        return self.tripped_at is not None

    def step_flag(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, reduce_max=None) -> torch.Tensor:
        """The device flag that skips step ``step``'s update: its loss or gradient norm is not finite on some process
        (``reduce_max`` takes the maximum over processes), or the guard tripped since the last read."""
        flags = torch.stack([~torch.isfinite(loss.detach()).all(), ~torch.isfinite(grad_norm.detach()).all()])
        if reduce_max is not None:
            flags = reduce_max(flags.to(torch.uint8)).bool()
        bad = flags.any()
        if self._run is None:
            # torch.full, not torch.tensor: a fill on the device, no host-to-device copy that would wait for it
            self._run = torch.full((), self.consecutive, device=bad.device)
            self._blocked = torch.full((), self.tripped, device=bad.device)
        self._run = torch.where(bad, self._run + 1, torch.zeros_like(self._run))
        self._blocked = self._blocked | (self._run > self.patience)
        self._pending.append((step, flags))
        return bad | self._blocked

    def pending_flags(self) -> torch.Tensor | None:
        """The flags of the steps since the last read, (n, 2), still on the device (for a caller that reads them
        together with other values: ``apply`` then takes the host values)."""
        return torch.stack([f for _, f in self._pending]) if self._pending else None

    def read(self) -> None:
        """Bring the flags of the steps since the last read to the host (one transfer) and update the counts."""
        flags = self.pending_flags()
        self.apply(flags.reshape(-1).tolist() if flags is not None else [])

    def apply(self, flat_flags: list) -> None:
        """Update the counts from the pending steps' flags read on the host (``pending_flags``, flattened)."""
        steps = [step for step, _ in self._pending]
        self._pending = []
        self.last_bad = False
        for i, step in enumerate(steps):
            bad_loss, bad_grad = bool(flat_flags[2 * i]), bool(flat_flags[2 * i + 1])
            if self.tripped:
                break
            self.last_bad = bad_loss or bad_grad
            if not self.last_bad:
                self.consecutive = 0
                continue
            self.consecutive += 1
            self.skipped_steps.append(step)
            if self.consecutive > self.patience:
                self.tripped_at = step
                self.reason = "loss and gradient" if bad_loss and bad_grad else "loss" if bad_loss else "gradient"

    @property
    def clean(self) -> bool:
        """The last step read was good and the guard has not tripped: the state may be checkpointed."""
        return not self.tripped and self.consecutive == 0

    def weights_finite(self, adapter: dict[str, torch.Tensor], step: int) -> bool:
        """Last check before a checkpoint: an update with a finite gradient can still overflow a weight."""
        tensors = [t for t in adapter.values() if t.is_floating_point()]
        # One read for all tensors (a save step reads anyway; one per tensor was one sync per LoRA matrix).
        if not tensors or bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()):
            return True
        self.tripped_at, self.reason = step, "adapter weight"
        return False

    def state_dict(self) -> dict:
        return {"consecutive": self.consecutive, "skipped_steps": list(self.skipped_steps)}

    def load_state_dict(self, state: dict) -> None:
        self.consecutive = state["consecutive"]
        self.skipped_steps = list(state["skipped_steps"])
        self._run = self._blocked = None


# ---------------------------------------------------------------------------------------------- signals

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """Installs the handlers while training runs (main thread only). A signal is recorded whenever it arrives (in
    a forward, an evaluation or in the middle of a checkpoint save) and never dropped: the loop checks ``signal`` at
    every step boundary, saves a checkpoint and stops. A second signal stops at once."""

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


# ---------------------------------------------------------------------------------------------- best step
# Generation metrics and training losses are logged like eval_loss, so best-step selection watches every logged
# value; the best adapter is kept in memory (a LoRA adapter is a few MB, unlike a full model).

def improved(value: float, best: float | None, mode: str, min_delta: float) -> bool:
    """True if ``value`` beats ``best`` by more than ``min_delta`` in the direction ``mode``.

    >>> improved(0.9, 1.0, "min", 0.05), improved(0.96, 1.0, "min", 0.05), improved(0.5, None, "max", 0.0)
    (True, False, True)
    """
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


class BestMetric:
    """Tracks the best value of ``metric``; asks to stop after ``patience`` values without improvement.

    With ``keep_weights``, the trainable (adapter) tensors of the best step are copied to CPU memory each time
    the metric improves; ``restore`` puts them back into the model before the final adapter is written. The values
    it sees are the logged ones, reduced over processes, so every process takes the same decision.
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

    def observe(self, step: int, values: dict, model=None) -> None:
        """Look at one step's logged values (train and evaluation merged)."""
        value = values.get(self.metric)
        if value is None:
            return
        if improved(value, self.best, self.mode, self.min_delta):
            self.best, self.best_step, self.stale = value, step, 0
            if self.keep_weights and model is not None:
                self.best_weights = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters()
                                     if p.requires_grad}
            return
        self.stale += 1
        if self.patience is not None and self.stale >= self.patience and self.stopped_at is None:
            self.stopped_at = step

    @torch.no_grad()
    def restore(self, model) -> bool:
        """Load the best step's adapter weights into ``model``; False if none were kept."""
        if not self.best_weights:
            return False
        params = dict(model.named_parameters())
        for name, tensor in self.best_weights.items():
            params[name].copy_(tensor)
        return True

    # Checkpoints carry this state, so early stopping and the best adapter survive a resume exactly.
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
