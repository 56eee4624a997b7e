"""Fused training kernels: ``model.kernels`` (liger-kernel, the optional extra ``liger``: errors.install_hint).

With liger on, the base model's RMSNorm and SwiGLU MLP run as Triton kernels and the loss is a fused
linear cross-entropy: the output head and the loss are computed chunk by chunk, so the (tokens x vocabulary)
logits never exist in memory (~2 GiB in bf16 for 8k tokens and a 128k vocabulary, plus their gradient).
Applied through liger's transformers integration, which knows the Llama, Mistral, Qwen, Gemma and Phi families.

``auto`` turns it on only where it can run: CUDA present, the package importable, the architecture known to
liger. Triton kernels do not run on a CPU (the first forward fails), so there ``auto`` is off and ``liger`` is
an error. Equality with the unfused path (loss within bf16 tolerance) is tested on the GPU: tests/test_kernels.py.

Only the trained instance gets the kernels (``_apply_liger_to_instance_only``): liger also patches transformers'
modelling module process-wide, which lorafit undoes so that later models in the process (the merge at the end of a
run, on the CPU) run plain code.
"""

from __future__ import annotations

import importlib.util

import torch

from lorafit.errors import LorafitError, install_hint

# Passed to liger's per-family function (it keeps the ones that family accepts, e.g. geglu for Gemma).
# RoPE off: liger swaps it as a module-level function, which _apply_liger_to_instance_only puts back anyway.
LIGER_FLAGS = {"rope": False, "rms_norm": True, "swiglu": True, "geglu": True, "cross_entropy": False,
               "fused_linear_cross_entropy": True}
LIGER_MARK = "_lorafit_kernels"  # set on the model instance once the kernels are applied


def liger_installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def liger_model_types() -> frozenset[str]:
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    return frozenset(MODEL_TYPE_TO_APPLY_LIGER_FN)


def unavailable_reason(model_type: str, *, cuda: bool | None = None) -> str | None:
    """Why liger cannot run this model here, or None when it can."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if not cuda:
        return "liger-kernel's kernels are written in Triton and run on NVIDIA GPUs only; this machine has no CUDA"
    if not liger_installed():
        return "the liger-kernel package is not installed"
    if model_type not in liger_model_types():
        return f"liger-kernel has no kernels for model type {model_type!r}"
    return None


def resolve_kernels(requested: str, model_type: str, *, cuda: bool | None = None) -> str:
    """``liger`` or ``none``: ``auto`` is liger wherever it can run; an explicit ``liger`` that cannot is an error."""
    if requested == "none":
        return "none"
    reason = unavailable_reason(model_type, cuda=cuda)
    if reason is None:
        return "liger"
    if requested == "auto":
        return "none"
    raise LorafitError(
        "model.kernels: liger cannot be used here",
        why=reason,
        fix=f"on a machine with an NVIDIA GPU: {install_hint('liger', 'liger-kernel')}; or set model.kernels: auto "
            "(uses it where it can) or none",
    )


def apply_kernels(model, requested: str, *, cuda: bool | None = None) -> str:
    """Apply the resolved kernels to a freshly loaded base (before LoRA wraps its layers); returns the choice."""
    choice = resolve_kernels(requested, model.config.model_type, cuda=cuda)
    if choice == "liger":
        _apply_liger_to_instance_only(model)
    setattr(model, LIGER_MARK, choice)
    return choice


def _apply_liger_to_instance_only(model) -> None:
    """liger patches the instance AND transformers' modelling module of the family (classes, the RoPE function,
    the CausalLM class's forward). The module is put back afterwards, so only this model runs the kernels: a
    model built later in the process (the CPU merge at the end of a run, generation) runs the plain code.
    The cost: liger's RoPE, a module-level function, cannot be had per instance (a small share of a step)."""
    import sys
    from types import MethodType

    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    family = sys.modules[type(model).__module__]
    saved = dict(vars(family))
    classes = [c for c in saved.values() if isinstance(c, type) and c.__module__ == family.__name__]
    forwards = {c: c.__dict__.get("forward") for c in classes}
    try:
        _apply_liger_kernel_to_instance(model=model, **LIGER_FLAGS)
        fused = type(model).__dict__.get("forward")
        if fused is not forwards.get(type(model)) and "forward" not in model.__dict__:
            model.forward = MethodType(fused, model)  # keep the fused loss on this instance only
    finally:
        for name in [n for n in vars(family) if n not in saved]:
            delattr(family, name)
        for name, value in saved.items():
            if vars(family).get(name) is not value:
                setattr(family, name, value)
        for cls, forward in forwards.items():
            if cls.__dict__.get("forward") is forward:
                continue
            if forward is None:
                delattr(cls, "forward")
            else:
                cls.forward = forward


def check_head_not_adapted(model, target_modules, modules_to_save) -> None:
    """The fused loss reads ``lm_head.weight`` directly: an adapter on the output head would be skipped silently."""
    if getattr(model, LIGER_MARK, "none") != "liger":
        return
    targets = [] if isinstance(target_modules, str) else list(target_modules)  # 'all-linear' leaves the head out
    head = [name for name in (*targets, *modules_to_save) if name.rsplit(".", 1)[-1] == "lm_head"]
    if head:
        raise LorafitError(
            "model.kernels: liger's fused loss cannot train an adapter on the output head (lm_head)",
            why="the fused linear cross-entropy multiplies by lm_head.weight itself, bypassing any adapter on it",
            fix="set model.kernels: none, or remove lm_head from lora.target_modules / lora.modules_to_save",
        )
