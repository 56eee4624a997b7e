"""Turn rows of any supported format into one internal record: a conversation, or a plain text.

Formats (docs/data.md has an example of each):
  messages           {"messages": [{"role", "content"}, ...], "tools"?}; content a string or [{"type": "text", "text"}];
                     assistant "tool_calls" and "tool" messages (OpenAI tool use); assistant {"type": "reasoning"}
                     parts become "reasoning_content" (the field reasoning templates read)
  sharegpt           {"conversations": [{"from", "value"}, ...], "tools"?}; from human/user, gpt/assistant/bot, system,
                     function_call (an assistant tool call, value = JSON) and observation (the tool's result)
  alpaca             {"instruction", "input"?, "output", "system"?, "history"?: [[user, assistant], ...]}
  prompt_completion  {"prompt", "completion", "system"?}
  text               {"text"}: continued pre-training, every token trained

A format is detected per file from its first object row (after the ``fields`` rename map) unless ``format:``
names it. Every check returns ``(reason, message)`` rather than raising, so the caller applies ``on_error``.
Pure functions: each rule is testable on a dict.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "bot": "assistant",
                  "model": "assistant", "system": "system", "function_call": "assistant", "observation": "tool",
                  "tool": "tool"}
# Keys of preference data (DPO-style pairs): supervised training must not quietly read such a file.
PREFERENCE_KEYS = ("chosen", "rejected")
# How a format is recognised: the canonical keys its rows have (checked in this order).
SIGNATURES = (
    ("messages", ("messages",)),
    ("sharegpt", ("conversations",)),
    ("alpaca", ("instruction", "output")),
    ("prompt_completion", ("prompt", "completion")),
    ("text", ("text",)),
)


class RowError(Exception):
    """A row-level problem: ``reason`` is a short class used to count skips; ``message`` is for people."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


@dataclass(frozen=True)
class Record:
    """One example, normalised: ``messages`` for chat formats, ``text`` for plain text."""

    where: str
    messages: tuple[dict, ...] = ()
    text: str | None = None
    rank: float | None = None  # the curriculum field's value, when data.curriculum_field is set
    meta: dict = field(default_factory=dict, compare=False, hash=False)  # PASSTHROUGH_FIELDS the row had
    tools: tuple[dict, ...] = ()  # tool definitions the template renders (the row's "tools")

    def identity(self) -> str:
        """A canonical string of the content, to find identical examples in train and eval."""
        if self.text is not None:
            return self.text
        content = {"messages": self.messages, "tools": self.tools} if self.tools else self.messages
        return json.dumps(content, sort_keys=True, ensure_ascii=False)


# Row fields that are not content but that evaluation reads (docs/eval.md): kept on the Record as ``meta``.
PASSTHROUGH_FIELDS = ("source", "sources", "should_refuse", "context")


class FieldMap:
    """Canonical name -> the user's key (``fields: {prompt: question}``); 'response' is 'completion'."""

    def __init__(self, fields: dict[str, str]):
        self.names = dict(fields)
        if "response" in self.names:
            self.names["completion"] = self.names.pop("response")

    def key(self, canonical: str) -> str:
        # part_text: the text key of a typed content part, {"type": "text", "text": ...} unless mapped.
        return self.names.get(canonical, "text" if canonical == "part_text" else canonical)


def detect_format(row: dict, fields: FieldMap) -> str | None:
    for name, keys in SIGNATURES:
        if all(fields.key(k) in row for k in keys):
            return name
    return None


def preference_keys(row: object, fields: FieldMap) -> list[str]:
    """The preference keys (chosen/rejected) a row has, unless the field map reads one of them on purpose."""
    if not isinstance(row, dict) or not all(key in row for key in PREFERENCE_KEYS):
        return []
    return [] if set(PREFERENCE_KEYS) & set(fields.names.values()) else list(PREFERENCE_KEYS)


