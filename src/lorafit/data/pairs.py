"""Preference pairs for ``objective.type: dpo | orpo | simpo``: a prompt, the answer to prefer and the answer to avoid.

Row shapes (JSONL, JSON array, CSV or Parquet; the source's ``fields:`` map renames any key):

    {"prompt": "What is 2 + 3?", "chosen": "5", "rejected": "6"}                  # TRL, plain text
    {"prompt": [{"role": "user", "content": "..."}],                               # TRL, conversational
     "chosen": [{"role": "assistant", "content": "..."}], "rejected": [{"role": "assistant", ...}]}
    {"conversations": [{"from": "human", "value": "..."}],                         # LLaMA-Factory (ShareGPT)
     "chosen": {"from": "gpt", "value": "..."}, "rejected": {"from": "gpt", "value": "..."}}

A text prompt is one user turn (``system`` adds a system turn), as in the prompt_completion format; a prompt
conversation ends with the user turn the answers reply to. Each answer is one assistant turn.

Tokenised like every conversation (``lorafit.data.labels``, the chat template through lorafit's template code):
the prompt + chosen answer is one row, the prompt + rejected answer another, each labelled on its answer turn only
(earlier turns of a multi-turn prompt are context). The length policy applies to the pair: when either row is over
``max_seq_length`` both are dropped (``truncation: drop``) or cut to it (``truncate``, keeps the start). The same
supervision audit as SFT runs on both rows. Module import stays light (no torch): data/precheck.py reads rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from lorafit.data.formats import FieldMap, RowError, sharegpt_messages, check_messages, messages_from_row
from lorafit.data.labels import IGNORE_INDEX, tokenize_conversation
from lorafit.data.sources import ExampleDataset, SourceStats, load_objective_source, read_objective_rows
from lorafit.data.templates import apply_system_turn
from lorafit.hashing import sha256_text

PREFERENCE_FIELDS = ("prompt", "chosen", "rejected", "conversations", "from", "value", "role", "content", "system",
                     "part_text")
ROW_HELP = ('each row must be an object like {"prompt": "...", "chosen": "...", "rejected": "..."} (prompt a text or '
            'a messages list; chosen/rejected a text, or one assistant message) or {"conversations": [...], '
            '"chosen": {"from": "gpt", "value": "..."}, "rejected": {...}}; see docs/objectives.md')


@dataclass(frozen=True)
class PreferenceRecord:
    where: str
    prompt: tuple[dict, ...]  # ends with the user turn both answers reply to
    chosen: dict  # one assistant message
    rejected: dict

    def identity(self) -> str:
        return json.dumps([self.prompt, self.chosen, self.rejected], sort_keys=True, ensure_ascii=False)


def prompt_turns(row: dict, fields: FieldMap) -> list[dict]:
    """The prompt conversation of a row: its ``prompt`` (a text, with ``system``) or messages, or its ShareGPT
    ``conversations``; RowError when it has none."""
    conversations, prompt = fields.key("conversations"), fields.key("prompt")
    system = row.get(fields.key("system"))
    if system is not None and not isinstance(system, str):
        raise RowError("wrong_type", f'field "{fields.key("system")}" must be a string')
    head = [{"role": "system", "content": system}] if system and system.strip() else []
    if conversations in row:
        return head + sharegpt_messages(row, fields)
    if prompt not in row or row[prompt] is None:
        raise RowError("missing_field", f'field "{prompt}" (or "{conversations}") missing (keys: '
                       f'{", ".join(map(str, row)) or "none"})')
    value = row[prompt]
    if isinstance(value, str) and not value.lstrip().startswith("["):
        if not value.strip():
            raise RowError("empty_field", f'field "{prompt}" is empty')
        return head + [{"role": "user", "content": value}]
    return head + messages_from_row(row, FieldMap({**fields.names, "messages": prompt}))


def answer_turn(row: dict, fields: FieldMap, name: str) -> dict:
    """One assistant turn: a text, a message object (role/content or from/value) or a list of one message."""
    key = fields.key(name)
    value = row.get(key)
    if value is None:
        raise RowError("missing_field", f'field "{key}" missing (keys: {", ".join(map(str, row)) or "none"})')
    if isinstance(value, str) and not value.lstrip().startswith(("[", "{")):
        if not value.strip():
            raise RowError("empty_field", f'field "{key}" is empty')
        return {"role": "assistant", "content": value}
    if isinstance(value, str):  # a CSV cell holding JSON
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise RowError("malformed_json", f'field "{key}" holds malformed JSON ({exc.msg})') from None
    turns = value if isinstance(value, list) else [value]
    sharegpt = bool(turns) and isinstance(turns[0], dict) and fields.key("from") in turns[0]
    parse = sharegpt_messages if sharegpt else messages_from_row
    messages = parse({key: turns}, FieldMap({**fields.names, "conversations" if sharegpt else "messages": key}))
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        roles = [m["role"] for m in messages]
        raise RowError("wrong_type", f'field "{key}" must be one assistant turn (got roles {roles}); the prompt '
                       f'goes in "{fields.key("prompt")}" or "{fields.key("conversations")}"')
    return messages[0]


def normalise_preference(row: object, fields: FieldMap, where: str) -> PreferenceRecord:
    """The PreferenceRecord for one parsed row, or RowError naming the field and what is wrong."""
    if not isinstance(row, dict):
        raise RowError("not_an_object", f"expected a JSON object, got {type(row).__name__}")
    prompt = prompt_turns(row, fields)
    if not prompt or prompt[-1]["role"] != "user":
        where_from = fields.key("conversations") if fields.key("conversations") in row else fields.key("prompt")
        raise RowError("role_order", f'"{where_from}" must end with the user turn the answers reply to (it ends with '
                       f'{prompt[-1]["role"] if prompt else "nothing"}); the answers go in "{fields.key("chosen")}" '
                       f'and "{fields.key("rejected")}"')
    chosen, rejected = answer_turn(row, fields, "chosen"), answer_turn(row, fields, "rejected")
    for name, answer in (("chosen", chosen), ("rejected", rejected)):
        problem = check_messages([*prompt, answer])
        if problem:
            raise RowError(problem[0], f'"{fields.key(name)}": {problem[1]}')
    if chosen == rejected:
        raise RowError("same_answers", f'"{fields.key("chosen")}" and "{fields.key("rejected")}" are identical: the '
                       "pair prefers nothing (its loss has no gradient)")
    return PreferenceRecord(where, tuple(prompt), chosen, rejected)


def read_preference(source) -> tuple[list[PreferenceRecord], SourceStats, list[dict]]:
    """Parse and check every row of ``source`` (a DataSource); its on_error policy applies as for SFT rows."""
    return read_objective_rows(source, format_name="preference", row_name="preference", known_fields=PREFERENCE_FIELDS,
                               normalise=normalise_preference, what="preference pairs", row_help=ROW_HELP)



# ------------------------------------------------------------------------------------------------- tokenising


@dataclass
class PreferenceExample:
    """The two rows of a pair; ``input_ids``/``labels`` are the chosen row's (what budgets and length grouping
    look at), ``rejected_ids``/``rejected_labels`` the rejected row's."""

    input_ids: list[int]
    labels: list[int]
    rejected_ids: list[int]
    rejected_labels: list[int]
    where: str
    identity: str
    rank: float | None = None
    truncated: bool = False
    record: PreferenceRecord | None = field(default=None, compare=False, repr=False)

    @property
    def num_supervised(self) -> int:
        return sum(label != IGNORE_INDEX for label in (*self.labels, *self.rejected_labels))

    @property
    def token_sequences(self) -> tuple[list[int], ...]:
        """Every id sequence of the pair (what a data fingerprint must cover)."""
        return self.input_ids, self.labels, self.rejected_ids, self.rejected_labels

    @property
    def tokens(self) -> int:
        return len(self.input_ids) + len(self.rejected_ids)

    def as_features(self) -> dict:
        return {"input_ids": self.input_ids, "labels": self.labels, "rejected_ids": self.rejected_ids,
                "rejected_labels": self.rejected_labels}


