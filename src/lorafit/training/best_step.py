"""``eval.best``: best-step selection and early stopping on any logged metric. Generation metrics and training
losses are logged like eval_loss, so best-step selection watches every logged value; the best adapter is kept in
memory (a LoRA adapter is a few MB, unlike a full model). Its state travels in checkpoints, so a resumed run selects
exactly as an uninterrupted one."""

from __future__ import annotations

import torch

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