def describe_expected(fields: FieldMap) -> str:
    return ", ".join(" + ".join(f'"{fields.key(k)}"' for k in keys) + f" ({name})" for name, keys in SIGNATURES)


def normalise(row: object, fmt: str, fields: FieldMap, where: str, *, task_prefix: str | None = None,
              rank_field: str | None = None) -> Record:
    """The Record for one parsed row, or RowError naming what is wrong."""
    if not isinstance(row, dict):
        raise RowError("not_an_object", f"expected a JSON object, got {type(row).__name__}")
    rank = _rank(row, rank_field) if rank_field else None
    meta = {key: row[key] for key in PASSTHROUGH_FIELDS if key in row}
    if fmt == "text":
        text = _string(row, fields.key("text"), required=True)
        return Record(where, text=(task_prefix or "") + text, rank=rank, meta=meta)
    messages = _TO_MESSAGES[fmt](row, fields)
    problem = check_messages(messages)
    if problem:
        raise RowError(*problem)
    if task_prefix:
        first_user = next(i for i, m in enumerate(messages) if m["role"] == "user")
        messages[first_user] = {"role": "user", "content": task_prefix + messages[first_user]["content"]}
    tools = _list(row, fields.key("tools"), required=False) if fmt in ("messages", "sharegpt") else None
    return Record(where, messages=tuple(messages), rank=rank, meta=meta, tools=tuple(tools or ()))


def _rank(row: dict, key: str) -> float:
    if key not in row:
        raise RowError("missing_field", f'field "{key}" missing (data.curriculum_field sorts by it)')
    value = row[key]
    try:
        if isinstance(value, bool):
            raise ValueError
        return float(value)
    except (TypeError, ValueError):
        raise RowError("wrong_type", f'field "{key}" must be a number for data.curriculum_field (got {value!r})') from None


def _field(row: dict, key: str, *, required: bool = True):
    if key not in row or row[key] is None:
        if required:
            raise RowError("missing_field", f'field "{key}" missing (keys: {", ".join(map(str, row)) or "none"})')
        return None
    return row[key]


def _string(row: dict, key: str, *, required: bool) -> str | None:
    value = _field(row, key, required=required)
    if value is None:
        return None
    if not isinstance(value, str):
        raise RowError("wrong_type", f'field "{key}" must be a string (got {type(value).__name__})')
    if required and not value.strip():
        raise RowError("empty_field", f'field "{key}" is empty')
    return value


def _list(row: dict, key: str, *, required: bool = True) -> list | None:
    value = _field(row, key, required=required)
    if isinstance(value, str) and value.lstrip().startswith("["):  # CSV cells hold JSON text
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise RowError("malformed_json", f'field "{key}" holds malformed JSON ({exc.msg})') from None
    if value is None:
        return None
    if hasattr(value, "tolist"):  # numpy arrays from Parquet
        value = value.tolist()
    if not isinstance(value, list):
        raise RowError("wrong_type", f'field "{key}" must be a list (got {type(value).__name__})')
    if required and not value:
        raise RowError("empty_field", f'field "{key}" is an empty list')
    return value


def _content_parts(content: object, place: str, part_key: str = "text") -> tuple[str, str | None]:
    """(text, reasoning) of a content string, or of a list of typed parts: {"type": "text", "text": ...} parts
    joined into the text, {"type": "reasoning", "text": ...} parts (LLaMA-Factory's v1 format) into the reasoning
    (None when there is none). ``part_key`` is the parts' text key, ``fields: {part_text: value}`` for
    {"type": "text", "value": ...}."""
    if isinstance(content, str):
        return content, None
    if isinstance(content, list):
        texts, thoughts = [], []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            if kind not in ("text", "reasoning"):
                raise RowError("wrong_type", f'{place}.content[{j}] is {kind!r}; only {{"type": "text", "{part_key}": '
                               f'...}} parts (and {{"type": "reasoning", "{part_key}": ...}} in assistant turns) are '
                               "supported")
            if not isinstance(part.get(part_key), str):
                keys = ", ".join(map(str, part))
                other = next((k for k in part if k != "type" and isinstance(part[k], str)), None)
                fix = f"; set fields: {{part_text: {other}}} on this source" if other else ""
                raise RowError("missing_field", f'{place}.content[{j}] is a {kind} part without a string "{part_key}" '
                               f"key (keys: {keys}){fix}")
            (texts if kind == "text" else thoughts).append(part[part_key])
        return "".join(texts), "".join(thoughts) if thoughts else None
    raise RowError("wrong_type", f"{place}.content must be a string or a list of text parts (got {type(content).__name__})")


