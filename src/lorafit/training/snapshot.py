"""What a checkpoint holds of a running loop, and putting it back: the adapter, the optimizer, scheduler and scaler
states, the loop's position and counters, the guard, best-step and objective states, the history, and every
process's RNG and log window. training/checkpoint.py writes the files atomically; this module decides their content.

A resume restores everything before the first resumed step; the RNG last, right before it (``restore_rng``), so
the dropout masks of the next step are the ones the uninterrupted run drew.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from lorafit.training import checkpoint as ckpt
from lorafit.training.rng import capture_rng, restore_rng
from lorafit.training.strategy import (gather_objects, load_adapter_state, load_optimizer_state, optimizer_state,
                                          refuse_deepspeed_resume, world_size)


@dataclass
class Checkpoints:
    """Where and how a run's checkpoints are written, and the state of the one it resumes from."""

    root: Path
    keep_last: int
    keep_best: int
    best_metric: str  # one notion of "best": eval.best's metric and mode
    best_mode: str
    identity: dict  # config, config hash, fingerprints: what a resume is checked against
    tokenizer: object = None  # for the generation metrics the loop logs at evaluations
    forced_resumes: list = field(default_factory=list)
    _saved_step: int | None = None
    _rng: dict | None = None

    # ------------------------------------------------------------------------------------------ saving
    def save(self, loop, adapter: dict[str, torch.Tensor]) -> Path | None:
        """Write the checkpoint of ``loop``'s current step (main process); every process calls it (it gathers)."""
        step = loop.state.step
        if self._saved_step == step:
            return None  # an epoch end right after a step's save is the same state
        self._saved_step = step
        own = {"rng": capture_rng(), "window": loop.window.state_dict()}
        ranks = gather_objects(own)
        optimizer = optimizer_state(loop.model, loop.optimizer, loop.accelerator)
        if not loop.is_main_process:
            return None  # only the main process writes
        scaler = getattr(loop.accelerator, "scaler", None)
        parts = loop.parts
        objective_state = loop.objective.state_dict()
        tree = {
            "optimizer": optimizer,
            "scheduler": loop.scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "loop": loop.state.as_dict(),
            # by class name, as format 1 stored its callbacks' states
            "callbacks": {"NonFiniteGuard": parts.guard.state_dict(), "BestMetric": parts.best.state_dict(),
                          "objective": objective_state, "user": _user_states(parts.callbacks)},
            "ranks": ranks,  # each process's RNG state and log window, in rank order
        }
        tensors: dict[str, torch.Tensor] = {}
        try:
            state_json = ckpt.flatten_state(tree, "state", tensors)
        except TypeError as e:  # only a user callback's state_dict can hold a foreign type
            from lorafit.errors import LorafitError

            raise LorafitError(f"cannot save the checkpoint of step {step}: {e}",
                               why="checkpoints hold JSON values and tensors only (no pickle)",
                               fix="return dicts, lists, numbers, strings and tensors from the callback's "
                               "state_dict()") from None
        records = parts.history.snapshot()
        score = next((r[self.best_metric] for r in reversed(records) if r["step"] == step and self.best_metric in r),
                     None)
        meta = {
            "format": ckpt.FORMAT_VERSION,
            "step": step,
            "epoch": round(loop.state.epoch + loop.state.step_in_epoch / loop.steps_per_epoch, 4),
            "position": {"epoch": loop.state.epoch, "step_in_epoch": loop.state.step_in_epoch,
                         "steps_per_epoch": loop.steps_per_epoch},
            "max_steps": loop.max_steps,
            "world_size": world_size(),
            "strategy": loop.strategy,
            "versions": _versions(),
            "best_metric": self.best_metric,
            "best_metric_value": score,
            **self.identity,
            "forced_resumes": self.forced_resumes,
        }
        peft_config = loop.model.peft_config["default"].to_dict()
        peft_config = {k: sorted(v) if isinstance(v, set) else v for k, v in peft_config.items()}
        files = {
            ckpt.ADAPTER: safetensors_bytes(adapter, metadata={"format": "pt"}),
            "adapter_config.json": (json.dumps(peft_config, indent=2) + "\n").encode(),
            ckpt.STATE_TENSORS: safetensors_bytes(tensors),
            ckpt.STATE_JSON: (json.dumps(state_json) + "\n").encode(),
            ckpt.HISTORY: "".join(json.dumps(r) + "\n" for r in records).encode(),
            ckpt.META: (json.dumps(meta, indent=2) + "\n").encode(),
        }
        return ckpt.commit_checkpoint(self.root, step, files, keep_last=self.keep_last, keep_best=self.keep_best,
                                      best_mode=self.best_mode)

    # ------------------------------------------------------------------------------------------ resuming
    def load(self, loop, folder: Path) -> None:
        """Put a verified checkpoint's state into ``loop`` (every process reads the same files)."""
        meta = ckpt.read_meta(folder)
        refuse_deepspeed_resume(folder, meta.get("strategy", "single"))
        tree = ckpt.unflatten_state(json.loads((folder / ckpt.STATE_JSON).read_text(encoding="utf-8")),
                                    load_file(folder / ckpt.STATE_TENSORS))
        from lorafit.training.loop import LoopState

        load_adapter_state(loop.model, loop.accelerator, load_file(folder / ckpt.ADAPTER))
        load_optimizer_state(loop.model, loop.optimizer, loop.accelerator, tree["optimizer"])
        loop.scheduler.load_state_dict(tree["scheduler"])
        scaler = getattr(loop.accelerator, "scaler", None)
        if scaler is not None and tree["scaler"] is not None:
            scaler.load_state_dict(tree["scaler"])
        loop.state = LoopState(**tree["loop"])
        parts = loop.parts
        saved = tree["callbacks"]
        parts.guard.load_state_dict(saved["NonFiniteGuard"])
        parts.best.load_state_dict(saved["BestMetric"])
        if saved["objective"]:
            loop.objective.load_state_dict(saved["objective"])
        _restore_user_states(parts.callbacks, saved.get("user", {}))
        mine = tree["ranks"][loop.rank]
        loop.window.load_state_dict(mine["window"])
        self._rng = mine["rng"]
        parts.history.restore(ckpt.read_history(folder))
        self._saved_step = meta["step"]  # already on disk

    def restore_rng(self) -> None:
        """Every RNG of this process as it was at the checkpoint; called right before the first resumed step."""
        if self._rng is not None:
            restore_rng(self._rng)
            self._rng = None


