"""The run config: a strict, typed, nested schema, and the loader that turns a file into it.

Strict about what users write: an unknown key is an error with the closest valid key suggested, a duplicate
YAML key is an error, every problem in a file is reported at once, and the validated config is frozen.
Input paths (model and data) are resolved against the config file's folder, so a config runs the same from
any working directory; ``train.output_dir`` is resolved against the working directory, where runs belong.
"""

from __future__ import annotations

import difflib
import importlib.util
import math
import re
from typing import Literal

import yaml
from pydantic import Field, field_validator, model_validator

from lorafit.config.model_sections import (
    LoraConfig, ModelConfig, QuantConfig, Section, init_fits_quantization, resolve_input_path,
)
from lorafit.config.distributed import DistributedConfig
from lorafit.config.objective import CONTRASTIVE_METRICS, AttackEvalConfig, DebugConfig, ObjectiveConfig, PluginsConfig, fits_objective
from lorafit.config.grpo import GRPO_METRICS
from lorafit.config.preference import PREFERENCE_METRICS
from lorafit.errors import install_hint


# Generation metric names live at the bottom of the package so the schema can check eval.best.metric without
# importing evaluation code; lorafit.evaluate.metrics has one function per name (a test keeps them in step).
GENERATION_METRICS = ("exact_match", "rouge_l", "json_valid", "json_schema", "field_presence", "field_accuracy",
                      "citation_coverage", "refusal_correct", "groundedness")
LOSS_METRICS = ("loss", "perplexity")

FORMATS = ("auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text", "triplets", "preference", "unpaired",
           "prompts")
# Canonical field names a source's `fields:` map may rename, per format ("response" is an alias of "completion").
FIELD_NAMES = ("messages", "role", "content", "conversations", "from", "value", "instruction", "input", "output",
               "system", "history", "prompt", "completion", "response", "text", "tools", "part_text",
               "benign", "benign_cf", "injection", "target",  # triplets (docs/objectives.md)
               "chosen", "rejected",  # preference pairs (docs/objectives.md)
               "label",  # kto: unpaired answers (prompt/completion/label)
               "reference")  # grpo: prompt rows (prompt/reference)


class DataSource(Section):
    path: str = Field(..., description="A data file: .jsonl, .json (array), .csv, .tsv, .parquet or .txt.")
    format: Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text", "triplets", "preference",
                    "unpaired", "prompts"] = Field(
        "auto", description="Row format; auto = detected from the first row's keys (docs/data.md), or the objective's "
        "rows; triplets, preference, unpaired (kto), prompts (grpo): docs/objectives.md."
    )
    fields: dict[str, str] = Field(
        default_factory=dict, description="Rename map, canonical name -> your key, e.g. {prompt: question, response: answer}."
    )
    on_error: Literal["fail", "skip"] = Field("fail", description="An invalid row stops the run (fail) or is skipped and reported.")
    max_skip_fraction: float = Field(0.0, ge=0, le=1, description="With on_error: skip, the largest fraction of rows that may be skipped.")
    weight: float | None = Field(None, gt=0, description="Relative share of the training mix (resampled up or down); null = every example once.")
    max_examples: int | None = Field(None, gt=0, description="Keep at most this many examples of this source (random, seeded).")
    max_tokens: int | None = Field(None, gt=0, description="Keep examples (random, seeded) until this many tokens.")
    task_prefix: str | None = Field(None, description="Text put before the first user message (or the text), for multi-task training.")
    eval_fraction: float = Field(0.0, ge=0, lt=1, description="Hold out this fraction of the source's examples for evaluation.")
    vars: dict[str, str] = Field(
        default_factory=dict, description="Template variables filled into the rows' {{name}} placeholders when read, "
        "e.g. {name: Lora, author: ACME} (LLaMA-Factory's identity set); a placeholder left over is a warning."
    )

    _resolve = field_validator("path")(resolve_input_path)

    @field_validator("vars")
    @classmethod
    def _variable_names(cls, value: dict[str, str]) -> dict[str, str]:
        bad = sorted(name for name in value if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name))
        if bad:
            raise ValueError(f"variable name(s) {bad} cannot appear in a {{{{name}}}} placeholder; use letters, digits "
                             "and _ (not starting with a digit)")
        return value

    @field_validator("fields")
    @classmethod
    def _known_fields(cls, value: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(value) - set(FIELD_NAMES))
        if unknown:
            raise ValueError(f"unknown field name(s) {unknown}; the names you can map are: {', '.join(FIELD_NAMES)}")
        if "response" in value and "completion" in value:
            raise ValueError("'response' and 'completion' are the same field: map only one")
        return value


