"""GRPO's reward functions: lorafit's own eval metrics as rewards, a format check, a length penalty, and plugins.

Every reward is called as TRL calls its reward functions: ``f(prompts, completions, completion_ids=..., **row_fields)``
with one entry per sampled answer (a prompt's row repeated for each of its answers) and returns one number per
answer. ``prompts``/``completions`` are texts when the row's prompt was a text, and message lists (the answer as
``[{"role": "assistant", "content": ...}]``) when it was a conversation; ``row_fields`` are the row's other keys
(``reference`` and anything else it holds), each a list. Built-ins (docs/objectives.md):

    json_valid      1 if the answer parses as JSON (evaluate/metrics.py)
    json_schema     1 if it parses and satisfies the schema (reward schema_file, or eval.json_schema)
    exact_match     1 if it equals the row's reference (whitespace normalised)
    field_accuracy  share of the reference JSON object's fields the answer reproduces
    rouge_l         ROUGE-L F1 against the reference
    groundedness    share of the answer's statements its context supports (row "context", or passages marked in
                    the prompt with citation ids; evaluate/groundedness.py)
    regex           1 if the pattern is found in the answer (re.search)
    length_penalty  DAPO's soft overlong punishment on the answer's tokens: 0 up to max_completion_length -
                    soft_limit, then linearly down to -1 at max_completion_length

A plugin ``package.module:function`` is loaded by the objective-plugin rules (training/plugins.py: the config's
folder first, ``plugins.allow_external_code``). A function that raises, returns something other than one finite
number per answer, is a LorafitError naming the function and the row; nothing is trained on that step.
"""

from __future__ import annotations

import json
import math
import numbers
import re
from dataclasses import dataclass, field
from pathlib import Path

from lorafit.errors import LorafitError
from lorafit.evaluate import metrics as M

NEEDS = {"exact_match": "reference", "rouge_l": "reference", "field_accuracy": "reference object",
         "groundedness": "context"}


@dataclass
class Reward:
    """One configured reward: its name in the metrics (``reward/<name>``), weight and function."""

    name: str
    weight: float
    function: object  # f(prompts, completions, completion_ids=..., **row_fields) -> list of numbers
    spec: str  # as the config wrote it: a built-in name or package.module:function
    needs: str | None = None  # what a built-in reads from each row (checked before training)
    contexts: dict = field(default_factory=dict, repr=False)  # groundedness: row place -> its context


def _text(completion) -> str:
    return completion if isinstance(completion, str) else (completion[-1].get("content") or "")


def _per_answer(metric):
    """A reward from ``metric(text, reference)`` over the row's reference."""
    def reward(prompts, completions, reference=None, **_):
        return [float(metric(_text(c), r)) for c, r in zip(completions, reference or [None] * len(completions))]
    return reward


def _length_penalty(limit: int, soft: int):
    """DAPO's soft overlong punishment (its Eq. 13; trl.rewards.get_soft_overlong_punishment)."""
    def reward(prompts, completions, completion_ids, **_):
        out = []
        for ids in completion_ids:
            n = len(ids)
            out.append(0.0 if n <= limit - soft else (limit - soft - n) / soft if n <= limit else -1.0)
        return out
    return reward


