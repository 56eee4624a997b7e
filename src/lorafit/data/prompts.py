"""Prompt rows for ``objective.type: grpo``: what the model is asked, and what its answers are scored against.

Row shapes (JSONL, JSON array, CSV or Parquet; the source's ``fields:`` map renames any key):

    {"prompt": "Give Ana's age as JSON.", "reference": "{\\"age\\": 41}"}     # text prompt (+ system) and fields
    {"prompt": [{"role": "user", "content": "..."}], "reference": "..."}     # TRL's conversational prompt
    {"messages": [{"role": "system", ...}, {"role": "user", ...}]}          # a conversation without its answer
    {"messages": [..., {"role": "user", ...}, {"role": "assistant", ...}]}  # SFT rows: the last answer becomes
    {"conversations": [...]}                                                # the reference (ShareGPT alike)

Every other key of the row is a row field: reward functions receive it, one value per answer, as TRL's reward
functions receive the dataset's extra columns (``f(prompts, completions, reference=[...], my_field=[...])``). The
prompt is rendered with the chat template and its generation prompt, exactly as `lorafit generate` renders it, and
tokenised once; a prompt longer than ``data.max_seq_length - objective.grpo.max_completion_length`` tokens is
dropped (``truncation: drop``) or keeps its last tokens (``truncate``: the generation prompt is at the end). Module
import stays light (no torch): data/precheck.py reads rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from lorafit.data.formats import FieldMap, RowError, sharegpt_messages, check_messages, messages_from_row
from lorafit.data.pairs import prompt_turns
from lorafit.data.sources import ExampleDataset, SourceStats, load_objective_source, read_objective_rows
from lorafit.data.templates import apply_system_turn, render
from lorafit.errors import LorafitError
from lorafit.hashing import sha256_text

PROMPT_KEYS = ("prompt", "messages", "conversations", "system")
ROW_HELP = ('each row must be an object like {"prompt": "...", "reference": "..."} (prompt a text or a messages list '
            'ending with the user turn) or {"messages": [...]} (a conversation ending with the user turn, or with an '
            'assistant turn that becomes the reference); other keys are passed to the reward functions; see '
            "docs/objectives.md")


@dataclass(frozen=True)
class PromptRecord:
    where: str
    messages: tuple[dict, ...]  # rendered with the generation prompt; ends with a user turn
    given: object  # the prompt as the row gave it (text or messages): what reward functions receive as `prompts`
    fields: dict = field(default_factory=dict, compare=False, hash=False)  # every other key, reference included

    def identity(self) -> str:
        return json.dumps(self.messages, sort_keys=True, ensure_ascii=False)


def _conversation(row: dict, fields: FieldMap) -> tuple[list[dict], str] | None:
    """(messages, key) from a messages or conversations key, or None when the row has neither."""
    for canonical, parse in (("messages", messages_from_row), ("conversations", sharegpt_messages)):
        if fields.key(canonical) in row:
            return parse(row, fields), fields.key(canonical)
    return None


def normalise_prompt(row: object, fields: FieldMap, where: str) -> PromptRecord:
    """The PromptRecord of one parsed row, or RowError naming the field and what is wrong."""
    if not isinstance(row, dict):
        raise RowError("not_an_object", f"expected a JSON object, got {type(row).__name__}")
    reference_key = fields.key("reference")
    found = _conversation(row, fields) if fields.key("prompt") not in row else None
    extra = {}
    if found is not None:
        messages, key = found
        given = [dict(m) for m in messages]
        if messages and messages[-1]["role"] == "assistant":  # an SFT row: its last answer is the reference
            if reference_key in row:
                raise RowError("ambiguous_reference", f'"{key}" ends with an assistant turn and the row has a '
                               f'"{reference_key}" too: give the reference once')
            extra["reference"] = messages[-1]["content"]
            messages, given = messages[:-1], given[:-1]
    else:
        messages, key = prompt_turns(row, fields), fields.key("prompt")
        given = row[key] if isinstance(row[key], str) else messages
    if not messages or messages[-1]["role"] != "user":
        raise RowError("role_order", f'"{key}" must end with the user turn the model answers (it ends with '
                       f'{messages[-1]["role"] if messages else "nothing"})')
    problem = check_messages([*messages, {"role": "assistant", "content": "x"}])
    if problem:
        raise RowError(*problem)
    used = {fields.key(k) for k in PROMPT_KEYS} | {reference_key}
    extra |= {k: v for k, v in row.items() if k not in used}
    if reference_key in row:
        value = row[reference_key]
        extra["reference"] = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return PromptRecord(where, tuple(messages), given, extra)


def read_prompts(source) -> tuple[list[PromptRecord], SourceStats, list[dict]]:
    """Parse and check every row of ``source`` (a DataSource); its on_error policy applies as for SFT rows."""
    known = {*PROMPT_KEYS, "reference", "role", "content", "from", "value", "part_text"}
    return read_objective_rows(source, format_name="prompts", row_name="prompt", known_fields=known, normalise=normalise_prompt,
                               what="prompts", row_help=ROW_HELP)



# ------------------------------------------------------------------------------------------------- tokenising


@dataclass
class PromptExample:
    """A tokenised prompt (``input_ids``: the rendered conversation up to and including the generation prompt)."""

    input_ids: list[int]
    where: str
    identity: str
    record: PromptRecord
    rank: float | None = None
    truncated: bool = False

    @property
    def tokens(self) -> int:
        return len(self.input_ids)

    @property
    def num_supervised(self) -> int:
        return 0  # a prompt has no labels: GRPO trains on the answers it samples

    @property
    def token_sequences(self) -> tuple[list[int], ...]:
        return (self.input_ids,)

    def as_features(self) -> dict:
        return {"input_ids": self.input_ids, "record": self.record}


def tokenise_prompt(tokenizer, record: PromptRecord, *, system_turn: str, stats: SourceStats, max_prompt_length: int,
                    truncation: str) -> PromptExample | None:
    """The prompt's ids with the length policy applied; None (counted) when dropped."""
    text = render(tokenizer, apply_system_turn(record.messages, system_turn), add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    truncated = len(ids) > max_prompt_length
    if truncated and truncation == "drop":
        stats.dropped_too_long += 1
        return None
    if truncated:
        stats.truncated += 1
        ids = ids[-max_prompt_length:]
    return PromptExample(ids, record.where, sha256_text(record.identity()), record, truncated=truncated)


def load_prompt_source(source, tokenizer, data, max_prompt_length: int) -> tuple[list[PromptExample], SourceStats, list[dict]]:
    """One source of prompts read, checked and tokenised (not cached: see data/cache.py)."""
    return load_objective_source(
        source, tokenizer, data, kind="prompts", rows="prompts", read=read_prompts,
        why="each prompt is rendered with its generation prompt, as `lorafit generate` does",
        tokenise=lambda record, stats: tokenise_prompt(tokenizer, record, system_turn=data.system_turn, stats=stats,
                                                       max_prompt_length=max_prompt_length, truncation=data.truncation),
        row_help=ROW_HELP, cls=PromptExample)


class PromptDataset(ExampleDataset):
    """Prompts as the features ``PromptCollator`` takes."""


@dataclass(frozen=True)
class PromptCollator:
    """n prompts -> left-padded ``input_ids`` and ``attention_mask`` (n, T), so that every row's answer starts in
    the same column, and their ``records`` (the reward functions' inputs)."""

    pad_token_id: int

    def __call__(self, features: list[dict]) -> dict:
        from lorafit.data.collate import left_padded  # torch: only when batches are made

        input_ids, attention_mask = left_padded([f["input_ids"] for f in features], self.pad_token_id)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "records": [f["record"] for f in features]}