def _trainable(labels: list[int]) -> bool:
    # Position 0 is never a target (nothing precedes it): a label there alone trains nothing.
    return sum(label != IGNORE_INDEX for label in labels[1:]) > 0


def tokenise_pair(tokenizer, record: PreferenceRecord, *, system_turn: str, stats: SourceStats, max_seq_length: int,
                  truncation: str) -> PreferenceExample | None:
    """Both rows of a pair with answer-only labels, the length policy applied; None (counted) when dropped."""
    prompt = apply_system_turn(list(record.prompt), system_turn)
    rows = [tokenize_conversation(tokenizer, [*prompt, answer], train_on="last_assistant")
            for answer in (record.chosen, record.rejected)]
    for row in rows:
        stats.unterminated_turns += row.unterminated_turns
        stats.prompt_mismatch_turns += row.prompt_mismatch_turns
        stats.prompt_whitespace_turns += row.prompt_whitespace_turns
    (ids, labels), (rejected_ids, rejected_labels) = [(r.input_ids, r.labels) for r in rows]
    truncated = max(len(ids), len(rejected_ids)) > max_seq_length
    if truncated and truncation == "drop":
        stats.dropped_too_long += 1
        return None
    if truncated:
        stats.truncated += 1
        ids, labels = ids[:max_seq_length], labels[:max_seq_length]
        rejected_ids, rejected_labels = rejected_ids[:max_seq_length], rejected_labels[:max_seq_length]
    if not (_trainable(labels) and _trainable(rejected_labels)):
        stats.dropped_no_supervision += 1
        return None
    return PreferenceExample(ids, labels, rejected_ids, rejected_labels, record.where, sha256_text(record.identity()),
                             truncated=truncated, record=record)


