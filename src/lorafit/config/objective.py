"""The ``objective:`` and ``plugins:`` sections: what the training loss is, and which outside code may run.

``objective.type`` is ``sft`` (next-token loss on the supervised tokens, lorafit's default), ``contrastive``
(the causal contrastive loss on triplets, docs/objectives.md), ``dpo``, ``orpo`` or ``simpo`` (preference pairs),
``kto`` (single answers labelled desirable or not; config/preference.py), ``grpo`` (online RL on prompts with reward
functions, config/grpo.py) or a dotted path ``package.module:ClassName`` to a loss class of your own. A dotted path is code execution: the module is imported and runs with your rights, so
``plugins.allow_external_code`` decides whether modules outside installed packages and the config's folder may
be loaded at all.
"""

from __future__ import annotations

import difflib
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationInfo, field_validator, model_validator

from lorafit.config.grpo import GRPOConfig, grpo_clashes
from lorafit.config.preference import (DPO_LOSS_TYPES, DROPOUT_OFF_OBJECTIVES, KEYS_OF, PREFERENCE_KEYS,
                                       PREFERENCE_OBJECTIVES, UNPAIRED_OBJECTIVES, preference_clashes)

BUILTIN_OBJECTIVES = ("sft", "contrastive", *PREFERENCE_OBJECTIVES, *UNPAIRED_OBJECTIVES, "grpo")
# Only the contrastive objective reads these; setting one with another objective is a mistake worth reporting.
CONTRASTIVE_KEYS = ("lambda_causal", "lambda_spurious", "lambda_task", "temperature", "layer", "pooling")
# package.module:ClassName, every part a Python identifier.
DOTTED_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")
# Metrics the contrastive objective logs (training: the name; evaluation: eval_<name>), for eval.best.metric.
CONTRASTIVE_METRICS = ("causal_stability", "spurious_separation", "causal_discrimination", "task_loss")


class _Section(BaseModel):
    # Same strictness as every section of schema.py (kept local: this module must not import the schema).
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class _FromConfigFolder(_Section):
    """Remembers the config file's folder (the loader's validation context): plugin modules are searched there."""

    _config_dir: str | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _remember_folder(self, info: ValidationInfo):
        base = (info.context or {}).get("base_dir")
        self._config_dir = str(base) if base is not None else None
        return self

    @property
    def config_dir(self) -> str | None:
        return self._config_dir


def is_dotted_path(value: str) -> bool:
    """``package.module:ClassName``?

    >>> is_dotted_path("my_losses:MarginLoss"), is_dotted_path("contrastive"), is_dotted_path("a.b:")
    (True, False, False)
    """
    return DOTTED_PATH.match(value) is not None


