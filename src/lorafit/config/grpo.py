"""The ``objective.grpo:`` section: online RL with verifiable rewards (GRPO), and the reward functions it scores with.

GRPO samples ``num_generations`` answers per prompt from the policy (the base + the adapter being trained), scores
each with the weighted sum of ``rewards``, and pushes towards the answers that beat their group's mean (docs/
objectives.md). The knobs and their defaults are TRL's ``GRPOConfig`` (1.16), except that ``loss_type`` keeps TRL's
default ``dapo`` and the group size is counted per prompt (``train.batch_size`` prompts per micro-batch). The
losses are in lorafit/training/grpo.py, the rewards in lorafit/training/rewards.py.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from lorafit.config.model_sections import Section, resolve_input_path

# Built-in reward functions (lorafit/training/rewards.py): lorafit's own eval metrics, a format check and DAPO's
# soft overlong penalty. Anything else is a dotted path package.module:function (a plugin).
BUILTIN_REWARDS = ("json_valid", "json_schema", "exact_match", "field_accuracy", "rouge_l", "groundedness", "regex",
                   "length_penalty")
# The reward options and the one built-in each belongs to: any other pairing is a mistake worth reporting.
REWARD_OPTIONS = {"pattern": "regex", "schema_file": "json_schema", "soft_limit": "length_penalty"}
DOTTED_FUNCTION = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")
# Logged by the grpo objective (training: the name; evaluation: eval_<name>), besides reward/<function> and
# reward_std/<function> per reward function.
GRPO_METRICS = ("reward", "reward_std", "kl", "completion_length", "clip_ratio", "zero_std_groups",
                "generation_seconds")
# Sharded weights cannot generate: every forward of generate() would gather the full weights token by token.
NO_GENERATION_STRATEGIES = ("fsdp", "deepspeed_zero3")


class RewardConfig(Section):
    function: str = Field(..., description="A built-in reward (json_valid, json_schema, exact_match, field_accuracy, "
                          "rouge_l, groundedness, regex, length_penalty; docs/objectives.md) or package.module:function "
                          "called as f(prompts, completions, **row_fields) -> one float per completion (code execution, "
                          "see plugins.allow_external_code).")
    weight: float = Field(1.0, description="Weight of this reward in the total (the sum over functions).")
    pattern: str | None = Field(None, description="regex: the regular expression a completion must contain "
                                "(re.search; anchor it with ^...$ for the whole answer): 1.0 if found, else 0.0.")
    schema_file: str | None = Field(None, description="json_schema: JSON-schema file the answer is checked against "
                                    "(relative to the config file; default eval.json_schema).")
    soft_limit: int | None = Field(None, gt=0, description="length_penalty: tokens before max_completion_length where "
                                   "the penalty starts (DAPO's soft overlong punishment: 0 up to L-soft_limit, then "
                                   "down to -1 at L); default max_completion_length // 4.")

    _resolve = field_validator("schema_file")(lambda value, info: None if value is None else resolve_input_path(value, info))

    @field_validator("function")
    @classmethod
    def _known(cls, value: str) -> str:
        if value in BUILTIN_REWARDS or DOTTED_FUNCTION.match(value):
            return value
        import difflib

        close = difflib.get_close_matches(value, BUILTIN_REWARDS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"{value!r} is none of {', '.join(BUILTIN_REWARDS)} and not a dotted path "
                         f"package.module:function (e.g. my_rewards:format_ok){hint}")

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value):
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"{value!r} is not a regular expression ({exc})") from None
        return value

    @model_validator(mode="after")
    def _options_fit(self):
        for option, owner in REWARD_OPTIONS.items():
            given = getattr(self, option) is not None
            if given and self.function != owner:
                raise ValueError(f"{option} applies to function: {owner} only (function is {self.function!r})")
        if self.function == "regex" and self.pattern is None:
            raise ValueError("function: regex needs pattern: the regular expression a good answer contains")
        return self

    @property
    def name(self) -> str:
        """How the reward is named in the metrics: the built-in's name or the plugin function's."""
        return self.function.split(":")[-1]


class GRPOConfig(Section):
    num_generations: int = Field(4, ge=2, description="grpo: answers sampled per prompt (the group); advantages are "
                                 "each answer's reward relative to its group. Each micro-batch holds train.batch_size "
                                 "prompts x num_generations answers.")
    max_completion_length: int = Field(64, gt=0, description="grpo: longest sampled answer, in tokens.")
    temperature: float = Field(1.0, gt=0, description="grpo: sampling temperature (the log-probabilities of the loss "
                               "use the same tempered distribution, as in TRL).")
    top_p: float = Field(1.0, gt=0, le=1, description="grpo: nucleus sampling: keep the most likely tokens up to this "
                         "probability mass (1.0 = the whole distribution).")
    beta: float = Field(0.0, ge=0, description="grpo: weight of the KL penalty to the reference (the base model, "
                        "adapter off); 0 = no reference forward at all (TRL's default; DeepSeek-R1 used 0.001).")
    epsilon: float = Field(0.2, gt=0, description="grpo: clip range of the probability ratio (lower side, and upper "
                           "side unless epsilon_high).")
    epsilon_high: float | None = Field(None, gt=0, description="grpo: upper clip bound (DAPO's clip-higher, e.g. 0.28); "
                                       "null = epsilon.")
    loss_type: Literal["grpo", "dr_grpo", "dapo"] = Field("dapo", description="grpo: how token losses add up: grpo "
                                                          "(mean per answer, then over answers: biased towards short "
                                                          "right answers), dr_grpo (sum over answers x "
                                                          "max_completion_length), dapo (mean over all answer tokens "
                                                          "of the step; TRL's default).")
    scale_rewards: Literal["group", "batch", "none"] = Field("group", description="grpo: divide advantages by the "
                                                             "group's reward std (group), the step's (batch), or not "
                                                             "at all (none: Dr. GRPO's advice).")
    num_iterations: int = Field(1, ge=1, description="grpo: optimizer steps on each generated batch (PPO's mu): the "
                                "same prompts and answers train num_iterations consecutive steps, the ratio clipped "
                                "against the log-probabilities at generation.")
    rewards: list[RewardConfig] = Field(default_factory=list, description="grpo: the reward functions, summed with "
                                        "their weights, e.g. [{function: json_valid}, {function: "
                                        "\"my_rewards:format_ok\", weight: 0.5}].")

    @model_validator(mode="after")
    def _distinct_names(self):
        names = [r.name for r in self.rewards]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"rewards: {repeated[0]!r} is given twice: each reward is logged under its name "
                             "(reward/<name>); give each function once")
        return self


def grpo_clashes(config) -> list[str]:
    """The grpo objective and the rest of a config (a Config) that do not go together; [] for other objectives."""
    objective, problems = config.objective, []
    if objective.type != "grpo":
        if objective.grpo != GRPOConfig():
            problems.append(f"objective.grpo applies to type: grpo only (type is {objective.type!r}); remove it")
        return problems
    if not objective.grpo.rewards:
        problems.append("objective.grpo.rewards: GRPO needs at least one reward function, e.g. rewards: "
                        "[{function: json_valid}] (docs/objectives.md)")
    if config.distributed.strategy in NO_GENERATION_STRATEGIES:
        problems.append(f"objective.type: grpo with distributed.strategy: {config.distributed.strategy}: GRPO "
                        "generates answers during training, which needs the whole weights on each process; use "
                        "ddp or deepspeed_zero2 (docs/scaling.md)")
    if config.data.packing != "none":
        problems.append(f"objective.type: grpo with data.packing: {config.data.packing}: GRPO trains on the answers "
                        "it samples, one row each; set data.packing: none")
    if objective.grpo.max_completion_length >= config.data.max_seq_length:
        problems.append(f"objective.grpo.max_completion_length {objective.grpo.max_completion_length} leaves no room "
                        f"for the prompt in data.max_seq_length {config.data.max_seq_length} (prompt + answer); raise "
                        "data.max_seq_length or lower max_completion_length")
    formats = {s.format for s in [*config.data.train, *config.data.eval]}
    if formats - {"auto", "prompts"}:
        problems.append(f"objective.type: grpo reads prompt rows, but a data source has format "
                        f"{sorted(formats - {'auto', 'prompts'})[0]!r}; use format: prompts (or auto)")
    needs_schema = [r for r in objective.grpo.rewards if r.function == "json_schema" and r.schema_file is None]
    if needs_schema and config.eval.json_schema is None:
        problems.append("objective.grpo.rewards: json_schema needs a schema: give schema_file: FILE on the reward, or "
                        "eval.json_schema")
    return problems