class DataConfig(Section):
    train: list[DataSource] = Field(..., min_length=1, description="Training sources.")
    eval: list[DataSource] = Field(default_factory=list, description="Held-out sources for eval loss.")
    max_seq_length: int = Field(512, gt=0, description="Longest tokenised example, in tokens.")
    truncation: Literal["drop", "truncate"] = Field(
        "drop", description="Examples over max_seq_length: drop them, or cut them (keeps the start)."
    )
    train_on: Literal["all_assistant", "last_assistant", "all"] = Field(
        "all_assistant", description="Tokens the loss is computed on: every assistant turn, only the last one, or every token."
    )
    chat_template: str | None = Field(None, description="Inline Jinja chat template; replaces the tokenizer's.")
    chat_template_file: str | None = Field(None, description="A Jinja chat template file (relative to the config file).")
    system_turn: Literal["keep", "merge_into_first_user", "drop"] = Field(
        "keep", description="A system message, for templates without a system role: keep it, put it before the first user message, or drop it."
    )
    order: Literal["shuffle", "curriculum"] = Field("shuffle", description="Training order: shuffled, or curriculum (ascending).")
    curriculum_field: str | None = Field(None, description="Numeric row field curriculum sorts by; null = token length (shortest first).")
    mix_examples: int | None = Field(None, gt=0, description="Size of a weighted mix; default the sum of the sources' sizes.")
    packing: Literal["none", "padding_free", "bfd"] = Field(
        "none", description="none = padded rows; padding_free = a batch in one row; bfd = best-fit-decreasing into max_seq_length rows."
    )
    audit: bool = Field(True, description="Stop before training on a supervision problem (docs/data.md); false = warn only.")

    _resolve_template = field_validator("chat_template_file")(
        lambda value, info: None if value is None else resolve_input_path(value, info)
    )

    @model_validator(mode="after")
    def _consistent(self):
        for problem in data_clashes(self.model_dump()):
            raise ValueError(problem)
        return self


def data_clashes(data: dict) -> list[str]:
    """Data options that exclude each other. Also run on the raw mapping, like train_clashes."""
    problems = []
    train = [s for s in data.get("train") or [] if isinstance(s, dict)]
    weighted = [s.get("weight") is not None for s in train]
    if any(weighted) and not all(weighted):
        problems.append("data.train: give every source a weight, or none (a weight is a share of the whole mix)")
    for i, source in enumerate(s for s in data.get("eval") or [] if isinstance(s, dict)):
        for key in ("weight", "eval_fraction"):
            if source.get(key):
                problems.append(f"data.eval[{i}].{key}: only training sources are mixed or split; remove it")
    if data.get("chat_template") and data.get("chat_template_file"):
        problems.append("data.chat_template and data.chat_template_file are both set: give the template once")
    if data.get("order") == "curriculum" and data.get("packing") == "bfd":
        problems.append("data.order: curriculum with data.packing: bfd: bins mix lengths, so there is no curriculum; "
                        "use packing padding_free or none")
    if data.get("curriculum_field") and data.get("order") != "curriculum":
        problems.append("data.curriculum_field is set but data.order is not curriculum")
    return problems