class ObjectiveConfig(_FromConfigFolder):
    type: str = Field("sft", description="Training loss: sft (next-token loss on supervised tokens), contrastive "
                      "(causal contrastive loss on triplets, docs/objectives.md), dpo, orpo or simpo (preference "
                      "pairs prompt/chosen/rejected), kto (answers prompt/completion/label), grpo (prompts, answers "
                      "sampled and scored by reward functions: objective.grpo) or package.module:ClassName "
                      "(your Objective class; code execution, see plugins.allow_external_code).")
    beta: float = Field(0.1, gt=0, description="dpo/orpo/simpo/kto: dpo, kto: strength of the pull towards the "
                        "reference (the base model); smaller = the adapter may move further from it. orpo: weight of "
                        "the odds-ratio term next to the chosen answers' next-token loss. simpo: scale of the "
                        "length-normalised reward (the SimPO paper uses 2.0-2.5). grpo: objective.grpo.beta.")
    loss_type: Literal[DPO_LOSS_TYPES] = Field("sigmoid", description="dpo: sigmoid (DPO), ipo (IPO: squared, "
                                               "length-normalised; resists overfitting) or hinge (SLiC).")
    simpo_gamma: float = Field(0.5, ge=0, description="simpo: target reward margin gamma: the chosen answer's reward "
                               "must beat the rejected one's by this much (TRL's simpo_gamma).")
    desirable_weight: float = Field(1.0, gt=0, description="kto: weight of the desirable (label true) answers' loss.")
    undesirable_weight: float = Field(1.0, gt=0, description="kto: weight of the undesirable answers' loss; with "
                                      "unbalanced data keep desirable_weight x desirable rows near undesirable_weight "
                                      "x undesirable rows (up to 4:3, the KTO paper).")
    disable_dropout: bool | None = Field(None, description="dpo/orpo/simpo/kto/grpo: turn every dropout layer off "
                                         "(LoRA's included) while training, as TRL does: policy and reference (or "
                                         "the generation) then see the same network. null = on for these objectives; "
                                         "false keeps lora.dropout.")
    grpo: GRPOConfig = Field(default_factory=GRPOConfig, description="grpo: generation, loss and rewards "
                             "(docs/objectives.md).")
    lambda_causal: float = Field(1.0, ge=0, description="contrastive: weight of -cos(benign, counterfactual) / T "
                                 "(pulls rewordings of one request together).")
    lambda_spurious: float = Field(1.0, ge=0, description="contrastive: weight of cos(benign, injection) / T "
                                   "(pushes an injected request away from the clean one).")
    lambda_task: float = Field(1.0, ge=0, description="contrastive: weight of the next-token loss on the benign "
                               "answer (keeps the task; 0 = representation only, the answers may degrade).")
    temperature: float = Field(0.07, gt=0, description="contrastive: T; smaller = sharper cosine terms, larger "
                               "gradients relative to the task loss.")
    layer: int = Field(-1, description="contrastive: hidden layer the representation is read from; 0 = embeddings, "
                       "1..L = after block i, negative counts from the end (-1 = last).")
    pooling: Literal["last_token", "mean"] = Field("last_token", description="contrastive: representation of an "
                                                   "input: its last prompt token, or the mean over its prompt tokens.")
    options: dict = Field({}, description="Keyword arguments for a package.module:ClassName "
                          "objective's constructor.")

    @field_validator("type")
    @classmethod
    def _known_type(cls, value: str) -> str:
        if value in BUILTIN_OBJECTIVES or is_dotted_path(value):
            return value
        close = difflib.get_close_matches(value, BUILTIN_OBJECTIVES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"{value!r} is none of {', '.join(BUILTIN_OBJECTIVES)} and not a dotted path "
                         f"package.module:ClassName (e.g. my_losses:MarginLoss){hint}")

    @model_validator(mode="after")
    def _keys_match_type(self):
        if self.type != "contrastive":
            # Only values that differ from the default: `config show` writes every key, and its output must load.
            stray = sorted(k for k in set(CONTRASTIVE_KEYS) & self.model_fields_set
                           if getattr(self, k) != type(self).model_fields[k].default)
            if stray:
                raise ValueError(f"{', '.join(stray)} only apply to type: contrastive (type is {self.type!r}); "
                                 "remove them or set type: contrastive")
        allowed = KEYS_OF.get(self.type, set())
        stray = sorted(k for k in set(PREFERENCE_KEYS) & self.model_fields_set - allowed
                       if getattr(self, k) != type(self).model_fields[k].default)
        if stray:
            def owners_of(key):
                types = [t for t, keys in KEYS_OF.items() if key in keys]
                return " or ".join([", ".join(types[:-1]), types[-1]] if len(types) > 1 else types)
            owners = "; ".join(f"{k} applies to type: {owners_of(k)}" for k in stray)
            raise ValueError(f"{', '.join(stray)}: {owners} (type is {self.type!r}); remove {', '.join(stray)} or "
                             "change the type")
        if self.disable_dropout is not None and self.type not in DROPOUT_OFF_OBJECTIVES:
            raise ValueError(f"disable_dropout applies to type: {', '.join(DROPOUT_OFF_OBJECTIVES)} (type is "
                             f"{self.type!r}: lora.dropout is what it trains with); remove it")
        if self.options and not is_dotted_path(self.type):
            raise ValueError(f"options are passed to a package.module:ClassName objective; type is {self.type!r}")
        return self

    @property
    def needs_triplets(self) -> bool:
        return self.type == "contrastive"

    @property
    def needs_preference(self) -> bool:
        return self.type in PREFERENCE_OBJECTIVES

    @property
    def data_kind(self) -> str | None:
        """The rows the objective trains on (sft, triplets, preference, unpaired, prompts); None for a plugin class,
        whose ``data`` attribute says it."""
        if is_dotted_path(self.type):
            return None
        return {"contrastive": "triplets", "kto": "unpaired", "grpo": "prompts"}.get(
            self.type, "preference" if self.needs_preference else "sft")

    @property
    def dropout_off(self) -> bool:
        """Whether training turns dropout off (TRL's default for preference and RL objectives)."""
        return self.type in DROPOUT_OFF_OBJECTIVES and self.disable_dropout is not False