def _builtin(spec, *, eval_config, max_completion_length: int) -> tuple[object, str | None]:
    name = spec.function
    if name == "json_valid":
        return (lambda prompts, completions, **_: [M.json_valid(_text(c)) for c in completions]), None
    if name == "json_schema":
        path = Path(spec.schema_file or eval_config.json_schema)
        schema = _read_schema(path)
        return (lambda prompts, completions, **_: [M.json_schema(_text(c), schema) for c in completions]), None
    if name == "regex":
        pattern = re.compile(spec.pattern)
        return (lambda prompts, completions, **_: [float(pattern.search(_text(c)) is not None)
                                                   for c in completions]), None
    if name == "length_penalty":
        soft = spec.soft_limit or max(max_completion_length // 4, 1)
        if soft > max_completion_length:
            raise LorafitError(f"objective.grpo.rewards: length_penalty soft_limit {soft} is above "
                               f"max_completion_length {max_completion_length}", fix="give a smaller soft_limit")
        return _length_penalty(max_completion_length, soft), None
    metric = {"exact_match": M.exact_match, "rouge_l": M.rouge_l, "field_accuracy": M.field_accuracy}.get(name)
    if metric is not None:
        return _per_answer(metric), NEEDS[name]
    return None, NEEDS[name]  # groundedness: build_rewards gives it the contexts check_rows finds, per row


def _read_schema(path: Path) -> dict:
    if not path.is_file():
        raise LorafitError(f"objective.grpo.rewards: json_schema file {path} not found", fix="check the path "
                           "(relative to the config file)")
    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise LorafitError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    problem = M.schema_problem(schema) if isinstance(schema, dict) else "not a JSON object"
    if problem:
        raise LorafitError(f"{path}: not a valid JSON schema ({problem})")
    return schema


def build_rewards(grpo, *, eval_config, config_dir=None, allow_external_code: bool = False) -> list[Reward]:
    """The Reward of each ``objective.grpo.rewards`` entry; plugins are imported here (before any data or model)."""
    from lorafit.training.plugins import load_function

    rewards = []
    for i, spec in enumerate(grpo.rewards):
        if ":" in spec.function:
            function = load_function(spec.function, field=f"objective.grpo.rewards[{i}].function",
                                     config_dir=config_dir, allow_external_code=allow_external_code)
            rewards.append(Reward(spec.name, spec.weight, function, spec.function))
            continue
        function, needs = _builtin(spec, eval_config=eval_config, max_completion_length=grpo.max_completion_length)
        reward = Reward(spec.name, spec.weight, function, spec.function, needs)
        if spec.function == "groundedness":
            reward.function = _grounded(reward, eval_config.citation_pattern)
        rewards.append(reward)
    return rewards


def _grounded(reward: Reward, citation_pattern: str):
    def grounded(prompts, completions, where, **_):
        return [float(M.groundedness(_text(c), reward.contexts.get(w), citation_pattern))
                for c, w in zip(completions, where)]
    return grounded


def check_rows(rewards: list[Reward], examples, *, citation_pattern: str) -> None:
    """Before training: every row has what the built-in rewards compare against (a reference; a JSON-object
    reference for field_accuracy; a context for groundedness), or a LorafitError lists the rows that do not."""
    from lorafit.evaluate.examples import example_context

    for reward in rewards:
        if reward.needs is None:
            continue
        missing = []
        for example in examples:
            record = example.record
            if reward.needs == "context":
                context = example_context(record.fields.get("context"), record.messages, record.where,
                                          citation_pattern)
                reward.contexts[record.where] = context
                bad = context is None
            else:
                reference = record.fields.get("reference")
                bad = not isinstance(reference, str) or (reward.needs == "reference object"
                                                         and M.field_accuracy("", reference) is None)
            if bad:
                missing.append(record.where)
        if missing:
            what = {"reference": 'a "reference" field (the answer to compare with)',
                    "reference object": 'a "reference" that is a JSON object (field_accuracy compares its fields)',
                    "context": 'a "context" field, or passages marked with citation ids in the prompt'}[reward.needs]
            raise LorafitError(f"reward {reward.spec}: {len(missing)} row(s) lack {what.split(' (')[0]}",
                               details=missing[:10] + ([f"... and {len(missing) - 10} more"] if len(missing) > 10
                                                       else []),
                               why=f"{reward.spec} scores each answer against {what}",
                               fix="add it to those rows (or map your key with the source's fields: {reference: KEY}), "
                               "or use another reward")


def score(rewards: list[Reward], records, completions: list[str], completion_ids: list[list[int]]):
    """The (answers, functions) float32 tensor of rewards for answers ``completions`` to ``records`` (one per
    answer, a row repeated for each of its answers). Raises LorafitError naming the function and the row."""
    import torch

    prompts = [r.given for r in records]
    answers = [c if isinstance(r.given, str) else [{"role": "assistant", "content": c}]
               for r, c in zip(records, completions)]
    keys = sorted({k for r in records for k in r.fields})
    row_fields = {k: [r.fields.get(k) for r in records] for k in keys}
    columns = []
    for reward in rewards:
        # groundedness looks its row's context up by place; plugins get exactly TRL's arguments
        given = row_fields | {"where": [r.where for r in records]} if reward.needs == "context" else row_fields
        columns.append(_call(reward, prompts, answers, completion_ids, given, records))
    return torch.tensor(columns, dtype=torch.float32).T.contiguous()  # (N, F)


def _call(reward: Reward, prompts, answers, completion_ids, row_fields: dict, records) -> list[float]:
    name = f"reward {reward.spec}"
    try:
        values = reward.function(prompts, answers, completion_ids=completion_ids, **row_fields)
    except Exception as exc:  # noqa: BLE001  user code: any exception becomes the row's error
        row = _failing_row(reward, prompts, answers, completion_ids, row_fields)
        where = records[row].where if row is not None else f"one of {records[0].where} ... {records[-1].where}"
        raise LorafitError(f"{name} raised {type(exc).__name__}: {exc} (row {where})",
                           why="a reward function must return one number per answer for every row",
                           fix=f"fix {reward.spec} for that row; the answer it was scoring: "
                           f"{_text(answers[row])[:120]!r}" if row is not None else f"fix {reward.spec}") from None
    if hasattr(values, "tolist") and not isinstance(values, list):
        values = values.tolist()  # a numpy array or tensor
    if not isinstance(values, (list, tuple)):
        raise LorafitError(f"{name} returned a {type(values).__name__} for rows {records[0].where} ...; expected a "
                           "list of numbers, one per answer", fix=f"make {reward.spec} return a list of floats")
    if len(values) != len(answers):
        raise LorafitError(f"{name} returned {len(values)} values for {len(answers)} answers (rows {records[0].where} "
                           f"... {records[-1].where})", fix=f"return one number per completion from {reward.spec}")
    out = []
    for value, record in zip(values, records):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise LorafitError(f"{name} returned {value!r} ({type(value).__name__}) for row {record.where}; expected "
                               "a number", fix=f"make {reward.spec} return a float for every answer (0.0 when it "
                               "does not apply)")
        if not math.isfinite(value):
            raise LorafitError(f"{name} returned {value} for row {record.where}: a reward must be finite",
                               why="GRPO would train on a NaN/inf advantage (every answer of the group); the step was "
                               "not trained", fix=f"make {reward.spec} return a finite number for that row")
        out.append(float(value))
    return out


def _failing_row(reward: Reward, prompts, answers, completion_ids, row_fields: dict) -> int | None:
    """The first answer the function raises on when called alone (None when each passes alone)."""
    for i in range(len(answers)):
        try:
            reward.function(prompts[i:i + 1], answers[i:i + 1], completion_ids=completion_ids[i:i + 1],
                            **{k: v[i:i + 1] for k, v in row_fields.items()})
        except Exception:  # noqa: BLE001
            return i
    return None
