"""Learning rates per kind of adapter tensor: LoRA+ (``lora.loraplus_lr_ratio``) and a separate rate for tensors
trained in full (``train.embedding_learning_rate``).

With either option the optimizer of a run (``build_optimizer``) has parameter groups by kind and by weight decay;
without them, one group with weight decay and one without. The weight-decay rule is transformers' Trainer's (no decay on biases and
norms), which peft's ``create_loraplus_optimizer`` replaces by one ``loraplus_weight_decay``; the LoRA+ split itself
is peft's: every ``lora_B`` and every other one-dimensional adapter tensor (DoRA magnitudes, trained biases) at
``ratio x lr``, ``lora_A`` at ``lr``, LoRA adapters on embedding layers apart.

The schedule scales each group's own peak rate, so the ratios hold at every step. Group 0 is ``lora_A`` (the
base rate): the loop logs the first group's rate as ``learning_rate``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

# Order of the groups in the optimizer; "full" = tensors trained in full (modules_to_save) and LoRA on embeddings.
KINDS = ("lora_A", "lora_B", "full")


@dataclass(frozen=True)
class LearningRates:
    base: float
    b_ratio: float | None = None  # lora.loraplus_lr_ratio
    full: float | None = None  # train.embedding_learning_rate

    @classmethod
    def from_config(cls, config) -> "LearningRates | None":
        """None when the run needs no groups of its own (one rate for every tensor)."""
        if config.lora.loraplus_lr_ratio is None and config.train.embedding_learning_rate is None:
            return None
        return cls(config.train.learning_rate, config.lora.loraplus_lr_ratio, config.train.embedding_learning_rate)

    def rate(self, kind: str) -> float:
        if kind == "lora_B" and self.b_ratio is not None:
            return self.base * self.b_ratio
        if kind == "full" and self.full is not None:
            return self.full
        return self.base


def tensor_kind(name: str, ndim: int) -> str:
    """Which rate a trainable tensor gets, from its name in ``model.named_parameters()``."""
    if ".modules_to_save." in name or "lora_embedding_" in name:
        return "full"
    if "lora_B" in name or ndim == 1:
        return "lora_B"
    return "lora_A"


def parameter_groups(model, rates: LearningRates, weight_decay: float, decay_names) -> list[dict]:
    """Optimizer groups by kind and by decay (Trainer's rule), each named ``kind`` or ``kind/no_decay``; empty
    groups are left out."""
    decay_names = set(decay_names)
    groups: dict[tuple[str, bool], list] = {(kind, decay): [] for kind in KINDS for decay in (True, False)}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups[(tensor_kind(name, param.ndim), name in decay_names)].append(param)
    return [
        {"name": kind if decay else f"{kind}/no_decay", "params": params, "lr": rates.rate(kind),
         "weight_decay": weight_decay if decay else 0.0}
        for (kind, decay), params in groups.items() if params
    ]


# Trainer's rule, kept so runs train as before: no weight decay on biases and normalisation weights.
_NO_DECAY = re.compile(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)")


def decay_parameter_names(model) -> set[str]:
    """Trainable parameters that get weight decay: all but biases and normalisation layers' weights."""
    norms = {f"{module_name}.{name}".lstrip(".") for module_name, module in model.named_modules()
             if isinstance(module, torch.nn.LayerNorm) or "norm" in type(module).__name__.lower()
             for name, _ in module.named_parameters(recurse=False)}
    return {name for name, param in model.named_parameters()
            if param.requires_grad and name not in norms and not _NO_DECAY.search(name.lower())}


def build_optimizer(config, model, *, fused: bool):
    """The optimizer ``train.optimizer`` names, over ``parameter_groups``.

    ``fused``: torch's fused AdamW/SGD, which can skip a step on the device (the non-finite guard sets
    ``found_inf``, as GradScaler does) instead of the host deciding after a read; the loop asks for it where torch
    supports it. AdamW's betas and eps are torch's defaults (0.9, 0.999, 1e-8), as transformers' Trainer used."""
    t = config.train
    rates = LearningRates.from_config(config)
    decay = decay_parameter_names(model)
    if rates is not None:
        groups = parameter_groups(model, rates, t.weight_decay, decay)
    else:  # one rate: two groups, with and without weight decay
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups = [g for g in ({"params": [p for n, p in trainable if n in decay], "weight_decay": t.weight_decay},
                              {"params": [p for n, p in trainable if n not in decay], "weight_decay": 0.0})
                  if g["params"]]
    if t.optimizer == "paged_adamw_8bit":
        import bitsandbytes as bnb

        # what transformers' Trainer built for optim="paged_adamw_8bit": paged AdamW with 8-bit states
        return bnb.optim.AdamW(groups, lr=t.learning_rate, betas=(0.9, 0.999), eps=1e-8, optim_bits=8, is_paged=True)
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=t.learning_rate, fused=fused or None)
    return torch.optim.AdamW(groups, lr=t.learning_rate, betas=(0.9, 0.999), eps=1e-8, fused=fused or None)


def skips_on_device(optimizer) -> bool:
    """Whether ``optimizer`` reads a ``found_inf`` tensor and skips its update on the device (torch's fused ones)."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def build_scheduler(config, optimizer, total_steps: int):
    """transformers' schedule of ``train.scheduler`` after ``warmup_steps_for`` warmup steps."""
    from transformers import get_scheduler

    from lorafit.config import warmup_steps_for

    name = {"constant": "constant_with_warmup"}.get(config.train.scheduler, config.train.scheduler)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps_for(config.train, total_steps),
                         num_training_steps=total_steps)


def group_rates(optimizer) -> dict[str, float]:
    """Peak rate of each named group (``initial_lr`` once a schedule has taken over ``lr``)."""
    return {g.get("name", str(i)): g.get("initial_lr", g["lr"]) for i, g in enumerate(optimizer.param_groups)}