class TrainConfig(Section):
    output_dir: str = Field("runs/lorafit", description="Run folder (relative to the working directory).")
    epochs: float | None = Field(None, gt=0, description="Passes over the data; default 1 when max_steps is unset.")
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps; replaces epochs.")
    batch_size: int = Field(8, gt=0, description="Examples per micro-batch (per device).")
    grad_accum: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    embedding_learning_rate: float | None = Field(
        None, gt=0, description="Peak learning rate of the tensors trained in full (lora.modules_to_save, e.g. "
        "embed_tokens / lm_head for new tokens) and of LoRA adapters on embedding layers; null = train.learning_rate.",
    )
    scheduler: Literal["linear", "cosine", "constant"] = Field("cosine", description="Learning-rate schedule after warmup.")
    warmup_ratio: float | None = Field(None, ge=0, lt=1, description="Warmup as a fraction of all steps.")
    warmup_steps: int | None = Field(None, ge=0, description="Warmup in steps (instead of warmup_ratio).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping; null = off.")
    optimizer: Literal["adamw", "sgd", "paged_adamw_8bit"] = Field(
        "adamw", description="Optimizer; paged_adamw_8bit (bitsandbytes) keeps 8-bit states and pages them out of GPU memory."
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward (non-reentrant): much less memory, ~30% slower on GPU, ~2x on CPU."
    )
    seed: int = Field(42, description="Seed for data order, dropout and adapter init.")
    log_every: int = Field(10, gt=0, description="Log metrics every N optimizer steps.")
    group_by_length: bool = Field(True, description="Batch examples of similar length: less padding, faster.")
    save_every: int | None = Field(
        100, gt=0, description="Checkpoint every N optimizer steps (and at each epoch end); null = epoch ends only."
    )
    keep_last: int = Field(2, ge=1, description="Newest checkpoints kept; older ones are deleted after each save.")
    keep_best: int = Field(0, ge=0, description="Also keep the N checkpoints best by eval.best.metric.")
    nan_patience: int = Field(
        0, ge=0, description="Consecutive steps with a NaN/Inf loss or gradient tolerated (their updates are skipped) "
        "before the run stops; 0 = stop at the first.",
    )
    loader_workers: int | None = Field(None, ge=0, description="Processes that build batches (tensors, pinned memory) "
                                       "while the GPU trains; null = 2 with a GPU, 0 on a CPU.")
    empty_cache_every: int | None = Field(None, gt=0, description="Release the GPU allocator's cached memory every N steps (less fragmentation, a little slower); null = never.")

    @model_validator(mode="after")
    def _one_of_each(self):
        for problem in train_clashes(self.model_dump()):
            raise ValueError(problem)
        return self


# Keys that exclude each other. A --set override of one replaces the other when it came from the file, so
# `--set train.max_steps=100` on a config with `epochs: 2` does what it says; both in one source is a clash.
EXCLUSIVE_KEYS = (
    ("train.epochs", "train.max_steps"),
    ("train.warmup_ratio", "train.warmup_steps"),
    ("data.chat_template", "data.chat_template_file"),
)


def train_clashes(train: dict) -> list[str]:
    """Options that exclude each other. Also run on the raw mapping, so a clash is reported with field errors."""
    given = {key for key, value in train.items() if value is not None}
    problems = []
    if {"epochs", "max_steps"} <= given:
        problems.append("train.epochs and train.max_steps are both set: a run stops by one of them, set only one")
    if {"warmup_ratio", "warmup_steps"} <= given:
        problems.append("train.warmup_ratio and train.warmup_steps are both set: warmup is given twice, set only one")
    return problems


# Every name metrics_history.jsonl can hold, for eval.best.metric (lorafit.evaluate.metrics defines the generation ones).
TRAIN_LOG_METRICS = ("loss", "learning_rate", "grad_norm", "tokens_per_second", "supervised_tokens_per_second",
                     *CONTRASTIVE_METRICS, *PREFERENCE_METRICS, *GRPO_METRICS)
EVAL_LOG_METRICS = ("eval_loss", "eval_perplexity", *(f"eval_{name}" for name in GENERATION_METRICS + CONTRASTIVE_METRICS
                                                      + PREFERENCE_METRICS + GRPO_METRICS))
LOWER_IS_BETTER = ("loss", "grad_norm", "eval_loss", "eval_perplexity", "task_loss", "eval_task_loss", "nll_loss",
                   "eval_nll_loss", "kl", "eval_kl")


class BestConfig(Section):
    metric: str = Field("eval_loss", description="Logged metric that picks the best step and drives early stopping "
                        "(a key of metrics_history.jsonl: eval_loss, eval_field_accuracy, loss, ...).")
    mode: Literal["min", "max"] | None = Field(None, description="min or max is best; null = min for losses and "
                                               "perplexity, max for generation metrics.")
    patience: int | None = Field(None, gt=0, description="Stop after this many values of the metric without "
                                 "improvement; null = never stop early.")
    min_delta: float = Field(0.0, ge=0, description="An improvement smaller than this does not count.")
    final_adapter: Literal["last", "best"] = Field("last", description="Adapter written at the end: the last "
                                                   "step's, or the best step's weights (kept in memory during the run).")

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, value: str) -> str:
        known = TRAIN_LOG_METRICS + EVAL_LOG_METRICS
        if value not in known:
            match = difflib.get_close_matches(value, known, n=1, cutoff=0.6)
            hint = f"did you mean {match[0]!r}?" if match else f"choose one of {', '.join(known)}"
            raise ValueError(f"{value!r} is not a logged metric; {hint}")
        return value

    @property
    def resolved_mode(self) -> str:
        return self.mode or ("min" if self.metric in LOWER_IS_BETTER else "max")