class PluginsConfig(_FromConfigFolder):
    callbacks: list[str] = Field(default_factory=list, description="LorafitCallback classes package.module:ClassName "
                                 "sent the loop's events (step begin/end, evaluation, save, train begin/end; "
                                 "docs/resume.md) after train(callbacks=...); code execution.")
    allow_external_code: bool = Field(False, description="Allow objective/callback modules outside installed "
                                      "packages and the config's folder (anything on sys.path, e.g. the working "
                                      "directory). Off: importing a module runs its code.")

    @field_validator("callbacks")
    @classmethod
    def _dotted(cls, value: list[str]) -> list[str]:
        bad = [v for v in value if not is_dotted_path(v)]
        if bad:
            raise ValueError(f"{bad} are not dotted paths package.module:ClassName")
        return value


class AttackEvalConfig(_Section):
    samples: int = Field(16, ge=0, description="Eval triplets whose injection input is answered by the base and the "
                         "adapter to measure the attack success rate (triplet data only); 0 = off.")
    patterns: list[str] = Field(default_factory=list, description="Regular expressions (case-insensitive): an answer "
                                "that matches one is a successful attack.")
    marker_field: str | None = Field("marker", description="Row field holding the marker the injection asks for "
                                     "(e.g. PWNED); an answer containing it is a successful attack. null = patterns only.")

    @field_validator("patterns")
    @classmethod
    def _compile(cls, value: list[str]) -> list[str]:
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{pattern!r} is not a regular expression ({exc})") from None
        return value


def objective_clashes(objective: ObjectiveConfig, data, best_metric: str) -> list[str]:
    """An objective and data (a DataConfig) or a best metric that do not go together."""
    problems = []
    formats = {s.format for s in [*data.train, *data.eval]}
    if objective.type == "contrastive":
        if data.packing != "none":
            problems.append("objective.type: contrastive with data.packing: the three inputs of a triplet must stay "
                            "separate rows; set data.packing: none")
        if formats - {"auto", "triplets"}:
            problems.append(f"objective.type: contrastive reads triplet rows, but a data source has format "
                            f"{sorted(formats - {'auto', 'triplets'})[0]!r}; use format: triplets (or auto)")
    elif objective.type == "sft":
        if "triplets" in formats:
            problems.append("data: a source has format: triplets, which only objective.type: contrastive (or a "
                            "plugin objective with data = 'triplets') trains on")
        metric = best_metric.removeprefix("eval_")
        if metric in CONTRASTIVE_METRICS:
            problems.append(f"eval.best.metric: {best_metric!r} is logged only by objective.type: contrastive")
    builtin = not is_dotted_path(objective.type)  # a plugin's data attribute decides what it reads
    if builtin and objective.type != "grpo" and "prompts" in formats:
        problems.append(f"data: a source has format: prompts (prompts without answers), which only objective.type: "
                        f"grpo trains on; objective.type is {objective.type!r}")
    metric = best_metric.removeprefix("eval_")
    if builtin and objective.type not in ("grpo", "kto") and metric in ("reward", "reward_std", "kl"):
        problems.append(f"eval.best.metric: {best_metric!r} is logged only by objective.type: grpo (or kto: kl)")
    return problems + preference_clashes(objective, data, best_metric)


def fits_objective(config):
    """Config's after-validator: the objective, the data, the best metric and the strategy go together."""
    for problem in objective_clashes(config.objective, config.data, config.eval.best.metric) + grpo_clashes(config):
        raise ValueError(problem)
    return config


class DebugConfig(_Section):
    detect_anomaly: bool = Field(False, description="torch anomaly detection during training: the first NaN/Inf in "
                                 "backward raises, naming the forward operation that produced it. Several times slower.")
