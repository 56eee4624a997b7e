"""One source, start to finish: read rows -> normalise (format + field map) -> on_error policy -> tokenise ->
length policy. The result (examples and counts) is what the on-disk cache stores, so everything here depends only
on the file's bytes, the source's config, the tokenizer, the chat template and the data options passed in.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from lorafit.config import DataSource
from lorafit.data.formats import FieldMap, Record, RowError, describe_expected, detect_format, normalise
from lorafit.data.labels import IGNORE_INDEX, TokenizedExample, tokenize_conversation, tokenize_text
from lorafit.data.readers import read_rows
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
    fields = FieldMap(source.fields)
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
    stats = SourceStats(path=str(path), format=fmt, rows=len(rows))
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
    skipped_rows = [{"where": w, "reason": r, "message": m} for w, r, m in problems]
    if problems and source.on_error == "fail":
        listed = [f"{w}: {m}" for w, _, m in problems[:MAX_LISTED]]
        more = len(problems) - len(listed)
        raise LorafitError(
            f"{path}: {len(problems)} invalid row{'s' if len(problems) > 1 else ''} ({fmt} format)",
            details=listed + ([f"... and {more} more"] if more else []),
            why=_FORMAT_HELP.get(fmt, ""),
            fix="fix or remove those rows, or set on_error: skip (with max_skip_fraction) on this source; see docs/data.md",
        )
    stats.skipped = dict(Counter(r for _, r, _ in problems))
    if problems and len(problems) / len(rows) > source.max_skip_fraction:
        raise LorafitError(
            f"{path}: {len(problems)} of {len(rows)} rows are invalid ({_fraction(len(problems), len(rows))}), "
            f"more than max_skip_fraction={source.max_skip_fraction}",
            details=[f"{w}: {m}" for w, _, m in problems[:MAX_LISTED]],
            why="skipping is for a few bad rows; this many usually means a wrong format or field map",
            fix="fix the file, check `format:`/`fields:`, or raise max_skip_fraction for this source",
        )
    if not records:
        raise LorafitError(f"{path}: no usable rows", why="every row was invalid")
    return records, stats, skipped_rows


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
                     stats: SourceStats) -> list[Example]:
    """Tokenise with labels and apply the length policy, counting into ``stats``."""
    examples: list[Example] = []
    for record in records:
        if record.text is not None:
            tokenised: TokenizedExample = tokenize_text(tokenizer, record.text)
        else:
            tokenised = tokenize_conversation(tokenizer, record.messages, train_on=train_on, where=record.where)
        stats.unterminated_turns += tokenised.unterminated_turns
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
    stats.kept = len(examples)
    return examples
