"""One source, start to finish: read rows -> normalise (format + field map) -> on_error policy -> tokenise ->
length policy. The result (examples and counts) is what the on-disk cache stores, so everything here depends only
on the file's bytes, the source's config, the tokenizer, the chat template and the data options passed in.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from lorafit.config import DataSource
from lorafit.data.formats import (FieldMap, Record, RowError, describe_expected, detect_format, normalise,
                                  preference_keys)
from lorafit.data.labels import IGNORE_INDEX, TokenizedExample, tokenize_conversation, tokenize_text
from lorafit.data.templates import apply_system_turn
from lorafit.data.readers import read_rows
from lorafit.data.variables import fill_rows
from lorafit.errors import LorafitError
from lorafit.hashing import sha256_text

MAX_LISTED = 10


@dataclass
class Example:
    """A tokenised example and what the mixing, audit and reports need to know about it."""

    input_ids: list[int]
    labels: list[int]
    where: str
    identity: str  # sha256 of the normalised content: equal content, equal identity
    rank: float | None = None
    unterminated_turns: int = 0
    truncated: bool = False
    source: int = 0  # position of its training source in data.train (set by mixing; per-source training loss)

    @property
    def num_supervised(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


@dataclass
class SourceStats:
    """What happened to one source's rows; part of training_summary.json and `lorafit data inspect`."""

    path: str
    format: str = ""
    rows: int = 0
    kept: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count (on_error: skip)
    dropped_too_long: int = 0
    truncated: int = 0
    dropped_no_supervision: int = 0
    tokens: int = 0
    supervised_tokens: int = 0
    unterminated_turns: int = 0
    prompt_mismatch_turns: int = 0
    prompt_whitespace_turns: int = 0
    unfilled_rows: int = 0  # rows still holding a {{name}} placeholder after the source's vars were filled in
    unfilled_names: list[str] = field(default_factory=list)
    unfilled_first: str = ""  # where the first such row is

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class SourceData:
    examples: list[Example]
    stats: SourceStats
    skipped_rows: list[dict]  # {"where", "reason", "message"} for the run folder's report


def read_records(source: DataSource, *, rank_field: str | None = None) -> tuple[list[Record], SourceStats, list[dict]]:
    """Parse and check every row of ``source``; apply its on_error policy. Raises LorafitError listing problems."""
    path = Path(source.path)
    rows = read_rows(path)
    stats = SourceStats(path=str(path), rows=len(rows))
    rows = fill_rows(rows, source.vars, stats)
    fields = FieldMap(source.fields)
    _refuse_preference_data(path, rows, fields)
    fmt = source.format
    if fmt == "auto":
        first = next((r for r in rows if r.problem is None and isinstance(r.value, dict)), None)
        # No object row at all: every row fails on its own (malformed, not an object), reported below.
        fmt = detect_format(first.value, fields) if first else "unknown"
        if fmt is None:
            where = first.where if first else rows[0].where
            keys = ", ".join(map(str, first.value)) if first else "none"
            raise LorafitError(
                f"{where}: cannot tell the data format from the keys ({keys})",
                why=f"a row needs one of: {describe_expected(fields)}",
                fix="rename the keys with the source's `fields:` map (e.g. fields: {prompt: question, response: answer}), "
                "or set `format:`; see docs/data.md",
            )
    stats.format = fmt
    records: list[Record] = []
    problems: list[tuple[str, str, str]] = []  # (where, reason, message)
    for row in rows:
        if row.problem is not None:
            problems.append((row.where, *row.problem))
            continue
        try:
            records.append(normalise(row.value, fmt, fields, row.where, task_prefix=source.task_prefix, rank_field=rank_field))
        except RowError as error:
            problems.append((row.where, error.reason, error.message))
    skipped_rows: list[dict] = []
    apply_on_error(problems, stats, skipped_rows, on_error=source.on_error, max_skip_fraction=source.max_skip_fraction,
                   what=f"invalid row{'s' if len(problems) > 1 else ''} ({fmt} format)", why=_FORMAT_HELP.get(fmt, ""))
    if not records:
        raise LorafitError(f"{path}: no usable rows", why="every row was invalid")
    return records, stats, skipped_rows