def _user_key(index: int, callback) -> str:
    return f"{index}:{type(callback).__name__}"


def _user_states(callbacks) -> dict:
    """The state of every user callback that has one (``state_dict()``), keyed by position and class name: a
    callback that counts or remembers something resumes with it, as the guard and early stopping do."""
    return {_user_key(i, cb): cb.state_dict() for i, cb in enumerate(callbacks) if callable(getattr(cb, "state_dict",
                                                                                                     None))}


def _restore_user_states(callbacks, saved: dict) -> None:
    """Give each user callback back its saved state; a callback the checkpoint has no state for starts fresh, a
    saved state with no callback at its position and class is refused (the resumed run has other callbacks)."""
    from lorafit.errors import LorafitError

    present = {_user_key(i, cb): cb for i, cb in enumerate(callbacks)}
    missing = sorted(set(saved) - set(present))
    if missing:
        raise LorafitError(
            f"the checkpoint holds the state of callback(s) {', '.join(missing)} (position:class) that this run does not have",
            why="a callback's saved state is given back to the callback at the same position with the same class",
            fix="resume with the same callbacks (train(callbacks=[...]) and plugins.callbacks) in the same order")
    for key, state in saved.items():
        present[key].load_state_dict(state)


def _versions() -> dict:
    import peft
    import transformers

    from lorafit import __version__

    return {"lorafit": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__}
