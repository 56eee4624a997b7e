"""Learning rates per kind of adapter tensor: LoRA+ (``lora.loraplus_lr_ratio``) and a separate rate for tensors
trained in full (``train.embedding_learning_rate``).

Trainer builds one rate for everything; these need parameter groups, so ``LorafitTrainer.create_optimizer``
builds them here when either option is set (otherwise Trainer's own optimizer is used, unchanged). The optimizer
class and its other arguments are still Trainer's (``train.optimizer``), and so is the weight-decay rule (no decay
on biases and norms), which peft's ``create_loraplus_optimizer`` replaces by one ``loraplus_weight_decay``; the
LoRA+ split itself is peft's: every ``lora_B`` and every other one-dimensional adapter tensor (DoRA magnitudes,
trained biases) at ``ratio x lr``, ``lora_A`` at ``lr``, LoRA adapters on embedding layers apart.

The schedule scales each group's own peak rate, so the ratios hold at every step. Group 0 is ``lora_A`` (the
base rate): Trainer logs the first group's rate as ``learning_rate``.
"""

from __future__ import annotations

from dataclasses import dataclass

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


def grouped_optimizer(trainer, model, rates: LearningRates):
    """The optimizer ``train.optimizer`` names (Trainer's class and arguments) over ``parameter_groups``."""
    optimizer_cls, kwargs = trainer.get_optimizer_cls_and_kwargs(trainer.args, model)
    groups = parameter_groups(model, rates, trainer.args.weight_decay, trainer.get_decay_parameter_names(model))
    return optimizer_cls(groups, **kwargs)


def group_rates(optimizer) -> dict[str, float]:
    """Peak rate of each named group (``initial_lr`` once a schedule has taken over ``lr``)."""
    return {g.get("name", str(i)): g.get("initial_lr", g["lr"]) for i, g in enumerate(optimizer.param_groups)}
