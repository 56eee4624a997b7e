"""The non-finite guard: NaN/Inf must not reach the adapter or a checkpoint. (Signals: training/stopping.py;
best-step selection: training/best_step.py.)

It keeps its state in plain values that travel in checkpoints (``state_dict``/``load_state_dict``), so a resumed
run skips exactly as an uninterrupted one. Every decision that changes what the processes do next is taken from
values that are the same on every process (reduced, or logged after reduction).
"""

from __future__ import annotations

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