def prompt_audit(stats: list[SourceStats], *, max_prompt_length: int) -> list[str]:
    """Sources that leave most prompts out or cut (the answers would be trained on other prompts than intended)."""
    from lorafit.data.audit import mostly_too_long

    return [f"{too_long} {max_prompt_length} tokens (data.max_seq_length - objective.grpo.max_completion_length) "
            f"and were {'truncated' if s.truncated else 'dropped as too long'} (fix: raise data.max_seq_length)"
            for s in stats if (too_long := mostly_too_long(s, "prompts"))]


def prepare_prompts(data, tokenizer, *, seed: int, max_prompt_length: int, enforce_audit: bool = True):
    """Both splits of prompt data: the same hold-out, budgets, weights, order and overlap check as
    ``prepare_data``, and the length audit, in a ``PreparedData``."""
    from lorafit.data.prepared import prepare_sources

    def audit(stats: dict, enforce: bool) -> tuple[list[str], list[str]]:
        problems = prompt_audit([s for split in stats.values() for s in split], max_prompt_length=max_prompt_length)
        if problems and enforce and data.audit:
            raise LorafitError("the prompt audit failed before training", details=problems,
                               why="training would run on prompts other than the ones written",
                               fix="fix the causes above; data.audit: false turns these into warnings")
        return problems, [f"audit: {p}" for p in problems]

    return prepare_sources(data, lambda s: load_prompt_source(s, tokenizer, data, max_prompt_length), seed=seed,
                           what="prompts", format_name="prompts", dataset=PromptDataset, audit=audit,
                           enforce_audit=enforce_audit)



