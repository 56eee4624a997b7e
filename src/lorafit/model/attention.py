"""Which attention implementation the base model runs: ``model.attn_implementation``.

``auto`` picks the fastest implementation that is installed, runs on this machine, and keeps packed examples
apart. Every choice lorafit offers keeps them apart under two conditions, which hold for every batch lorafit builds
(lorafit/data/packing.py; tests/test_attention.py and tests/test_packing.py prove them):
  * the model runs without a KV cache (``use_cache=False``, set by ``load_base_model``): with a cache,
    transformers skips the packed-sequence detection and examples attend to each other;
  * a packed batch is ONE row with ``position_ids`` restarting at 0 per example and no ``attention_mask``.
    sdpa, eager and flex_attention then get a block-diagonal causal mask (``masking_utils``); flash-attention 2/3
    get ``cu_seqlens`` from the restarts, which transformers only does for a batch of one row.

Measured on the tiny model, CPU, torch 2.13, transformers 5.23 (packed vs one-by-one logits, max abs diff):
sdpa 4e-7, eager 0, flex_attention 4e-7 (forward only: torch's FlexAttention has no CPU backward, so it
cannot train there; its first compiled forward took ~2 minutes on 2 cores).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorafit.errors import LorafitError

HALF = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Machine:
    """What the choice depends on, read once (tests pass their own)."""

    cuda: bool
    capability: tuple[int, int] | None  # (major, minor) of GPU 0; None without CUDA, or a GPU not known here
    bf16: bool = False  # the GPU computes in bf16 (what model.dtype: auto picks)

    @classmethod
    def current(cls) -> "Machine":
        cuda = torch.cuda.is_available()
        return cls(cuda=cuda, capability=torch.cuda.get_device_capability(0) if cuda else None,
                   bf16=cuda and torch.cuda.is_bf16_supported())

    @classmethod
    def planned_gpu(cls) -> "Machine":
        """The GPU `lorafit plan` plans for when this machine has none: an NVIDIA GPU with bf16 whose model is
        not known, so no flash-attention kernel is assumed (``auto`` plans sdpa)."""
        return cls(cuda=True, capability=None, bf16=True)


def _flash_2_installed() -> bool:
    from transformers.utils import is_flash_attn_2_available

    return is_flash_attn_2_available()


def _flash_3_installed() -> bool:
    from transformers.utils import is_flash_attn_3_available

    return is_flash_attn_3_available()


def unavailable_reason(choice: str, dtype: torch.dtype, machine: Machine) -> str | None:
    """Why ``choice`` cannot train here, or None when it can."""
    if choice in ("sdpa", "eager"):
        return None
    if choice == "flex_attention":
        # torch.nn.attention.flex_attention._validate_device refuses inputs that require grad on CPU (torch 2.13).
        return None if machine.cuda else "torch's FlexAttention has no backward pass on a CPU, so it cannot train there"
    if not machine.cuda:
        return f"{choice} runs on NVIDIA GPUs only (CUDA); this machine has none"
    if machine.capability is None:
        return f"{choice} depends on the GPU's model, and no GPU is known here"
    if dtype not in HALF:
        return f"{choice} computes in bf16 or fp16 only; the model loads in {str(dtype).removeprefix('torch.')}"
    if choice == "flash_attention_2":
        if machine.capability < (8, 0):
            return "flash-attention 2 needs an Ampere or newer GPU (compute capability 8.0+)"
        return None if _flash_2_installed() else "the flash-attn package (>= 2.3.3) is not installed"
    if choice == "flash_attention_3":
        if machine.capability[0] != 9:
            return "flash-attention 3 runs on Hopper GPUs only (H100/H200, compute capability 9.x)"
        return None if _flash_3_installed() else "the flash-attn-3 package (flash_attn_interface) is not installed"
    raise ValueError(choice)  # the config schema only lets the choices above through


def resolve_attention(requested: str, dtype: torch.dtype, machine: Machine | None = None) -> str:
    """The implementation to load: ``requested`` itself, checked, or for ``auto`` the fastest that can train here.

    ``auto``: flash-attention 3, then 2 (variable-length kernels: a packed row costs the attention of its
    examples, not of the whole row), then sdpa. flex_attention is never chosen automatically: it compiles on
    first use and measured about sdpa's speed on an H200 (docs/benchmarks.md lists what is still to measure).
    """
    machine = machine or Machine.current()
    if requested == "auto":
        for choice in ("flash_attention_3", "flash_attention_2"):
            if unavailable_reason(choice, dtype, machine) is None:
                return choice
        return "sdpa"
    reason = unavailable_reason(requested, dtype, machine)
    if reason is not None:
        raise LorafitError(
            f"model.attn_implementation: {requested} cannot be used here",
            why=reason,
            fix="use `auto` (picks the fastest that works here) or `sdpa`",
        )
    return requested


def load_with_attention(load, requested: str, choice: str):
    """``load(attn_implementation)`` with ``choice``, what ``requested`` resolved to (model/resolved.py).
    transformers refuses an implementation the architecture lacks (ValueError before any weight is read):
    ``auto`` then takes transformers' default, an explicit choice becomes a LorafitError."""
    try:
        return load(choice)
    except ValueError as exc:
        if "does not support" not in str(exc):
            raise
        if requested == "auto":
            return load(None)  # transformers' own default: sdpa where the architecture has it, else eager
        raise LorafitError(
            f"model.attn_implementation: the model does not implement {choice}",
            why=str(exc).splitlines()[0],
            fix="use `auto`, `sdpa` or `eager`",
        ) from None


def attention_of(model) -> str:
    """The attention implementation a loaded model runs. transformers keeps it in the config's
    ``_attn_implementation`` property and offers no public getter (5.x): read it here only."""
    return getattr(model.config, "_attn_implementation", None) or "sdpa"


def is_packed_row(batch: dict) -> bool:
    """True for a batch in lorafit's packed layout: positions restarting inside a row, no attention mask."""
    positions = batch.get("position_ids")
    if positions is None or "attention_mask" in batch:
        return False
    return bool(((positions == 0).sum(dim=-1) > 1).any())