def _turns(row: dict, key: str, role_key: str, text_key: str, to_role, expected, part_key: str) -> list[dict]:
    """A list of turn objects -> messages; ``to_role`` maps the row's role value to ours (None = unknown)."""
    messages = []
    for i, turn in enumerate(_list(row, key)):
        place = f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise RowError("wrong_type", f'{place} must be an object with "{role_key}" and "{text_key}"')
        calls = turn.get("tool_calls")  # OpenAI: an assistant message calling tools may have no content
        if role_key not in turn or (text_key not in turn and not calls):
            missing = role_key if role_key not in turn else text_key
            raise RowError("missing_field", f'{place}: field "{missing}" missing')
        role = to_role(turn[role_key])
        if role is None:
            raise RowError("unknown_role", f"{place}.{role_key} is {turn[role_key]!r}; expected one of {', '.join(expected)}")
        content, reasoning = ("", None) if turn.get(text_key) is None and calls else \
            _content_parts(turn.get(text_key), place, part_key)
        message = {"role": role, "content": content}
        if reasoning is not None:  # rendered through the template's reasoning field, as transformers templates read it
            if role != "assistant":
                raise RowError("wrong_type", f"{place}.content has a reasoning part in a {role} turn; only assistant "
                               "turns carry reasoning")
            message["reasoning_content"] = reasoning
        if str(turn[role_key]).lower() == "function_call":  # ShareGPT: the value is the call, as JSON
            message = {"role": "assistant", "content": "", "tool_calls": _calls(_parsed(message["content"], place), place)}
        elif calls:
            message["tool_calls"] = _calls(calls, place)
        if role == "tool":  # some templates print which call a result answers (Mistral's needs the id)
            message |= {key: turn[key] for key in ("tool_call_id", "name") if isinstance(turn.get(key), str)}
        messages.append(message)
    return messages


