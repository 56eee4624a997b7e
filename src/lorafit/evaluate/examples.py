"""Eval examples: the questions generation metrics ask, read through the data layer exactly as training reads them.

Sources are ``DataSource`` objects, so a source's ``format``, ``fields`` and ``task_prefix`` apply here as in
training; the held-out part of a training source (``data.eval_fraction``) is found again by its rows' places.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable

from lorafit.config import DataConfig, DataSource
from lorafit.data.formats import Record
from lorafit.data.sources import read_records
from lorafit.data.templates import apply_system_turn
from lorafit.errors import LorafitError
from lorafit.evaluate import metrics as M


@dataclass(frozen=True)
class EvalExample:
    """One question to answer: the conversation up to its last assistant turn, and what that turn said."""

    prompt: tuple[dict, ...]
    reference: str
    source: str
    where: str
    path: str = ""
    should_refuse: bool | None = None
    provided: tuple[str, ...] = field(default=())
    context: str | None = None  # what groundedness checks the answer against (``example_context``)


def as_source(source: DataSource | str | Path) -> DataSource:
    """A DataSource as given, or a bare path read with the defaults (``lorafit eval --data FILE``)."""
    return source if isinstance(source, DataSource) else DataSource(path=str(source))


def source_records(source: DataSource) -> list[Record]:
    """Every row of a source, in any format training reads (same readers, same checks, same field mapping)."""
    records, _, _ = read_records(source)
    return records


def to_example(record: Record, path: str, citation_pattern: str) -> EvalExample:
    """Split a conversation into prompt and reference answer, and pick up the fields metrics read.

    ``source`` (row field, else the file name) groups the per-source breakdown; ``should_refuse`` marks refusal
    examples; ``sources`` lists the ids an answer may cite, else the ids cited in the prompt itself count.
    """
    where = record.where
    last = max(i for i, m in enumerate(record.messages) if m["role"] == "assistant")
    meta = record.meta
    should_refuse = meta.get("should_refuse")
    if should_refuse is not None and not isinstance(should_refuse, bool):
        raise LorafitError(f'{where}: field "should_refuse" must be true or false (got {should_refuse!r})')
    provided = meta.get("sources")
    if provided is None:
        prompt_text = "\n".join(m["content"] for m in record.messages[:last])
        provided = M.citations(prompt_text, citation_pattern)
    elif not isinstance(provided, list):
        raise LorafitError(f'{where}: field "sources" must be a list of citable ids like ["1", "doc-7"] (got {provided!r})')
    source = meta.get("source")
    context = example_context(meta.get("context"), record.messages[:last], where, citation_pattern)
    return EvalExample(
        prompt=record.messages[:last],
        reference=record.messages[last]["content"],
        source=str(source) if source is not None else Path(path).name,
        where=where,
        path=path,
        should_refuse=should_refuse,
        provided=tuple(str(p) for p in provided),
        context=context,
    )


def example_context(given, prompt: tuple[dict, ...], where: str, citation_pattern: str) -> str | None:
    """The retrieved context of an example: the row's ``context`` field (a string, or a list of passages), else the
    passages its prompt marks with citation ids (``[1] ...`` at the start of a line); None when there is neither."""
    if given is None:
        passages = M.marked_passages((m.get("content") or "" for m in prompt), citation_pattern)
        return "\n\n".join(passages) or None
    if isinstance(given, list) and all(isinstance(p, str) for p in given):
        return "\n\n".join(given)
    if isinstance(given, str):
        return given
    raise LorafitError(f'{where}: field "context" must be a string or a list of strings (the retrieved passages); '
                       f"got {type(given).__name__}", fix='e.g. "context": ["[1] Paris is the capital of France."]')


def _answerable(records: Iterable[Record]) -> list[Record]:
    """Conversations with an assistant turn to compare against (plain-text rows have no answer)."""
    return [r for r in records if any(m["role"] == "assistant" for m in r.messages)]


def read_examples(sources: Iterable[DataSource | str | Path],
                  citation_pattern: str = M.DEFAULT_CITATION_PATTERN) -> list[EvalExample]:
    """Conversations for generation metrics, from every row of each source."""
    out = []
    for source in map(as_source, sources):
        out += [to_example(r, source.path, citation_pattern) for r in _answerable(source_records(source))]
    return out


def held_out_examples(train_sources: Iterable[DataSource], held_out_wheres: Iterable[str],
                      citation_pattern: str = M.DEFAULT_CITATION_PATTERN) -> list[EvalExample]:
    """The rows ``data.eval_fraction`` held out of training sources, found by their places (``file:line``)."""
    wanted = set(held_out_wheres)
    out = []
    for source in train_sources:
        if source.eval_fraction <= 0 or not wanted:
            continue
        picked = [r for r in _answerable(source_records(source)) if r.where in wanted]
        out += [to_example(r, source.path, citation_pattern) for r in picked]
    return out


def run_examples(data: DataConfig, eval_split, citation_pattern: str = M.DEFAULT_CITATION_PATTERN) -> list[EvalExample]:
    """Every eval example of a run: the ``data.eval`` sources' rows and the held-out rows of training sources.

    ``eval_split``: the prepared eval examples (``PreparedData.eval_examples``); their places select the held-out rows.
    """
    examples = read_examples(data.eval, citation_pattern) + held_out_examples(
        data.train, (e.where for e in eval_split), citation_pattern)
    # Prompts must be rendered as training rendered them: a template without a system role needs the same policy.
    return [replace(e, prompt=apply_system_turn(e.prompt, data.system_turn)) for e in examples]


def spread_sample(items: list, count: int) -> list:
    """``count`` items evenly spaced over the list (every source of a concatenated file list gets its share).

    >>> spread_sample(list(range(10)), 3)
    [0, 3, 6]
    """
    if count >= len(items):
        return list(items)
    return [items[(i * len(items)) // count] for i in range(count)]
