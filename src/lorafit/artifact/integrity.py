"""Proof that training touched only the adapter, and that the adapter actually learned something."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from lorafit.errors import LorafitError
from lorafit.hashing import combined_digest, tensor_digest
from lorafit.model.lora_init import initial_adapter


def _quant_state_tensors(param) -> dict[str, torch.Tensor]:
    """bitsandbytes keeps 4-bit scales outside the parameter (``quant_state``); they are base weights too."""
    state = getattr(param, "quant_state", None)
    if state is None or not hasattr(state, "as_dict"):
        return {}
    return {k: v for k, v in state.as_dict(packed=True).items() if isinstance(v, torch.Tensor)}


def frozen_fingerprint(model) -> dict[str, str]:
    """Digest of every frozen parameter and buffer-like quantisation state, by name.

    For a quantised base this hashes the quantised storage (what is actually used), not a dequantised copy.
    """
    digests: dict[str, str] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            continue
        digests[name] = tensor_digest(param)
        for key, tensor in _quant_state_tensors(param).items():
            digests[f"{name}#{key}"] = tensor_digest(tensor)
    return digests


@dataclass
class BaseWeightCheck:
    """Fingerprint of every frozen tensor before training, compared after. Its cost is measured and recorded."""

    before: dict[str, str]
    seconds: float
    after_digests: dict[str, str] = field(default_factory=dict)

    @classmethod
    def start(cls, model) -> "BaseWeightCheck":
        began = time.perf_counter()
        digests = frozen_fingerprint(model)
        return cls(before=digests, seconds=time.perf_counter() - began)

    def finish(self, model) -> None:
        began = time.perf_counter()
        self.after_digests = frozen_fingerprint(model)
        self.seconds += time.perf_counter() - began
        changed = sorted(n for n in set(self.before) | set(self.after_digests) if self.before.get(n) != self.after_digests.get(n))
        if changed:
            raise LorafitError(
                f"base weights changed during training: {', '.join(changed[:10])}"
                + (f" and {len(changed) - 10} more" if len(changed) > 10 else ""),
                why="only adapter weights may train; with a changed base the adapter is not valid for the base you ship",
                fix="report this as a bug with the config; no artifact was written",
            )

    @property
    def unchanged(self) -> bool:
        return bool(self.after_digests) and self.after_digests == self.before

    def as_dict(self) -> dict:
        return {
            "unchanged": self.unchanged,
            "tensors": len(self.before),
            "fingerprint": combined_digest(self.before),
            "fingerprint_after": combined_digest(self.after_digests) if self.after_digests else None,
            "seconds": round(self.seconds, 3),
        }


def require_only_adapter_trainable(model, modules_to_save) -> None:
    """Only LoRA tensors and declared modules_to_save may require grad."""
    stray = [
        name for name, param in model.named_parameters()
        if param.requires_grad and "lora_" not in name and ".modules_to_save." not in name
    ]
    if stray:
        raise LorafitError(
            f"parameters outside the adapter would train: {', '.join(stray[:10])}",
            why="a LoRA run must leave the base frozen, or the adapter is not portable",
            fix=f"list them in lora.modules_to_save if you mean to train them (now: {list(modules_to_save)})",
        )


def require_adapter_changed(model) -> None:
    """lora_B starts at zero, so an adapter whose every lora_B is still zero learned nothing. PiSSA/OLoRA start
    with a non-zero B: there, nothing may still equal its step-0 value."""
    initial = initial_adapter(model)
    if initial is not None and not initial.changed(model):
        raise LorafitError(
            f"the adapter did not change: every tensor still has its {initial.init} step-0 value after training",
            why="its update to the base is exactly zero, so it would do nothing",
            fix="check train.learning_rate is not tiny and that the data has supervised tokens (and enough steps)",
        )
    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    if lora_b and all(torch.count_nonzero(p) == 0 for p in lora_b):
        raise LorafitError(
            "the adapter did not change: every lora_B matrix is still zero after training",
            why="its update to the base (B @ A) is exactly zero, so it would do nothing",
            fix="check train.learning_rate is not tiny and that the data has supervised tokens (and enough steps)",
        )
