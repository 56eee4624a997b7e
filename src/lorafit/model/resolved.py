"""What ``auto`` means on a machine: the one resolver for ``model.dtype``, ``model.attn_implementation`` and
``model.kernels``. The run (loading.load_base_model, recipe's with_resolved_dtype), `lorafit plan` and
`lorafit doctor` all call ``resolve_auto``, so the three cannot disagree about what a config runs with.

The run resolves for the machine it runs on. `lorafit plan` resolves for the GPU the run will use: this
machine's when it has one, else ``Machine.planned_gpu()`` (bf16, sdpa, liger only if installed here).
`lorafit doctor` resolves for this machine and prints the result.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorafit.model.attention import Machine, resolve_attention
from lorafit.model.kernels import resolve_kernels

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Resolved:
    """The concrete choices a config runs with on one machine."""

    dtype: str  # fp32, bf16 or fp16
    attention: str  # sdpa, eager, flex_attention, flash_attention_2 or flash_attention_3
    kernels: str  # liger or none

    def describe(self) -> str:
        return f"dtype {self.dtype}, attention {self.attention}, kernels {self.kernels}"


def resolve_dtype(name: str, machine: Machine | None = None) -> str:
    """``model.dtype``: 'auto' is bf16 on a GPU that supports it, else fp32; any other name is kept."""
    if name != "auto":
        return name
    machine = machine or Machine.current()
    return "bf16" if machine.cuda and machine.bf16 else "fp32"


def resolve_auto(model, model_type: str, machine: Machine | None = None, *, strict: bool = True) -> Resolved:
    """``model`` (the config's ``model:`` section) on ``machine``: each ``auto`` made concrete.

    ``strict`` (the run): an explicit choice that cannot run here is a LorafitError with the reason.
    Not strict (plan, doctor): an explicit choice is taken as asked; doctor reports why it cannot run separately,
    and a plan made on another machine is for the machine that will run it.
    """
    machine = machine or Machine.current()
    dtype = resolve_dtype(model.dtype, machine)
    if strict or model.attn_implementation == "auto":
        attention = resolve_attention(model.attn_implementation, DTYPES[dtype], machine)
    else:
        attention = model.attn_implementation
    if strict or model.kernels == "auto":
        kernels = resolve_kernels(model.kernels, model_type, cuda=machine.cuda)
    else:
        kernels = model.kernels
    return Resolved(dtype, attention, kernels)
