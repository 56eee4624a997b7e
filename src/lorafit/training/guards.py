"""The non-finite guard: a NaN or Inf loss or gradient must not reach the adapter weights or a checkpoint."""

from __future__ import annotations

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
        bad_grad = bool(grads) and not bool(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]).isfinite().all())
        bad_loss = self._bad_loss is not None and bool(self._bad_loss)
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
