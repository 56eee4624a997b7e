"""Unpaired answers for ``objective.type: kto``: a prompt, one answer, and whether that answer is desirable.

Row shapes (TRL's unpaired preference format; the source's ``fields:`` map renames any key):

    {"prompt": "What is 2 + 3?", "completion": "5", "label": true}                   # plain text
    {"prompt": [{"role": "user", "content": "..."}],                                  # conversational
     "completion": [{"role": "assistant", "content": "..."}], "label": false}

``label`` is a boolean (``true``/``false``; CSV cells ``"true"``/``"false"``). Each row is tokenised like an SFT
conversation, the answer turn supervised (``lorafit.data.labels``), with the same length policy and supervision
audit. KTO's reference point (the KL term) pairs each prompt with another row's answer: the collator keeps where
each row's answer starts, so training/kto.py can rebuild those mismatched rows. No torch at import (data/precheck.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from lorafit.data.formats import FieldMap, RowError, check_messages
from lorafit.data.labels import IGNORE_INDEX, tokenize_conversation
from lorafit.data.pairs import answer_turn, prompt_turns
from lorafit.data.sources import ExampleDataset, SourceStats, load_objective_source, read_objective_rows
from lorafit.data.templates import apply_system_turn
from lorafit.hashing import sha256_text

UNPAIRED_FIELDS = ("prompt", "completion", "label", "conversations", "from", "value", "role", "content", "system",
                   "part_text")
ROW_HELP = ('each row must be an object like {"prompt": "...", "completion": "...", "label": true} (prompt a text or a '
            'messages list; completion a text or one assistant message; label true for a desirable answer, false for '
            'an undesirable one); see docs/objectives.md')


@dataclass(frozen=True)
class UnpairedRecord:
    where: str
    prompt: tuple[dict, ...]
    completion: dict  # one assistant message
    label: bool

    def identity(self) -> str:
        return json.dumps([self.prompt, self.completion, self.label], sort_keys=True, ensure_ascii=False)


def _label(row: dict, key: str) -> bool:
    value = row.get(key)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if not isinstance(value, bool):
        got = "missing" if value is None else f"{value!r}"
        raise RowError("missing_field" if value is None else "wrong_type",
                       f'field "{key}" must be true (a desirable answer) or false (an undesirable one); got {got}')
    return value


def normalise_unpaired(row: object, fields: FieldMap, where: str) -> UnpairedRecord:
    """The UnpairedRecord of one parsed row, or RowError naming the field and what is wrong."""
    if not isinstance(row, dict):
        raise RowError("not_an_object", f"expected a JSON object, got {type(row).__name__}")
    prompt = prompt_turns(row, fields)
    if not prompt or prompt[-1]["role"] != "user":
        raise RowError("role_order", f'"{fields.key("prompt")}" must end with the user turn the answer replies to (it '
                       f'ends with {prompt[-1]["role"] if prompt else "nothing"})')
    completion = answer_turn(row, fields, "completion")
    problem = check_messages([*prompt, completion])
    if problem:
        raise RowError(problem[0], f'"{fields.key("completion")}": {problem[1]}')
    return UnpairedRecord(where, tuple(prompt), completion, _label(row, fields.key("label")))


def read_unpaired(source) -> tuple[list[UnpairedRecord], SourceStats, list[dict]]:
    """Parse and check every row of ``source`` (a DataSource); its on_error policy applies as for SFT rows."""
    return read_objective_rows(source, format_name="unpaired", row_name="unpaired", known_fields=[*UNPAIRED_FIELDS, "response"],
                               normalise=normalise_unpaired, what="unpaired answers", row_help=ROW_HELP)



# ------------------------------------------------------------------------------------------------- tokenising


@dataclass
class UnpairedExample:
    input_ids: list[int]
    labels: list[int]
    label: bool
    answer_start: int  # the first supervised position: the prompt is input_ids[:answer_start]
    where: str
    identity: str
    rank: float | None = None
    truncated: bool = False
    record: UnpairedRecord | None = field(default=None, compare=False, repr=False)

    @property
    def num_supervised(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)

    @property
    def tokens(self) -> int:
        return len(self.input_ids)

    @property
    def token_sequences(self) -> tuple[list[int], ...]:
        return self.input_ids, self.labels, [int(self.label)]

    def as_features(self) -> dict:
        return {"input_ids": self.input_ids, "labels": self.labels, "label": self.label,
                "answer_start": self.answer_start}


def tokenise_unpaired(tokenizer, record: UnpairedRecord, *, system_turn: str, stats: SourceStats,
                      max_seq_length: int, truncation: str) -> UnpairedExample | None:
    """The row with answer-only labels, the length policy applied; None (counted) when dropped."""
    row = tokenize_conversation(tokenizer, [*apply_system_turn(record.prompt, system_turn), record.completion],
                                train_on="last_assistant")
    stats.unterminated_turns += row.unterminated_turns
    stats.prompt_mismatch_turns += row.prompt_mismatch_turns
    stats.prompt_whitespace_turns += row.prompt_whitespace_turns
    ids, labels = row.input_ids, row.labels
    truncated = len(ids) > max_seq_length
    if truncated and truncation == "drop":
        stats.dropped_too_long += 1
        return None
    if truncated:
        stats.truncated += 1
        ids, labels = ids[:max_seq_length], labels[:max_seq_length]
    start = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), None)
    if start is None or start == 0:  # nothing supervised (or only position 0, which nothing predicts)
        stats.dropped_no_supervision += 1
        return None
    return UnpairedExample(ids, labels, record.label, start, record.where, sha256_text(record.identity()),
                           truncated=truncated, record=record)


def load_unpaired_source(source, tokenizer, data, *, use_cache: bool = False
                         ) -> tuple[list[UnpairedExample], SourceStats, list[dict]]:
    """One source of unpaired answers read, checked and tokenised, or taken from the cache (data/cache.py)."""
    return load_objective_source(
        source, tokenizer, data, kind="unpaired", rows="kto rows", read=read_unpaired,
        why="each answer is rendered after its prompt as a conversation and labelled on the answer turn only",
        tokenise=lambda record, stats: tokenise_unpaired(tokenizer, record, system_turn=data.system_turn, stats=stats,
                                                         max_seq_length=data.max_seq_length, truncation=data.truncation),
        row_help=ROW_HELP, cls=UnpairedExample, record_cls=UnpairedRecord, use_cache=use_cache)


class UnpairedDataset(ExampleDataset):
    """Unpaired answers as the features ``UnpairedCollator`` takes."""


@dataclass(frozen=True)
class UnpairedCollator:
    """n rows -> right-padded ``input_ids``/``labels``/``attention_mask`` (as ``PadCollator``), ``desirable`` (n,)
    and, on the host, each row's ids, labels and answer start (``rows``) for KTO's mismatched pairs."""

    pad_token_id: int

    def __call__(self, features: list[dict]) -> dict:
        import torch

        from lorafit.data.collate import PadCollator

        batch = PadCollator(self.pad_token_id)(features)
        batch["desirable"] = torch.tensor([bool(f["label"]) for f in features], dtype=torch.bool)
        batch["rows"] = [(f["input_ids"], f["labels"], f["answer_start"]) for f in features]
        return batch


def prepare_unpaired(data, tokenizer, *, seed: int, enforce_audit: bool = True, use_cache: bool = False):
    """Both splits of unpaired data through the same hold-out, budgets, weights, order, overlap check and
    supervision audit as ``prepare_data``, in a ``PreparedData``."""
    from lorafit.data.prepared import prepare_sources

    prepared = prepare_sources(data, lambda s: load_unpaired_source(s, tokenizer, data, use_cache=use_cache),
                               seed=seed, what="answers", format_name="unpaired", dataset=UnpairedDataset,
                               enforce_audit=enforce_audit)
    desirable = sum(e.label for e in prepared.train_examples)
    prepared.report.update(desirable=desirable, undesirable=len(prepared.train_examples) - desirable)
    if desirable in (0, len(prepared.train_examples)):
        prepared.warnings.append(f"every training answer is {'desirable' if desirable else 'undesirable'}: KTO "
                                 "learns from both kinds (its reference point is shared)")
    return prepared



def inspect_unpaired(config, tokenizer, *, use_cache: bool = True) -> dict:
    """`lorafit data inspect` for KTO rows: counts, lengths, desirable share, the audit and one marked row."""
    from lorafit.data.inspect import lengths_summary, marked_pieces

    data = config.data
    prepared = prepare_unpaired(data, tokenizer, seed=config.train.seed, enforce_audit=False, use_cache=use_cache)
    sources = []
    for split, split_sources in (("train", data.train), ("eval", data.eval)):
        for source in split_sources:
            examples, s, _ = load_unpaired_source(source, tokenizer, data, use_cache=use_cache)
            sources.append({"split": split, "path": s.path, "format": s.format, "rows": s.rows, "kept": s.kept,
                            "skipped": s.skipped, "dropped_too_long": s.dropped_too_long, "truncated": s.truncated,
                            "dropped_no_supervision": s.dropped_no_supervision,
                            "desirable": sum(e.label for e in examples),
                            "tokens": {"row": lengths_summary([len(e.input_ids) for e in examples])}})
    example = prepared.train_examples[0]
    marked = "".join(f"[[{t}]]" if on else t for t, on in marked_pieces(tokenizer, example.input_ids, example.labels))
    return {"format": "unpaired", "sources": sources, "train_examples": len(prepared.train_examples),
            "eval_examples": len(prepared.eval_examples), "train_eval_overlap": prepared.report["train_eval_overlap"],
            "warnings": [w for w in prepared.warnings if not w.startswith("audit: ")], "audit": prepared.audit,
            "audit_enforced": data.audit, "example": {"where": example.where, "label": example.label, "marked": marked}}


def render_unpaired(report: dict, *, colour: bool = False) -> str:
    from lorafit.data.inspect import warning_and_audit_lines

    lines = []
    for s in report["sources"]:
        skipped = ", ".join(f"{n} {reason}" for reason, n in s["skipped"].items()) or "none"
        t = s["tokens"]["row"]
        lines += [f"{s['split']} source {s['path']} (unpaired answers, {s['desirable']} of {s['kept']} desirable)",
                  f"  rows {s['rows']}, kept {s['kept']}, skipped {skipped}; dropped too long {s['dropped_too_long']}, "
                  f"truncated {s['truncated']}, no supervised token {s['dropped_no_supervision']}",
                  f"  row tokens: min {t['min']}, median {t['median']}, p95 {t['p95']}, max {t['max']}"]
    lines.append(f"{report['train_examples']} train answers, {report['eval_examples']} eval, "
                 f"{report['train_eval_overlap']} eval answers identical to training ones")
    lines += warning_and_audit_lines(report)
    e = report["example"]
    lines += [f"example ({e['where']}, {'desirable' if e['label'] else 'undesirable'}); trained tokens in "
              "[[double brackets]]:", e["marked"]]
    return "\n".join(lines)