def inspect_prompts(config, tokenizer, *, use_cache: bool = True) -> dict:
    """`lorafit data inspect` for prompt rows: per source the counts and prompt lengths, the audit, and one prompt as
    the model sees it, with the fields its answers are scored against."""
    from lorafit.data.inspect import lengths_summary

    data, limit = config.data, data_limit(config)
    prepared = prepare_prompts(data, tokenizer, seed=config.train.seed, max_prompt_length=limit, enforce_audit=False)
    sources = []
    for split, split_sources in (("train", data.train), ("eval", data.eval)):
        for source in split_sources:
            examples, s, _ = load_prompt_source(source, tokenizer, data, limit)
            sources.append({"split": split, "path": s.path, "format": s.format, "rows": s.rows, "kept": s.kept,
                            "skipped": s.skipped, "dropped_too_long": s.dropped_too_long, "truncated": s.truncated,
                            "tokens": {"prompt": lengths_summary([len(e.input_ids) for e in examples])}})
    example = prepared.train_examples[0]
    return {"format": "prompts", "sources": sources, "train_examples": len(prepared.train_examples),
            "eval_examples": len(prepared.eval_examples), "train_eval_overlap": prepared.report["train_eval_overlap"],
            "max_prompt_length": limit, "warnings": [w for w in prepared.warnings if not w.startswith("audit: ")],
            "audit": prepared.audit, "audit_enforced": data.audit,
            "example": {"where": example.where, "prompt": tokenizer.decode(example.input_ids),
                        "fields": example.record.fields}}


def data_limit(config) -> int:
    """The longest prompt a run keeps: data.max_seq_length minus the room its answers need."""
    return config.data.max_seq_length - config.objective.grpo.max_completion_length


def render_prompts(report: dict, *, colour: bool = False) -> str:
    from lorafit.data.inspect import warning_and_audit_lines

    lines = []
    for s in report["sources"]:
        skipped = ", ".join(f"{n} {reason}" for reason, n in s["skipped"].items()) or "none"
        t = s["tokens"]["prompt"]
        lines += [f"{s['split']} source {s['path']} (prompts)",
                  f"  rows {s['rows']}, kept {s['kept']}, skipped {skipped}; dropped too long {s['dropped_too_long']}, "
                  f"truncated {s['truncated']} (longest prompt kept: {report['max_prompt_length']} tokens)",
                  f"  prompt tokens: min {t['min']}, median {t['median']}, p95 {t['p95']}, max {t['max']}"]
    lines.append(f"{report['train_examples']} train prompts, {report['eval_examples']} eval, "
                 f"{report['train_eval_overlap']} eval prompts identical to training ones")
    lines += warning_and_audit_lines(report)
    e = report["example"]
    lines += [f"example ({e['where']}), as the model sees it before answering:", e["prompt"],
              f"fields the rewards see: {json.dumps(e['fields'], ensure_ascii=False)}"]
    return "\n".join(lines)
