"""The ``distributed:`` section: how several processes share one run (docs/scaling.md).

How many processes run is not part of the config: the launcher decides it (``lorafit train CONFIG --nproc N``,
or torchrun/accelerate directly), so the same file trains on a laptop and on eight GPUs. The config says only
*how* the processes split the work. Every strategy is handed to transformers' Trainer, which runs it through
accelerate: lorafit adds no communication of its own beyond the few reductions named in docs/scaling.md.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

STRATEGIES = ("ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3")


class _Section(BaseModel):
    # Same strictness as every section of schema.py (kept local: this module must not import the schema).
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class DistributedConfig(_Section):
    strategy: Literal["ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"] = Field(
        "ddp", description="How processes share the work: ddp (a full model copy per process; fastest when it "
        "fits), fsdp (FSDP2: weights, gradients and optimizer state sharded; QLoRA works under it), "
        "deepspeed_zero2 (optimizer state and gradients sharded), deepspeed_zero3 (weights too). One process: "
        "no effect for ddp (docs/scaling.md).")
    fsdp_cpu_offload: bool = Field(
        False, description="fsdp: keep sharded parameters and optimizer state in CPU memory (much slower; for a "
        "model that does not fit in GPU memory even sharded).")
    timeout_minutes: int = Field(
        30, gt=0, description="How long a process waits at a barrier or collective before the run fails (the "
        "main process writes the artifact while the others wait).")