def load_preference_source(source, tokenizer, data, *, use_cache: bool = False
                           ) -> tuple[list[PreferenceExample], SourceStats, list[dict]]:
    """One preference source read, checked and tokenised, or taken from the cache (data/cache.py)."""
    return load_objective_source(
        source, tokenizer, data, kind="preference", rows="preference pairs", read=read_preference,
        why="each answer is rendered after its prompt as a conversation, as the model sees it when it answers, and "
        "labelled on the answer turn only",
        tokenise=lambda record, stats: tokenise_pair(tokenizer, record, system_turn=data.system_turn, stats=stats,
                                                     max_seq_length=data.max_seq_length, truncation=data.truncation),
        row_help=ROW_HELP, cls=PreferenceExample, record_cls=PreferenceRecord, use_cache=use_cache)


class PreferenceDataset(ExampleDataset):
    """Pairs as the features ``PreferenceCollator`` takes."""


@dataclass(frozen=True)
class PreferenceCollator:
    """n pairs -> ONE batch of 2n right-padded rows: the n chosen rows, then the n rejected rows (the objective
    splits it in two), padded and masked as ``PadCollator`` does."""

    pad_token_id: int

    def __call__(self, features: list[dict]):
        from lorafit.data.collate import PadCollator  # torch: only when batches are made

        rows = [{"input_ids": f["input_ids"], "labels": f["labels"]} for f in features]
        rows += [{"input_ids": f["rejected_ids"], "labels": f["rejected_labels"]} for f in features]
        return PadCollator(self.pad_token_id)(rows)


def prepare_preference(data, tokenizer, *, seed: int, enforce_audit: bool = True, use_cache: bool = False):
    """Both splits of preference data: the same hold-out, budgets, weights, order, overlap check and supervision
    audit as ``prepare_data``, in a ``PreparedData``."""
    from lorafit.data.prepared import prepare_sources

    return prepare_sources(data, lambda s: load_preference_source(s, tokenizer, data, use_cache=use_cache), seed=seed,
                           what="pairs", format_name="preference", dataset=PreferenceDataset,
                           enforce_audit=enforce_audit)



def inspect_preference(config, tokenizer, *, use_cache: bool = True) -> dict:
    """`lorafit data inspect` for preference pairs: per source the counts and both rows' token lengths, the
    audit, and one pair with each answer's trained tokens marked."""
    from lorafit.data.inspect import lengths_summary, marked_pieces

    data = config.data
    prepared = prepare_preference(data, tokenizer, seed=config.train.seed, enforce_audit=False, use_cache=use_cache)
    sources = []
    for split, split_sources in (("train", data.train), ("eval", data.eval)):
        for source in split_sources:
            examples, s, _ = load_preference_source(source, tokenizer, data, use_cache=use_cache)
            sources.append({
                "split": split, "path": s.path, "format": s.format, "rows": s.rows, "kept": s.kept,
                "skipped": s.skipped,
                "dropped_too_long": s.dropped_too_long, "truncated": s.truncated,
                "dropped_no_supervision": s.dropped_no_supervision,
                "tokens": {"chosen": lengths_summary([len(e.input_ids) for e in examples]),
                           "rejected": lengths_summary([len(e.rejected_ids) for e in examples])},
            })
    example = prepared.train_examples[0]
    marked = {}
    for name, ids, labels in (("chosen", example.input_ids, example.labels),
                              ("rejected", example.rejected_ids, example.rejected_labels)):
        marked[name] = "".join(f"[[{t}]]" if on else t for t, on in marked_pieces(tokenizer, ids, labels))
    return {"format": "preference", "sources": sources, "train_examples": len(prepared.train_examples),
            "eval_examples": len(prepared.eval_examples), "train_eval_overlap": prepared.report["train_eval_overlap"],
            "warnings": [w for w in prepared.warnings if not w.startswith("audit: ")], "audit": prepared.audit,
            "audit_enforced": data.audit, "example": {"where": example.where, **marked}}


def render_preference(report: dict, *, colour: bool = False) -> str:
    from lorafit.data.inspect import warning_and_audit_lines

    lines = []
    for s in report["sources"]:
        skipped = ", ".join(f"{n} {reason}" for reason, n in s["skipped"].items()) or "none"
        lines += [f"{s['split']} source {s['path']} (preference pairs)",
                  f"  rows {s['rows']}, kept {s['kept']}, skipped {skipped}; dropped too long {s['dropped_too_long']}, "
                  f"truncated {s['truncated']}, no supervised token {s['dropped_no_supervision']}"]
        lines += [f"  {row} row tokens: min {t['min']}, median {t['median']}, p95 {t['p95']}, max {t['max']}"
                  for row, t in s["tokens"].items()]
    lines.append(f"{report['train_examples']} train pairs, {report['eval_examples']} eval, "
                 f"{report['train_eval_overlap']} eval pairs identical to training ones")
    lines += warning_and_audit_lines(report)
    e = report["example"]
    lines += [f"example ({e['where']}); trained tokens in [[double brackets]]:", "chosen:", e["chosen"],
              "rejected:", e["rejected"]]
    return "\n".join(lines)