def read_objective_rows(source, *, format_name: str, row_name: str, known_fields, normalise, what: str,
                        row_help: str) -> tuple[list, SourceStats, list[dict]]:
    """(records, stats, skipped rows) of one source of an objective that reads its own rows (preference pairs,
    triplets, unpaired answers, prompts): its field map checked against ``known_fields``, its ``vars`` filled in,
    every row normalised by ``normalise(row, fields, where)`` (a RowError is a bad row), and its on_error policy
    applied as for SFT rows (``what``/``row_help`` name the rows in the message)."""
    unknown = sorted(set(source.fields) - set(known_fields))
    if unknown:
        raise LorafitError(f"{source.path}: fields map names {unknown}, not {row_name} fields",
                           fix=f"map only {', '.join(sorted(known_fields))} for a {row_name} source")
    rows = read_rows(Path(source.path))
    fields = FieldMap(source.fields)
    stats = SourceStats(path=str(source.path), format=format_name, rows=len(rows))
    rows = fill_rows(rows, source.vars, stats)
    records, problems, skipped = [], [], []
    for row in rows:
        if row.problem is not None:
            problems.append((row.where, *row.problem))
            continue
        try:
            records.append(normalise(row.value, fields, row.where))
        except RowError as error:
            problems.append((row.where, error.reason, error.message))
    apply_on_error(problems, stats, skipped, on_error=source.on_error, max_skip_fraction=source.max_skip_fraction,
                   what=f"invalid row{'s' if len(problems) > 1 else ''} ({what})", why=row_help)
    if not records:
        raise LorafitError(f"{source.path}: no usable rows", why="every row was invalid")
    return records, stats, skipped


def tokenisation_options(data) -> dict:
    """The data options that shape every kind of row's tokens (part of every cache key)."""
    return {"max_seq_length": data.max_seq_length, "truncation": data.truncation, "train_on": data.train_on,
            "curriculum_field": data.curriculum_field, "system_turn": data.system_turn}


def load_objective_source(source, tokenizer, data, *, kind: str, rows: str, why: str, read, tokenise, row_help: str,
                          cls, record_cls=None, use_cache: bool = False, options: dict | None = None):
    """(examples, stats, skipped rows) of one source of an objective that reads its own rows, every kind alike: the
    chat template required, ``read(source)`` -> records, ``tokenise(record, stats)`` -> example or None (dropped and
    counted), through the cache when ``use_cache`` (``options``: anything else that shapes the tokens)."""
    from lorafit.data.cache import cached_source

    def tokenised():
        require_chat_template(tokenizer, source.path, rows, why)
        records, stats, skipped = read(source)
        examples = tokenise_objective_rows(source, records, stats, skipped, lambda record: tokenise(record, stats),
                                           row_help=row_help)
        return examples, stats, skipped

    key_options = {"kind": kind, **tokenisation_options(data), **(options or {})}
    return cached_source(source, tokenizer, key_options, tokenised, use_cache=use_cache, cls=cls, record_cls=record_cls)


def require_chat_template(tokenizer, path, rows: str, why: str) -> None:
    """Rows rendered as conversations need a chat template: a clear error naming the source when there is none."""
    if not getattr(tokenizer, "chat_template", None):
        raise LorafitError(f"{path}: {rows} need a chat template and the tokenizer has none", why=why,
                           fix="set data.chat_template (inline Jinja) or data.chat_template_file in the config, or "
                           "use a model folder whose tokenizer defines one")


def tokenise_objective_rows(source, records: list, stats: SourceStats, skipped: list[dict], tokenise, *,
                            row_help: str) -> list:
    """``tokenise(record)`` for each record of an objective that reads its own rows; it returns the example, or
    None when its length or supervision policy dropped it (and counted why). A row the chat template cannot render
    (RowError) is a bad row under the source's on_error policy, as for SFT rows. Counts tokens and kept rows."""
    examples, problems = [], []
    for record in records:
        try:
            example = tokenise(record)
        except RowError as error:
            problems.append((record.where, error.reason, error.message))
            continue
        if example is not None:
            examples.append(example)
            stats.tokens += example.tokens
            stats.supervised_tokens += example.num_supervised
    apply_on_error(problems, stats, skipped, on_error=source.on_error, max_skip_fraction=source.max_skip_fraction,
                   what="rows the chat template cannot render", why=row_help)
    stats.kept = len(examples)
    return examples


def apply_on_error(problems: list[tuple[str, str, str]], stats: SourceStats, skipped_rows: list[dict], *,
                   on_error: str, max_skip_fraction: float, what: str, why: str) -> None:
    """The source's on_error policy for row ``problems`` (where, reason, message): raise listing them, or count
    them into ``stats.skipped`` and ``skipped_rows`` (within max_skip_fraction of all the source's rows)."""
    if not problems:
        return
    if on_error == "fail":
        listed = [f"{w}: {m}" for w, _, m in problems[:MAX_LISTED]]
        more = len(problems) - len(listed)
        raise LorafitError(
            f"{stats.path}: {len(problems)} {what}", details=listed + ([f"... and {more} more"] if more else []), why=why,
            fix="fix or remove those rows, or set on_error: skip (with max_skip_fraction) on this source; see docs/data.md",
        )
    skipped_rows += [{"where": w, "reason": r, "message": m} for w, r, m in problems]
    stats.skipped = dict(Counter(stats.skipped) + Counter(r for _, r, _ in problems))
    skipped = sum(stats.skipped.values())
    if skipped / stats.rows > max_skip_fraction:
        raise LorafitError(
            f"{stats.path}: {skipped} of {stats.rows} rows are invalid ({_fraction(skipped, stats.rows)}), "
            f"more than max_skip_fraction={max_skip_fraction}",
            details=[f"{w}: {m}" for w, _, m in problems[:MAX_LISTED]],
            why="skipping is for a few bad rows; this many usually means a wrong format, field map or chat template",
            fix="fix the file, check `format:`/`fields:`/the chat template, or raise max_skip_fraction for this source",
        )


