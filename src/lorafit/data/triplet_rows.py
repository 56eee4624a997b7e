"""Triplet rows read and checked, without tokenising (and without torch, so `lorafit config validate` and the
start of `lorafit train` can check them in a second, data/precheck.py). The format is described in
lorafit/data/triplets.py and docs/objectives.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from lorafit.data.formats import FieldMap, RowError, check_messages, messages_from_row
from lorafit.data.sources import SourceStats, read_objective_rows

PARTS = ("benign", "benign_cf", "injection")
TRIPLET_FIELDS = (*PARTS, "target", "role", "content")
ROW_HELP = ('each row must be an object like {"benign": "...", "benign_cf": "...", "injection": "...", '
            '"target": "..."}; each of the first three is a text or a messages list, which may end with the target '
            'answer (docs/objectives.md)')


@dataclass(frozen=True)
class TripletRecord:
    where: str
    benign: tuple[dict, ...]  # the conversation up to and including the target assistant turn
    benign_cf: tuple[dict, ...]  # ends with a user turn
    injection: tuple[dict, ...]  # ends with a user turn
    marker: str | None = None  # what the injection asks the model to say (for the attack-success evaluation)

    def identity(self) -> str:
        return json.dumps([self.benign, self.benign_cf, self.injection], sort_keys=True, ensure_ascii=False)


def _part(row: dict, fields: FieldMap, name: str) -> list[dict]:
    """A part as messages: a text is one user turn; a list (or a JSON list in a CSV cell) is a conversation."""
    key = fields.key(name)
    if key not in row or row[key] is None:
        raise RowError("missing_field", f'field "{key}" missing (keys: {", ".join(map(str, row)) or "none"})')
    value = row[key]
    if isinstance(value, str) and not _json_list(value):  # a CSV cell may hold a messages list as JSON text
        if not value.strip():
            raise RowError("empty_field", f'field "{key}" is empty')
        return [{"role": "user", "content": value}]
    messages = messages_from_row(row, FieldMap({**fields.names, "messages": key}))
    if not messages:
        raise RowError("empty_field", f'field "{key}" has no messages')
    return messages


def _json_list(text: str) -> bool:
    if not text.lstrip().startswith("["):
        return False
    try:
        return isinstance(json.loads(text), list)
    except json.JSONDecodeError:
        return False  # a request that merely starts with '[' is text


def _checked(messages: list[dict], key: str) -> None:
    problem = check_messages(messages)
    if problem:
        raise RowError(problem[0], f'"{key}": {problem[1]}')


def normalise_triplet(row: object, fields: FieldMap, where: str, marker_field: str | None = "marker") -> TripletRecord:
    """The TripletRecord for one parsed row, or RowError naming the field and what is wrong."""
    if not isinstance(row, dict):
        raise RowError("not_an_object", f"expected a JSON object, got {type(row).__name__}")
    marker = row.get(marker_field) if marker_field else None
    if marker is not None and (not isinstance(marker, str) or not marker.strip()):
        raise RowError("wrong_type", f'field "{marker_field}" must be a non-empty string (the marker the injection asks for)')
    benign = _part(row, fields, "benign")
    target_key = fields.key("target")
    target = row.get(target_key)
    if target is not None:
        if not isinstance(target, str) or not target.strip():
            raise RowError("wrong_type" if not isinstance(target, str) else "empty_field",
                           f'field "{target_key}" must be a non-empty string (the benign answer)')
        if benign[-1]["role"] == "assistant":  # the same answer twice is accepted: the target is kept
            if not _same_answer(benign[-1], target):
                raise RowError("role_order", f'"{fields.key("benign")}" ends with an assistant turn that differs from '
                               f'"{target_key}" ({_clip(benign[-1]["content"])} vs {_clip(target)}): give the answer '
                               "once, or the same answer in both")
            benign = benign[:-1]
        benign = benign + [{"role": "assistant", "content": target}]
    elif benign[-1]["role"] != "assistant":
        raise RowError("missing_field", f'field "{target_key}" missing: the benign answer is needed (or end '
                       f'"{fields.key("benign")}" with an assistant turn)')
    _checked(benign, fields.key("benign"))
    answer = benign[-1]["content"]
    parts = {}
    for name in PARTS[1:]:
        messages, key = _part(row, fields, name), fields.key(name)
        # Whole conversations ending with the benign answer (a common way to store triplets): the model answers
        # the last user turn, so that answer is dropped; a different answer would be a fourth, unused target.
        if messages[-1]["role"] == "assistant":
            if not _same_answer(messages[-1], answer):
                raise RowError("role_order", f'"{key}" ends with an assistant turn that differs from the target '
                               f"({_clip(messages[-1]['content'])} vs {_clip(answer)}); it must end with the user turn "
                               f'the model answers, or with the target answer itself (then that turn is dropped: '
                               f'the answer is "{target_key}", for the benign request only)')
            messages = messages[:-1]
        _checked(messages + [{"role": "assistant", "content": "-"}], key)
        parts[name] = tuple(messages)
    return TripletRecord(where, tuple(benign), parts["benign_cf"], parts["injection"], marker)


def _same_answer(message: dict, answer: str) -> bool:
    """An assistant turn that is the target answer (up to surrounding whitespace), with no tool calls."""
    return not message.get("tool_calls") and message["content"].strip() == answer.strip()


def _clip(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def read_triplets(source, *, marker_field: str | None = "marker") -> tuple[list[TripletRecord], SourceStats, list[dict]]:
    """Parse and check every row of ``source`` (a DataSource); apply its on_error policy like other formats.
    ``marker_field``: the optional row field naming the marker the injection asks for."""
    return read_objective_rows(source, format_name="triplets", row_name="triplet", known_fields=TRIPLET_FIELDS,
                               normalise=lambda row, fields, where: normalise_triplet(row, fields, where, marker_field),
                               what="triplets", row_help=ROW_HELP)