class EvalConfig(Section):
    every: int | None = Field(50, gt=0, description="Evaluate every N optimizer steps; null = only at the end.")
    at_start: bool = Field(True, description="Evaluate once before training, for a before/after comparison.")
    batch_size: int | None = Field(None, gt=0, description="Eval batch size; default train.batch_size.")
    generate_samples: int = Field(16, ge=0, description="Eval examples answered for generation metrics and the "
                                  "report's base-vs-adapter comparison (spread over the eval set); 0 = no generation.")
    generate_every: int | None = Field(None, gt=0, description="Also log generation metrics (eval_<metric>) every N "
                                       "evaluations during training; null = only base vs adapter at the end.")
    max_new_tokens: int = Field(64, gt=0, description="Longest generated answer, in tokens.")
    citation_pattern: str = Field(r"\[([^\[\]\s]{1,64})\]", description="Regular expression of a citation; "
                                  "group 1 is the cited id (default: [1], [doc-7]).")
    refusal_patterns: list[str] | None = Field(None, description="Regular expressions that mark an answer as a "
                                               "refusal (case-insensitive); null = built-in English phrases (docs/eval.md).")
    json_schema: str | None = Field(None, description="JSON-schema file answers are checked against (metric json_schema).")
    best: BestConfig = Field(default_factory=BestConfig, description="Best-step selection and early stopping.")
    attack: AttackEvalConfig = Field(default_factory=AttackEvalConfig, description="Attack success rate (docs/objectives.md).")

    _resolve_schema = field_validator("json_schema")(lambda value, info: None if value is None else resolve_input_path(value, info))

    @model_validator(mode="after")
    def _best_metric_is_logged(self):
        generated = self.best.metric.removeprefix("eval_") in GENERATION_METRICS
        if generated and not (self.generate_every and self.generate_samples):
            raise ValueError(f"eval.best.metric is {self.best.metric!r}, a generation metric, but none is logged during "
                             "training: set eval.generate_every (and eval.generate_samples > 0)")
        return self

    @field_validator("citation_pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a regular expression ({exc})") from None
        return value

    @field_validator("refusal_patterns")
    @classmethod
    def _all_compile(cls, value):
        for pattern in value or []:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{pattern!r} is not a regular expression ({exc})") from None
        return value


class ArtifactConfig(Section):
    name: str = Field("adapter", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Adapter name (letters, digits, . _ -).")
    version: str = Field("0.1.0", pattern=r"^\d+\.\d+\.\d+([-+][0-9A-Za-z.-]+)?$", description="Semantic version.")
    license: str | None = Field(None, description="License written in the model card.")
    merge: bool = Field(
        False, description="After training, also write a standalone merged model (model.dtype) into <run folder>/merged/."
    )


class TrackingConfig(Section):
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=list, description="Experiment trackers, each an optional extra of the same name "
        "(`make` installs tensorboard and mlflow); all run offline/local."
    )

    @field_validator("report_to")
    @classmethod
    def _installed(cls, value: list[str]) -> list[str]:
        # Checked here, before a run loads anything, rather than when the tracker is first called at step 1.
        # find_spec, not an import: the config layer stays light (no torch, no tracker import).
        missing = [name for name in value if importlib.util.find_spec(name) is None]
        if missing:
            raise ValueError(f"{', '.join(missing)} is not installed; install the extra: "
                             f"{install_hint(','.join(missing), ', '.join(missing))} (runs offline), or remove it "
                             "from the list")
        return value


class Config(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    quant: QuantConfig = Field(default_factory=QuantConfig)
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    artifact: ArtifactConfig = Field(default_factory=ArtifactConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig, description="The training loss (docs/objectives.md).")
    plugins: PluginsConfig = Field(default_factory=PluginsConfig, description="Callbacks; where plugin code may come from.")
    debug: DebugConfig = Field(default_factory=DebugConfig, description="Debugging aids (slow).")
    distributed: DistributedConfig = Field(default_factory=DistributedConfig, description="Several processes (docs/scaling.md).")
    _objective_fits = model_validator(mode="after")(fits_objective)
    _init_fits_quant = model_validator(mode="after")(init_fits_quantization)

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


def warmup_steps_for(train: TrainConfig, total_steps: int) -> int:
    if train.warmup_steps is not None:
        return train.warmup_steps
    if train.warmup_ratio is not None:
        return math.ceil(train.warmup_ratio * total_steps)
    return 0