def _parsed(text: str, place: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise RowError("malformed_json", f"{place}: a function_call value must be JSON ({exc.msg})") from None


def _calls(calls: object, place: str) -> list[dict]:
    """Tool calls in the form transformers templates expect: {"type": "function", "function": {"name",
    "arguments": dict}}. OpenAI rows carry ``arguments`` as a JSON string; ShareGPT rows one call or a list."""
    calls = calls if isinstance(calls, list) else [calls]
    result = []
    for call in calls:
        function = dict(call.get("function") or call) if isinstance(call, dict) else None
        if not function or not isinstance(function.get("name"), str):
            raise RowError("wrong_type", f'{place}: a tool call must be an object with a "name" (and "arguments")')
        arguments = function.pop("parameters", function.get("arguments", {}))
        function["arguments"] = _parsed(arguments, place) if isinstance(arguments, str) else arguments
        result.append({"type": "function", "function": {"name": function["name"], "arguments": function["arguments"]}}
                      | ({"id": call["id"]} if isinstance(call.get("id"), str) else {}))
    return result


def messages_from_row(row: dict, fields: FieldMap) -> list[dict]:
    return _turns(row, fields.key("messages"), fields.key("role"), fields.key("content"),
                  lambda role: role if role in ROLES else None, ROLES, fields.key("part_text"))


def sharegpt_messages(row: dict, fields: FieldMap) -> list[dict]:
    return _turns(row, fields.key("conversations"), fields.key("from"), fields.key("value"),
                  lambda role: SHAREGPT_ROLES.get(str(role).lower()), SHAREGPT_ROLES, fields.key("part_text"))


def _from_alpaca(row: dict, fields: FieldMap) -> list[dict]:
    instruction = _string(row, fields.key("instruction"), required=True)
    extra = _string(row, fields.key("input"), required=False)
    output = _string(row, fields.key("output"), required=True)
    system = _string(row, fields.key("system"), required=False)
    history = _list(row, fields.key("history"), required=False) or []
    messages = [{"role": "system", "content": system}] if system and system.strip() else []
    for i, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            raise RowError("wrong_type", f'{fields.key("history")}[{i}] must be a [user, assistant] pair of strings')
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    user = instruction + (f"\n\n{extra}" if extra and extra.strip() else "")
    return messages + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def _from_prompt_completion(row: dict, fields: FieldMap) -> list[dict]:
    prompt = _string(row, fields.key("prompt"), required=True)
    completion = _string(row, fields.key("completion"), required=True)
    system = _string(row, fields.key("system"), required=False)
    messages = [{"role": "system", "content": system}] if system and system.strip() else []
    return messages + [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]


_TO_MESSAGES = {
    "messages": messages_from_row,
    "sharegpt": sharegpt_messages,
    "alpaca": _from_alpaca,
    "prompt_completion": _from_prompt_completion,
}


def check_messages(messages: list[dict]) -> tuple[str, str] | None:
    """(reason, message) for a conversation that cannot be trained on, or None.

    Order: an optional system message first, then user and assistant turns alternating, starting with user; an
    assistant turn with tool calls is followed by one or more tool results, then the assistant goes on.

    >>> check_messages([{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}])
    ('role_order', 'message 1 is a second user turn in a row; user and assistant turns must alternate')
    """
    if not messages:
        return "empty_field", "the conversation has no messages"
    expected = "user"  # or "assistant", "tool" (right after a call), "tool_or_assistant" (after a result)
    for i, message in enumerate(messages):
        role, content = message["role"], message["content"]
        if role == "system":
            if i != 0:
                return "role_order", f"message {i} is a system message; only the first message may be one"
            continue
        problem = _order_problem(i, message, expected, first=i == 0 or (i == 1 and messages[0]["role"] == "system"))
        if problem:
            return "role_order", problem
        if not content.strip() and not message.get("tool_calls"):
            what = "an empty assistant turn: there is nothing to learn from it" if role == "assistant" else f"an empty {role} turn"
            return "empty_field", f"message {i} is {what}"
        if role == "assistant":
            expected = "tool" if message.get("tool_calls") else "user"
        else:
            expected = "assistant" if role == "user" else "tool_or_assistant"
    if expected == "tool":
        return "role_order", "the last tool call has no tool result after it"
    if not any(m["role"] == "assistant" for m in messages):
        return "no_assistant_turn", "no assistant turn: nothing to train on"
    return None


def _order_problem(i: int, message: dict, expected: str, *, first: bool) -> str | None:
    role = message["role"]
    if role == "tool":
        ok = expected in ("tool", "tool_or_assistant")
        return None if ok else f"message {i} is a tool result that follows no tool call"
    if expected == "tool":
        return f"message {i} follows a tool call but is a {role} turn, not the tool's result"
    if role == "assistant" and expected in ("assistant", "tool_or_assistant"):
        return None
    if role == expected:
        return None
    if expected == "tool_or_assistant":
        return f"message {i} is a {role} turn right after a tool result; the assistant answers it first"
    if first:
        return f"message {i} is an assistant turn before any user turn; a conversation starts with user"
    return f"message {i} is a second {role} turn in a row; user and assistant turns must alternate"