def _refuse_preference_data(path: Path, rows, fields: FieldMap) -> None:
    """Preference pairs trained as ordinary rows would teach the rejected answers too (or be skipped unseen)."""
    found = next((row for row in rows if row.problem is None and preference_keys(row.value, fields)), None)
    if found is not None:
        raise LorafitError(
            f"{found.where}: this is preference data (the row has \"chosen\" and \"rejected\"), and this run's "
            "objective is supervised",
            why="supervised training learns every answer it is given: it cannot use a chosen/rejected pair, and reading "
            "the row as an ordinary conversation would train the rejected answer or drop the pair unseen",
            fix="train on the pairs with objective: {type: dpo} (or orpo; docs/objectives.md), or train on the "
            "preferred answers by mapping them explicitly (e.g. fields: {completion: chosen} on a "
            "prompt/chosen/rejected file)",
        )


def _fraction(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%"


_FORMAT_HELP = {
    "messages": 'each row must be an object like {"messages": [{"role": "user", "content": "..."}, '
                '{"role": "assistant", "content": "..."}]}',
    "sharegpt": 'each row must be an object like {"conversations": [{"from": "human", "value": "..."}, '
                '{"from": "gpt", "value": "..."}]}',
    "alpaca": 'each row must be an object like {"instruction": "...", "input": "", "output": "..."}',
    "prompt_completion": 'each row must be an object like {"prompt": "...", "completion": "..."}',
    "text": 'each row must be an object like {"text": "..."}',
}


def tokenise_records(records: list[Record], tokenizer, *, max_seq_length: int, truncation: str, train_on: str,
                     stats: SourceStats, system_turn: str = "keep", on_error: str = "fail",
                     max_skip_fraction: float = 0.0, skipped_rows: list[dict] | None = None) -> list[Example]:
    """Tokenise with labels and apply the length policy, counting into ``stats``.

    A row the chat template cannot render (it raises, drops tool calls, or renders history differently) is a row
    problem under the source's ``on_error`` policy, like a malformed row; skipped ones go to ``skipped_rows``.
    """
    examples: list[Example] = []
    problems: list[tuple[str, str, str]] = []
    for record in records:
        try:
            tokenised = _tokenise(record, tokenizer, train_on=train_on, system_turn=system_turn)
        except RowError as error:
            problems.append((record.where, error.reason, error.message))
            continue
        stats.unterminated_turns += tokenised.unterminated_turns
        stats.prompt_mismatch_turns += tokenised.prompt_mismatch_turns
        stats.prompt_whitespace_turns += tokenised.prompt_whitespace_turns
        input_ids, labels, truncated = tokenised.input_ids, tokenised.labels, False
        if len(input_ids) > max_seq_length:
            if truncation == "drop":
                stats.dropped_too_long += 1
                continue
            stats.truncated += 1
            input_ids, labels, truncated = input_ids[:max_seq_length], labels[:max_seq_length], True
        example = Example(input_ids, labels, record.where, sha256_text(record.identity()),
                          record.rank, tokenised.unterminated_turns, truncated)
        # Position 0 is never a target (nothing precedes it), so a label there would be counted but not trained.
        if example.num_supervised - (labels[0] != IGNORE_INDEX) <= 0:
            stats.dropped_no_supervision += 1
            continue
        examples.append(example)
        stats.tokens += len(input_ids)
        stats.supervised_tokens += example.num_supervised
    apply_on_error(problems, stats, skipped_rows if skipped_rows is not None else [], on_error=on_error,
                   max_skip_fraction=max_skip_fraction,
                   what=f"row{'s' if len(problems) > 1 else ''} the chat template cannot render",
                   why="each conversation is rendered with the chat template (data.chat_template, data.chat_template_file "
                   "or the tokenizer's own), and labels come from that rendering")
    stats.kept = len(examples)
    if records and not examples and problems:
        raise LorafitError(f"{stats.path}: no usable rows", why="the chat template failed on every row")
    return examples


def _tokenise(record: Record, tokenizer, *, train_on: str, system_turn: str) -> TokenizedExample:
    if record.text is not None:
        return tokenize_text(tokenizer, record.text)
    messages = apply_system_turn(record.messages, system_turn)
    return tokenize_conversation(tokenizer, messages, train_on=train_on, tools=record.tools)


class ExampleDataset:
    """Examples that turn themselves into collator features (``as_features``): triplets, preference pairs. A
    map-style dataset by protocol (Trainer's DataLoader needs only ``__len__`` and ``__getitem__``), so the
    torch-free row checks can import the modules that define these."""

    def __init__(self, examples: list):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        return self.examples[index].as_features()
